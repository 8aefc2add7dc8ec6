"""Create VEs through random agents of a local cluster; print latency, throughput and agent memory as JSON.

    python benchmarks/ve_create.py --nodes 12 --sites 4 --ves 200 [--concurrency 1] [--plot out.png]

The baseline beside it is the floor: the same VM defined and started directly on an embedded
libvirt `test:///` host in this process, with no network, placement or directory involved.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio
from harness import cluster_parser, local_cluster, pyplot, save  # benchmarks/harness.py, beside this script
from stats import rss_mib, summary_ms

from agents.hypervisor.actor import Hypervisor, domain_xml, write_node_xml
from discovery.ve.spec import VESpec, VMSpec
from overlay.wire import tls
from overlay.wire.rpc import Transport


async def create_all(identity: tls.Identity, addrs: list[str], count: int, concurrency: int,
                     seed: int) -> tuple[list[float], float]:
    rng = random.Random(seed)
    latencies: list[float] = []
    limiter = trio.CapacityLimiter(concurrency)
    async with Transport(identity, node="bench") as transport:
        async def one(i: int) -> None:
            spec = VESpec(f"bench-{i}", (VMSpec("vm", 1, 256, 1, "none"),))
            async with limiter:
                start = time.perf_counter()
                await transport.call(rng.choice(addrs), "ve.create", {"spec": spec.to_dict()}, timeout=60)
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(one, i)
        return latencies, time.perf_counter() - start


async def local_baseline(directory: Path, count: int) -> list[float]:
    hypervisor = Hypervisor.open(write_node_xml(directory / "baseline.xml", 1024, 1 << 20))
    latencies = []
    try:
        for i in range(count):
            start = time.perf_counter()
            await hypervisor.define(domain_xml(f"base-{i}", 1, 256))
            await hypervisor.start(f"base-{i}")
            latencies.append(time.perf_counter() - start)
    finally:
        await hypervisor.close()
    return latencies


def plot(path: str, latencies: list[float], baseline: list[float]) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for values, label in ((latencies, "ve create via a random agent"), (baseline, "local libvirt define+start")):
        ms = sorted(v * 1000 for v in values)
        ax.plot(ms, [(i + 1) / len(ms) for i in range(len(ms))], label=label)
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("VE creation latency (CDF)")
    ax.legend()
    ax.grid(True, alpha=0.3)
    save(fig, path)


def main() -> None:
    parser = cluster_parser(__doc__, ves=200, plot="write a latency CDF to this PNG")
    parser.add_argument("--concurrency", type=int, default=1)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="discovery-bench-") as tmp:
        directory = Path(tmp)
        with local_cluster(directory, args.nodes, args.sites, vcpus=64, memory_mb=65536) as (state, identity):
            pids = [n["pid"] for n in state["nodes"]]
            rss_before = [rss_mib(p) for p in pids]
            latencies, elapsed = trio.run(create_all, identity, [n["addr"] for n in state["nodes"]], args.ves,
                                          args.concurrency, args.seed)
            rss_after = [rss_mib(p) for p in pids]
        baseline = trio.run(local_baseline, directory, args.ves)

    result = {
        "benchmark": "ve_create", "nodes": args.nodes, "sites": args.sites, "ves": args.ves,
        "concurrency": args.concurrency, "seed": args.seed,
        "create_latency_ms": summary_ms(latencies),
        "ves_per_second": round(args.ves / elapsed, 2),
        "agent_rss_mib": {"idle_mean": round(statistics.fmean(rss_before), 1),
                          "after_mean": round(statistics.fmean(rss_after), 1),
                          "after_max": round(max(rss_after), 1)},
        "baseline_local_define_start_ms": summary_ms(baseline),
    }
    if args.plot:
        plot(args.plot, latencies, baseline)
        result["plot"] = args.plot
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
