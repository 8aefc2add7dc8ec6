"""Latency of each VE lifecycle operation through random agents of a local cluster, printed as JSON.

    python benchmarks/ve_lifecycle.py --nodes 12 --sites 4 --ves 30 [--vms 2] [--seed 1] [--plot out.png]
                                      [--testbed [--bandwidth MBIT]]

`--ves` VEs of `--vms` VMs each (1 vCPU, 256 MiB) go through every operation, one operation at a time
over all the VEs (in a shuffled order each time) so that the samples of one operation are spread over
the run: create, show, locate, suspend, resume, snapshot, stop, start, relocate (the whole VE, to a
random other site; with `--sites 1`, to a random node that hosts none of its VMs), restore (to the
snapshot, after the relocation), destroy. Each request is sent, as the CLI sends it, to an agent
chosen at random among those that host none of the VE's VMs, so the coordinator always reaches the
hosts over the network; `create` goes to any agent (its VMs are not placed yet, and placement tries
the coordinator first). The cluster is `discovery.cli.local_cluster.up`'s: the transport delays each frame
between two sites by half their emulated RTT. With `--testbed` (root) the same agents run on
`discovery testbed up`'s network namespaces instead (the same sites and RTTs; the router's relay delays every
packet between sites, and HTB limits each node's link to `--bandwidth`), with the testbed's default capacity.

A request that fails is counted in `errors` (with its message) and the VE skips its later operations;
nothing here asserts a time: it is a measurement.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
from harness import capacity, cluster_parser, local_cluster, pyplot, save, testbed  # benchmarks/, beside this
from stats import summary_ms

from discovery.testbed import bed
from discovery.ve.spec import VESpec, VMSpec
from overlay.wire import tls
from overlay.wire.rpc import RpcError, Transport

OPERATIONS = ("create", "show", "locate", "suspend", "resume", "snapshot", "stop", "start", "relocate", "restore",
              "destroy")
TIMEOUTS = {"relocate": 600.0, "snapshot": 300.0, "restore": 300.0}  # the CLI's; 60 s for the others
TAG = "bench"
VCPUS, MEMORY_MB = 64, 65536  # per node: room for every VE on any node (the local cluster's)


class Lifecycle:
    def __init__(self, state: dict[str, Any], identity: tls.Identity, ves: int, vms: int, seed: int) -> None:
        self.nodes = state["nodes"]
        self.sites = state["sites"]
        self.identity = identity
        self.rng = random.Random(seed)
        self.specs = [VESpec(f"life-{i}", tuple(VMSpec(f"vm{j}", 1, 256, 1, "none") for j in range(vms)))
                      for i in range(ves)]
        self.placement: dict[str, dict[str, dict[str, Any]]] = {}  # VE -> its VMs' slots, as last answered
        self.failed: set[str] = set()
        self.samples: dict[str, list[float]] = {op: [] for op in OPERATIONS}
        self.other_site: dict[str, int] = dict.fromkeys(OPERATIONS, 0)  # requests entering at a site no VM is in
        self.errors: dict[str, list[str]] = {op: [] for op in OPERATIONS}

    def args(self, op: str, spec: VESpec) -> dict[str, Any]:
        if op == "create":
            return {"spec": spec.to_dict()}
        if op in ("snapshot", "restore"):
            return {"name": spec.name, "tag": TAG}
        if op == "relocate":  # to another site; with one site, to a node that hosts none of its VMs
            slots = self.placement[spec.name].values()
            sites = [s for s in self.sites if s not in {slot["site"] for slot in slots}]
            if sites:
                return {"name": spec.name, "vm": None, "to": None, "site": self.rng.choice(sites)}
            nodes = [n["name"] for n in self.nodes if n["name"] not in {slot["node"] for slot in slots}]
            return {"name": spec.name, "vm": None, "to": self.rng.choice(nodes), "site": None}
        return {"name": spec.name}

    def entry(self, op: str, spec: VESpec) -> dict[str, Any]:
        """The agent the request goes to: any for create, else one that hosts none of the VE's VMs."""
        if op == "create":
            return self.rng.choice(self.nodes)
        hosts = {slot["node"] for slot in self.placement[spec.name].values()}
        return self.rng.choice([n for n in self.nodes if n["name"] not in hosts] or self.nodes)

    async def run(self) -> None:
        async with Transport(self.identity, node="bench") as transport:
            for op in OPERATIONS:
                order = [s for s in self.specs if s.name not in self.failed]
                self.rng.shuffle(order)
                for spec in order:
                    await self.one(transport, op, spec)

    async def one(self, transport: Transport, op: str, spec: VESpec) -> None:
        node, args = self.entry(op, spec), self.args(op, spec)
        start = time.perf_counter()
        try:
            answer = await transport.call(node["addr"], f"ve.{op}", args, timeout=TIMEOUTS.get(op, 60.0))
        except RpcError as err:
            self.errors[op].append(f"{spec.name} via {node['name']}: {err}")
            self.failed.add(spec.name)
            return
        self.samples[op].append(time.perf_counter() - start)
        if op == "create":
            self.placement[spec.name] = answer["placement"]
        sites = {slot["site"] for slot in self.placement[spec.name].values()}  # before a relocation
        self.other_site[op] += node["site"] not in sites
        if op == "relocate":
            self.placement[spec.name] = answer["placement"]


