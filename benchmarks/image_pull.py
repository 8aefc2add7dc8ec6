"""Pulls of one image through real agents, from 1, 2 and 3 holders and with one of 3 killed, printed as JSON.

    python benchmarks/image_pull.py [--size-mib 1024] [--uplink-mbit M] [--kill-at 0.4] [--freeze]
                                    [--plot out.png] [--logs DIR]

A cluster of 5 agents (one site: no emulated WAN delay) imports a disk-like image (`image_import.make_disk`)
on node1, kept on 1 holder; node2 pulls it (1 source), then node3 (2 sources: node1 and node2), then node4
(3 sources). Then node4 is killed, and node5 pulls from node1, node2 and node3 (the same 3 holders as
node4) while node3 is killed (SIGKILL, by PID) `--kill-at` of node4's pull time after the pull began;
node5 then checks every chunk it stored (`image.verify`: corrupt 0 means no unverified chunk was used).
With `--freeze`, node3 is stopped (SIGSTOP) instead: it answers nothing and its connections stay open, so
only the requests' deadlines, or node5's membership declaring it dead, tell node5 (a holder that hangs).
Each pull is `image.pull` as the CLI sends it; its answer says how many bytes came from each holder and
how many were duplicates. `cpu_share` is the CPU time all agents used during a pull (`cpu_seconds`: each
agent's) over the wall time and every core: near 1, or the puller's near the wall time (its event loop is
one thread), the pull is bound by CPU, not by the network. `puller_suspected` counts what the puller's
membership said of other nodes during the pull ("suspect node1": a probe went unanswered in time): a
holder's answers to probes wait behind the chunks it sends the puller on the same connection.

Without `--uplink-mbit` the agents share this machine's loopback, with no bandwidth limit: the figure is
what the RPC path (mutual TLS, 2 MiB request/response batches, verification and pack writes) carries per
second, beside `cp` of the same file. With it, each agent runs in a network namespace of its own whose
uplink is shaped to M Mbit/s (`benchmarks/netns.py`, checked first with plain TCP flows: `links`), and
`uplinks_alone_s` is the time the holders' uplinks would need to carry the image's compressed chunks,
headers aside (with the kill: 3 uplinks until it, 2 after). Run as root; everything created is removed on
the way out (also on Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import netns  # benchmarks/netns.py, beside this script
import trio
from harness import local_cluster, pyplot, save  # benchmarks/harness.py, beside this script
from image_import import make_disk
from stats import cpu_seconds

from images.transfer import upload
from overlay.wire import tls
from overlay.wire.rpc import Transport

NODES = ["node1", "node2", "node3", "node4", "node5"]
SUSPECTED = re.compile(r"member_(suspect|dead): (\S+)")
"""What an agent logs when its membership suspects a member, or declares it dead (`agents.node`)."""
GONE_DEADLINE = 60.0
"""Seconds node5 has to find node4 dead (not merely suspect: a suspect holder is still asked) before its pull."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--uplink-mbit", type=float, help="shape each agent's uplink (network namespaces, root)")
    parser.add_argument("--kill-at", type=float, default=0.4, help="fraction of the 3-holder pull time")
    parser.add_argument("--freeze", action="store_true",
                        help="SIGSTOP node3 instead: a holder that stops answering but keeps its connections open")
    parser.add_argument("--plot")
    parser.add_argument("--logs", type=Path, help="copy the agents' logs to this directory at the end")
    args = parser.parse_args()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))  # trio's way: unwind, stop the
    # agents, remove the namespaces
    with tempfile.TemporaryDirectory(prefix="image-pull-", dir="/var/tmp") as tmp:
        directory = Path(tmp)
        image = directory / "image.raw"
        make_disk(image, args.size_mib)
        started = time.perf_counter()
        subprocess.run(["cp", "--sparse=always", str(image), str(directory / "copy.raw")], check=True)
        cp_seconds = time.perf_counter() - started
        result: dict[str, Any] = {"benchmark": "image_pull", "size_mib": args.size_mib,
                                  "uplink_mbit": args.uplink_mbit, "cp_seconds": round(cp_seconds, 3)}
        with contextlib.ExitStack() as stack:
            places: list[tuple[str, str]] = []
            if args.uplink_mbit:
                bed = stack.enter_context(netns.testbed(NODES, args.uplink_mbit))
                stack.enter_context(bed.inside(bed.hub))
                result["links"] = {"node1 -> node2 (Mbit/s)": netns.throughput(bed, [0], 1),
                                   "node1, node2, node3 -> node4 at once": netns.throughput(bed, [0, 1, 2], 3)}
                places = bed.nodes
            state, identity = stack.enter_context(local_cluster(directory, len(NODES), 1, netns=places))
            if args.logs:  # on the way out, whatever happened
                stack.callback(_copy_logs, state, args.logs)
            nodes = {n["name"]: _Node(n["addr"], n["pid"], Path(n["config"]).parent / "agent.log")
                     for n in state["nodes"]}
            result.update(trio.run(_scenario, identity, image, nodes, args))
    result["load"] = os.getloadavg()[0]
    json.dump(result, sys.stdout, indent=2, default=str)
    print()
    if args.plot:
        _plot(result, args.plot)


