"""Time from `ve create` to a booted guest, with its image cold on the chosen node and warm, printed as JSON.

    python benchmarks/image_boot.py [--image minbase|ssh|tiny] [--runs 3] [--plot out.png]

Each run starts 2 real-guest agents on 2 sites (`cluster up --hypervisor qemu`), imports the image on node1
only (1 holder), creates and destroys a tiny guest on node2 (its libvirtd probes QEMU's capabilities at its
first domain, ~3 s that no image causes), then creates a one-VM VE confined to node2's site, twice:
- cold: node2 holds none of the image; the create's prefetch step pulls it from node1 and makes its boot
  base while the VM's reservation is held, then the VM starts;
- warm: the same VE again after a destroy: node2 holds the chunks and the base, so nothing moves.
`create_s` is the `ve create` command's wall time (it answers once the VM runs), `ready_s` the time until
the guest's console shows its ready line. Beside them, `pull_s` is a plain `image pull` of the same image
to node2 from node1 before any create (a separate cluster state: the transfer alone, no base, no boot).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import cli, guest_dirs, local_cluster, pyplot, save, share_images, wait_ready

from discovery.cli.local_cluster import TINY_IMAGE
from images import debian, tinyguest

MEMORY = {"minbase": 384, "ssh": 384, "tiny": 128}


def create(state: dict[str, Any], spec: Path, console: Path) -> dict[str, float]:
    console.unlink(missing_ok=True)
    started = time.perf_counter()
    cli(state, "--agent", "node1", "ve", "create", str(spec))
    created = time.perf_counter()
    wait_ready(console, 600)
    return {"create_s": round(created - started, 2), "ready_s": round(time.perf_counter() - started, 2)}


def one_run(directory: Path, image: Path, name: str, memory: int, pull_only: bool) -> dict[str, Any]:
    with local_cluster(directory, 2, 2, hypervisor="qemu") as (state, _):
        cli(state, "--agent", "node1", "image", "import", str(image), "--name", name, "--copies", "1")
        if pull_only:
            started = time.perf_counter()
            pulled = cli(state, "--agent", "node2", "image", "pull", name)
            return {"pull_s": round(time.perf_counter() - started, 2), "fetched_bytes": pulled["fetched_bytes"]}
        site = state["nodes"][1]["site"]
        warmup, spec = directory / "warmup.yaml", directory / "boot.yaml"
        for path, ve, image_name in ((warmup, "warmup", TINY_IMAGE), (spec, "boot", name)):
            path.write_text(f"name: {ve}\nsite: {site}\nvms:\n  - {{name: a, vcpus: 1, memory_mb: {memory}, "
                            f"disk_gb: 2, image: {image_name}}}\n")
        cli(state, "--agent", "node1", "ve", "create", str(warmup))  # node2's libvirtd probes QEMU once
        cli(state, "ve", "destroy", "warmup")
        console = guest_dirs(state)["node2"] / "boot--a.log"
        cold = create(state, spec, console)
        cli(state, "ve", "destroy", "boot")
        warm = create(state, spec, console)
        cli(state, "ve", "destroy", "boot")
        return {"cold": cold, "warm": warm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", choices=sorted(MEMORY), default="minbase")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--plot")
    args = parser.parse_args()
    image = tinyguest.build().base if args.image == "tiny" else debian.build(args.image)
    runs: list[dict[str, Any]] = []
    pulls: list[dict[str, Any]] = []
    for _ in range(args.runs):
        for pull_only in (False, True):
            with tempfile.TemporaryDirectory(prefix="image-boot-", dir="/var/tmp") as tmp:
                share_images(Path(tmp))
                measured = one_run(Path(tmp), image, f"bench-{args.image}", MEMORY[args.image], pull_only)
                (pulls if pull_only else runs).append(measured)

    def median(case: str, key: str) -> float:
        return statistics.median(run[case][key] for run in runs)

    medians = {case: {key: median(case, key) for key in ("create_s", "ready_s")} for case in ("cold", "warm")}
    result = {"benchmark": "image_boot", "image": args.image, "size": image.stat().st_size, "runs": args.runs,
              "load": os.getloadavg()[0], "median": medians,
              "pull_s": statistics.median(p["pull_s"] for p in pulls), "all": runs, "pulls": pulls}
    json.dump(result, sys.stdout, indent=2)
    print()
    if args.plot:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6, 3.5))
        cases = ["cold", "warm"]
        ax.bar(cases, [result["median"][c]["create_s"] for c in cases], label="ve create answered (running)")
        ax.bar(cases, [result["median"][c]["ready_s"] - result["median"][c]["create_s"] for c in cases],
               bottom=[result["median"][c]["create_s"] for c in cases], label="boot to the ready line")
        ax.axhline(result["pull_s"], color="grey", linestyle="--", label="image pull alone")
        ax.set_ylabel("seconds")
        ax.set_title(f"{args.image}: create to ready, image cold vs warm on the node")
        ax.legend()
        save(fig, args.plot)


if __name__ == "__main__":
    main()
