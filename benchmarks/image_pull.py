"""Pulls of one image through real agents on this machine, from 1, 2 and 3 holders, printed as JSON.

    python benchmarks/image_pull.py [--size-mib 1024] [--plot out.png]

A local cluster of 5 agents (one site: no emulated WAN delay) imports a disk-like image
(`image_import.make_disk`) on node1, kept on 1 holder; node2 pulls it (1 source), then node3 (2
sources: node1 and node2), then node4 (3 sources). Each pull is `image.pull` as the CLI sends it; its
answer says how many bytes came from each holder and how many were duplicates. The agents, the
holders and the puller share this machine's cores and loopback, with no bandwidth limit: the figure
is what the RPC path (mutual TLS, 2 MiB request/response batches, verification and pack writes) carries
per second, beside `cp` of the same file; the uplink-limited case needs the network-namespace testbed
(issue 14).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio
from harness import local_cluster, pyplot, save  # benchmarks/harness.py, beside this script
from image_import import make_disk

from images.transfer import upload
from overlay.wire.rpc import Transport


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--plot")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="image-pull-", dir="/var/tmp") as tmp:
        directory = Path(tmp)
        image = directory / "image.raw"
        make_disk(image, args.size_mib)
        started = time.perf_counter()
        subprocess.run(["cp", "--sparse=always", str(image), str(directory / "copy.raw")], check=True)
        cp_seconds = time.perf_counter() - started
        with local_cluster(directory, 5, 1) as (state, identity):
            addrs = {n["name"]: n["addr"] for n in state["nodes"]}

            async def run() -> dict[str, object]:
                async with Transport(identity, node="bench") as transport:
                    imported = await upload(transport, addrs["node1"], image, "bench", copies=1)
                    pulls = []
                    for puller in ("node2", "node3", "node4"):
                        begun = time.perf_counter()
                        answer = await transport.call(addrs[puller], "image.pull", {"name": "bench"}, timeout=3600)
                        answer["wall_seconds"] = round(time.perf_counter() - begun, 3)
                        answer["mb_per_s"] = round(imported.size / 1e6 / answer["wall_seconds"], 1)
                        pulls.append(answer)
                    return {"imported": imported.__dict__, "pulls": pulls}

            measured = trio.run(run)
    result = {"benchmark": "image_pull", "size_mib": args.size_mib, "load": os.getloadavg()[0],
              "cp_seconds": round(cp_seconds, 3), **measured}
    json.dump(result, sys.stdout, indent=2, default=str)
    print()
    if args.plot:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6, 3.5))
        pulls = result["pulls"]
        ax.bar([f"{len(p['sources'])} holder(s)" for p in pulls], [p["wall_seconds"] for p in pulls])
        ax.axhline(cp_seconds, color="grey", linestyle="--", label="cp")
        ax.set_ylabel("seconds")
        ax.legend()
        save(fig, args.plot)


if __name__ == "__main__":
    main()