@dataclass(frozen=True)
class _Node:
    addr: str
    pid: int
    log: Path


def _copy_logs(state: dict[str, Any], to: Path) -> None:
    to.mkdir(parents=True, exist_ok=True)
    for node in state["nodes"]:
        shutil.copyfile(Path(node["config"]).parent / "agent.log", to / f"{node['name']}.log")


async def _scenario(identity: tls.Identity, image: Path, nodes: dict[str, _Node],
                    args: argparse.Namespace) -> dict[str, Any]:
    async with Transport(identity, node="bench") as transport:
        imported = (await upload(transport, nodes["node1"].addr, image, "bench", copies=1)).__dict__
        wire_bytes = imported["new_bytes"]  # the compressed chunks: what the holders' uplinks carry
        pulls = [await _pull(transport, nodes, puller, imported, args.uplink_mbit)
                 for puller in ("node2", "node3", "node4")]
        os.kill(nodes["node4"].pid, signal.SIGKILL)  # node5 is to pull from node4's 3 holders
        await _wait_gone(transport, nodes["node5"].addr, "node4")
        no_kill = pulls[-1]["wall_seconds"]
        kill_after = args.kill_at * no_kill

        async def kill() -> None:
            await trio.sleep(kill_after)
            os.kill(nodes["node3"].pid, signal.SIGSTOP if args.freeze else signal.SIGKILL)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(kill)
            killed = await _pull(transport, nodes, "node5", imported, args.uplink_mbit)
        if args.uplink_mbit:  # node3's share until the kill, the other two's after it
            rate = args.uplink_mbit * 1e6 / 8
            killed["uplinks_alone_s"] = round(kill_after + max(0.0, wire_bytes - 3 * rate * kill_after) / (2 * rate), 2)
        killed.update(killed="node3", how="SIGSTOP" if args.freeze else "SIGKILL", killed_after_s=round(kill_after, 2),
                      vs_no_kill=round(killed["wall_seconds"] / no_kill, 2),
                      verify=await transport.call(nodes["node5"].addr, "image.verify", {"name": "bench"}, timeout=600))
        pulls.append(killed)
        one = pulls[0]["wall_seconds"]
        for p in pulls:
            p["speedup_vs_1"] = round(one / p["wall_seconds"], 2)
        return {"imported": imported, "pulls": pulls}


async def _pull(transport: Transport, nodes: dict[str, _Node], puller: str, imported: dict[str, Any],
                uplink_mbit: float | None) -> dict[str, Any]:
    """`image.pull` on `puller`, with the figures of one row (`mb_per_s`: of the image's size, zeros included)."""
    cpu = {name: cpu_seconds(node.pid) for name, node in nodes.items()}
    logged = nodes[puller].log.stat().st_size
    begun = time.perf_counter()
    answer = await transport.call(nodes[puller].addr, "image.pull", {"name": "bench"}, timeout=3600)
    wall = time.perf_counter() - begun
    used = {name: round(max(0.0, cpu_seconds(nodes[name].pid) - before), 2) for name, before in cpu.items()}
    with open(nodes[puller].log, "rb") as log:
        log.seek(logged)
        said = Counter(" ".join(m) for m in SUSPECTED.findall(log.read().decode(errors="replace")))
    holders = len(answer["sources"])
    row = {"puller": puller, "holders": holders, **answer, "wall_seconds": round(wall, 3),
           "mb_per_s": round(imported["size"] / 1e6 / wall, 1),
           "duplicate_pct": round(100 * answer["duplicate_bytes"] / max(1, answer["fetched_bytes"]), 2),
           "cpu_share": round(sum(used.values()) / wall / (os.cpu_count() or 1), 2), "cpu_seconds": used,
           "puller_suspected": dict(said)}
    if uplink_mbit:
        row["uplinks_alone_s"] = round(imported["new_bytes"] * 8 / (holders * uplink_mbit * 1e6), 2)
    return row


async def _wait_gone(transport: Transport, addr: str, name: str) -> None:
    with trio.fail_after(GONE_DEADLINE):
        while True:
            members = await transport.call(addr, "agent.members", {}, timeout=5)
            if all(m["status"] in ("dead", "left") for m in members if m["name"] == name):
                return
            await trio.sleep(0.2)


def _plot(result: dict[str, Any], path: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    pulls = result["pulls"]
    labels = [f"{p['holders']} holder{'s' * (p['holders'] > 1)}" + (", 1 killed" if "killed" in p else "")
              for p in pulls]
    ax.bar(labels, [p["wall_seconds"] for p in pulls], label="pull")
    if result["uplink_mbit"]:
        ax.scatter(labels, [p["uplinks_alone_s"] for p in pulls], color="black", marker="_", s=600, zorder=3,
                   label="the uplinks alone")
        ax.set_title(f"{result['size_mib']} MiB image, uplinks of {result['uplink_mbit']:g} Mbit/s")
    else:
        ax.axhline(result["cp_seconds"], color="grey", linestyle="--", label="cp")
        ax.set_title(f"{result['size_mib']} MiB image, loopback")
    ax.set_ylabel("seconds")
    ax.legend()
    save(fig, path)


if __name__ == "__main__":
    main()
