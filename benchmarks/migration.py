"""Moving a 128 MiB real guest between two agents: live relocation against `virsh migrate` done by hand,
and save → ship → restore, printed as JSON.

    python benchmarks/migration.py --runs 10 [--memory-mb 128] [--plot docs/migration.png]
    sudo python benchmarks/migration.py --testbed --bandwidth 100 --site-rtt 10 --runs 10

A 2-node, 1-site cluster with `--hypervisor qemu` (each agent with its own libvirtd in a private
mount namespace; tiny guests on qcow2 overlays); with `--testbed`, two hosts on two sites of `discovery
testbed up --hypervisor qemu` (each a network and mount namespace whose agent uses the host's system
libvirtd; memory and disk go between the hosts' addresses through the router, delayed by `--site-rtt` and
limited to `--bandwidth` by HTB). Two guests run side by side, and each round moves each of them once, to
the other node, interleaved so that both see the same machine load:

- `agents_live`: `ve relocate --method live` of a one-VM VE through the agent that does not host it:
  directory reads and writes, reservation, the target's empty overlay, then libvirt's peer-to-peer
  live migration with incremental disk copy, the target's adoption and the source's clean-up;
- `by_hand`: the same migration of a guest defined directly in the same daemons, as an operator
  would do it: the overlay made on the target first (not timed), then
  `virsh migrate --live --p2p --copy-storage-inc --persistent --undefinesource DOMAIN DEST tcp://HOST`
  (HOST: the target daemon's, 127.0.0.1 or the testbed host's address);
- `agents_ship`: `ve relocate --method ship`: the VM is stopped into a managed save image, the target
  pulls the image and the disk over the agents' TLS RPC, and restores it; the VM is down throughout.

The two guests start on different nodes, so both daemons have started a QEMU (and cached its
capabilities) before the first timed move. Time is the caller's wall clock for the whole command.
Downtime of a live migration is libvirt's own figure (the completed job's `downtime` on the
destination); a shipped VM's downtime is the agent's transfer time (stopped at the save, running
again once restored). Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import libvirt
import trio
from harness import guest_dirs, local_cluster, pyplot, save, share_images, testbed, wait_ready  # beside this script
from stats import summary_ms

from agents.hypervisor.libvirtd import GUESTS
from agents.hypervisor.qemu import prepare_guest
from agents.hypervisor.qemu_xml import domain_xml
from discovery.cli.local_cluster import SYSTEM_DATA, TINY_IMAGE
from images import tinyguest
from overlay.wire import tls
from overlay.wire.rpc import Transport

BY_HAND = "byhand"


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="moves of each kind")
    parser.add_argument("--memory-mb", type=int, default=128)
    parser.add_argument("--plot", help="PNG: time and downtime of each kind of move")
    parser.add_argument("--testbed", action="store_true", help="two testbed hosts on two sites (root)")
    parser.add_argument("--bandwidth", type=float, default=100.0, help="--testbed: each host's link, Mbit/s")
    parser.add_argument("--site-rtt", type=float, default=10.0, help="--testbed: the RTT between the sites, ms")
    return parser.parse_args()


class Bench:
    def __init__(self, state: dict[str, Any], identity: tls.Identity, memory_mb: int) -> None:
        self.nodes = [n["name"] for n in state["nodes"]]
        self.addr = {n["name"]: n["addr"] for n in state["nodes"]}
        self.uri, self.host = {}, {}
        for node in state["nodes"]:
            config = tomllib.loads(Path(node["config"]).read_text())
            self.host[node["name"]] = node["addr"].rpartition(":")[0]
            port = f":{config['libvirtd_port']}" if "libvirtd_port" in config else ""  # else the system's own
            self.uri[node["name"]] = f"qemu+tcp://{self.host[node['name']]}{port}/system"
        self.guests = guest_dirs(state)
        self.seen_as = Path(SYSTEM_DATA) / "guests" if state["hypervisor"] == "qemu-system" else GUESTS
        self.identity = identity
        self.memory_mb = memory_mb
        self.image, self.accel, _ = prepare_guest()

    async def call(self, node: str, method: str, args: dict[str, Any], timeout: float = 600.0) -> Any:
        async with Transport(self.identity, node="bench") as transport:
            return await transport.call(self.addr[node], method, args, timeout=timeout)

    def other(self, node: str) -> str:
        return next(n for n in self.nodes if n != node)

    def downtime_ms(self, node: str, domain: str) -> float | None:
        """libvirt's downtime of the migration that brought `domain` to `node` (its completed job)."""
        conn = libvirt.open(self.uri[node])
        try:
            return conn.lookupByName(domain).jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED).get("downtime")
        finally:
            conn.close()

    # -- through the agents --

    async def create_ve(self) -> str:
        spec = {"name": "bench", "vms": [{"name": "vm", "vcpus": 1, "memory_mb": self.memory_mb, "disk_gb": 1,
                                                   "image": TINY_IMAGE}]}
        created = await self.call(self.nodes[0], "ve.create", {"spec": spec})
        node = created["placement"]["vm"]["node"]
        wait_ready(self.guests[node] / "bench--vm.log")
        return node

    async def relocate(self, where: str, method: str) -> dict[str, Any]:
        target = self.other(where)
        started = time.monotonic()
        moved = await self.call(target, "ve.relocate", {"name": "bench", "vm": "vm", "to": target, "method": method})
        wall = time.monotonic() - started
        transfer = moved["placement"]["vm"]["transfer"]
        downtime = self.downtime_ms(target, "bench:vm") if method == "live" else transfer["seconds"] * 1000
        return {"node": target, "wall": wall, "downtime_ms": downtime, "transfer_s": transfer["seconds"]}

    # -- by hand --

    def define_by_hand(self, node: str) -> None:
        disk = self.guests[node] / f"{BY_HAND}.qcow2"
        tinyguest.make_overlay(self.image.base, disk)
        xml = domain_xml(BY_HAND, self.image, self.seen_as / disk.name, self.seen_as / f"{BY_HAND}.log",
                         accel=self.accel, memory_mib=self.memory_mb)
        conn = libvirt.open(self.uri[node])
        try:
            conn.defineXML(xml).create()
        finally:
            conn.close()
        wait_ready(self.guests[node] / f"{BY_HAND}.log")

    def migrate_by_hand(self, where: str) -> dict[str, Any]:
        target = self.other(where)
        tinyguest.make_overlay(self.image.base, self.guests[target] / f"{BY_HAND}.qcow2")
        argv = ["virsh", "-c", self.uri[where], "migrate", "--live", "--p2p", "--copy-storage-inc", "--persistent",
                "--undefinesource", BY_HAND, self.uri[target], f"tcp://{self.host[target]}"]
        started = time.monotonic()
        proc = subprocess.run(argv, capture_output=True, text=True)
        wall = time.monotonic() - started
        if proc.returncode != 0:
            raise SystemExit(f"virsh migrate failed: {proc.stderr.strip()}")
        (self.guests[where] / f"{BY_HAND}.qcow2").unlink()
        return {"node": target, "wall": wall, "downtime_ms": self.downtime_ms(target, BY_HAND)}

    def remove_by_hand(self, node: str) -> None:
        conn = libvirt.open(self.uri[node])
        try:
            dom = conn.lookupByName(BY_HAND)
            dom.destroy()
            dom.undefine()
        finally:
            conn.close()


def summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
    downtimes = [s["downtime_ms"] / 1000 for s in samples if s["downtime_ms"] is not None]
    return {"runs": len(samples), "time_ms": summary_ms([s["wall"] for s in samples]),
            "downtime_ms": summary_ms(downtimes), "each_ms": [round(s["wall"] * 1000) for s in samples]}


async def measure(bench: Bench, runs: int) -> dict[str, list[dict[str, Any]]]:
    results: dict[str, list[dict[str, Any]]] = {"agents_live": [], "by_hand": [], "agents_ship": []}
    agent_node = await bench.create_ve()
    hand_node = bench.other(agent_node)  # both daemons have run a guest before the first timed move
    bench.define_by_hand(hand_node)
    try:
        for _ in range(runs):
            sample = await bench.relocate(agent_node, "live")
            agent_node = sample["node"]
            results["agents_live"].append(sample)
            sample = await trio.to_thread.run_sync(bench.migrate_by_hand, hand_node)
            hand_node = sample["node"]
            results["by_hand"].append(sample)
        for _ in range(runs):
            sample = await bench.relocate(agent_node, "ship")
            agent_node = sample["node"]
            results["agents_ship"].append(sample)
    finally:
        bench.remove_by_hand(hand_node)
        await bench.call(bench.nodes[0], "ve.destroy", {"name": "bench"})
    return results


def plot(results: dict[str, list[dict[str, Any]]], path: str) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    kinds = list(results)
    left.boxplot([[s["wall"] * 1000 for s in results[k]] for k in kinds], tick_labels=kinds)
    left.set_ylabel("time of the whole move (ms)")
    right.boxplot([[s["downtime_ms"] for s in results[k] if s["downtime_ms"] is not None] for k in kinds],
                  tick_labels=kinds)
    right.set_ylabel("guest downtime (ms)")
    right.set_yscale("log")
    save(fig, path)


def main() -> None:
    args = parse()
    with tempfile.TemporaryDirectory(prefix="discovery-migration-") as tmp:
        share_images(Path(tmp))
        cluster = (testbed(Path(tmp), 2, 2, args.bandwidth, args.site_rtt, hypervisor="qemu") if args.testbed
                   else local_cluster(Path(tmp), 2, 1, hypervisor="qemu"))
        with cluster as (state, identity):
            bench = Bench(state, identity, args.memory_mb)
            results = trio.run(measure, bench, args.runs)
    live, hand = summarize(results["agents_live"]), summarize(results["by_hand"])
    where = ({"testbed": {"bandwidth_mbit": args.bandwidth, "site_rtt_ms": args.site_rtt}} if args.testbed
             else {"testbed": None})
    report = {"guest_memory_mb": args.memory_mb, "accel": bench.accel, **where,
              **{k: summarize(v) for k, v in results.items()},
              "overhead_ratio_p50": round(live["time_ms"]["p50"] / hand["time_ms"]["p50"], 3),
              "overhead_ratio_mean": round(live["time_ms"]["mean"] / hand["time_ms"]["mean"], 3)}
    json.dump(report, sys.stdout, indent=2)
    print()
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