def report(bench: Lifecycle, args: argparse.Namespace, state: dict[str, Any], elapsed: float) -> dict[str, Any]:
    rtts = sorted({ms for a, row in state["rtt_ms"].items() for b, ms in row.items() if a != b})
    per_site = {site: sum(n["site"] == site for n in state["nodes"]) for site in state["sites"]}
    room = capacity(state)
    operations = {}
    for op in OPERATIONS:
        operations[op] = {"count": len(bench.samples[op]), **summary_ms(bench.samples[op]),
                          "entered_at_another_site": bench.other_site[op], "errors": len(bench.errors[op])}
    return {
        "benchmark": "ve_lifecycle",
        "cluster": {"nodes": args.nodes, "sites": state["sites"], "nodes_per_site": per_site,
                    "inter_site_rtt_ms": [rtts[0], rtts[-1]] if rtts else None, "local_rtt_ms": args.local_rtt_ms,
                    "vcpus_per_node": room["vcpus"], "memory_mb_per_node": room["memory_mb"],
                    "testbed_mbit": args.bandwidth if args.testbed else None},
        "ves": args.ves, "vms_per_ve": args.vms, "seed": args.seed, "wall_seconds": round(elapsed, 1),
        "latency_ms": operations,
        "errors": {op: msgs for op, msgs in bench.errors.items() if msgs},
    }


def plot(path: str, bench: Lifecycle, title: str) -> None:
    plt = pyplot()
    ops = [op for op in OPERATIONS if bench.samples[op]]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.boxplot([[s * 1000 for s in bench.samples[op]] for op in ops], whis=(1, 99), showfliers=True,
               flierprops={"markersize": 3})
    ax.set_xticks(range(1, len(ops) + 1), ops, rotation=30)
    ax.set_yscale("log")
    from matplotlib.ticker import ScalarFormatter  # after pyplot() has chosen the backend

    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.set_ylabel("latency (ms, log scale)")
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    save(fig, path)


def main() -> None:
    parser = cluster_parser(__doc__, ves=30, plot="write a box plot of each operation's latency to this PNG")
    parser.add_argument("--vms", type=int, default=2, help="VMs per VE")
    parser.add_argument("--local-rtt-ms", type=float, default=0.0, help="emulated RTT inside a site")
    parser.add_argument("--testbed", action="store_true", help="on `discovery testbed up` (root) instead")
    parser.add_argument("--bandwidth", type=float, default=100.0, help="with --testbed: each node's link, Mbit/s")
    args = parser.parse_args()
    if args.testbed and args.local_rtt_ms:
        parser.error("--local-rtt-ms is the local cluster's: the testbed has none inside a site")

    with tempfile.TemporaryDirectory(prefix="discovery-bench-") as tmp:
        running = (testbed(Path(tmp), args.nodes, args.sites, args.bandwidth) if args.testbed else
                   local_cluster(Path(tmp), args.nodes, args.sites, vcpus=VCPUS, memory_mb=MEMORY_MB,
                                 local_rtt_ms=args.local_rtt_ms))
        with running as (state, identity):
            bench = Lifecycle(state, identity, args.ves, args.vms, args.seed)
            start = time.perf_counter()
            trio.run(bench.run)
            elapsed = time.perf_counter() - start
            result = report(bench, args, state, elapsed)
            if args.testbed:  # at most a second old, background traffic included
                result["relay_packets"] = bed.status(Path(state["dir"]))["relay_packets"]

    if args.plot:
        where = f"the testbed ({args.bandwidth:g} Mbit/s links)" if args.testbed else "a local cluster"
        plot(args.plot, bench, f"VE lifecycle latency: {args.ves} VEs of {args.vms} VMs, {args.nodes} agents on "
                               f"{args.sites} sites, {where}\n(box: quartiles and median, whiskers: p1-p99)")
        result["plot"] = args.plot
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
