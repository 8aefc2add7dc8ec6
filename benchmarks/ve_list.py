"""Latency of `ve list` through random agents of a local cluster as the number of VEs grows, printed as JSON.

    python benchmarks/ve_list.py --nodes 12 --sites 4 --sizes 0,100,400 [--samples 20] [--limit 100]

VEs of one VM (1 vCPU, 128 MiB) are created through random agents until each size of `--sizes` is
reached; at each size, `--samples` listings through random agents are timed: the first page (`--limit`
VEs) and the whole listing (every page, following `next_cursor`). An agent whose `ve.list` answers a
plain list (before the index: every member asked for its records, the whole directory in one answer)
is measured the same way, so one command gives the figures before and after. The cluster is
`discovery.cli.local_cluster.up`'s, with its emulated WAN latency between sites.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
from harness import cluster_parser, local_cluster  # benchmarks/harness.py, beside this script
from stats import summary_ms

from discovery.ve.spec import VESpec, VMSpec
from overlay.wire import tls
from overlay.wire.rpc import Transport

VCPUS, MEMORY_MB = 64, 65536
CREATE_AT_ONCE = 8


async def measure(state: dict[str, Any], identity: tls.Identity, sizes: list[int], samples: int, limit: int,
                  seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    nodes = state["nodes"]
    created = 0
    figures = []
    async with Transport(identity, node="bench") as transport:

        async def create(i: int) -> None:
            spec = VESpec(f"list-{i:05d}", (VMSpec("vm", 1, 128, 1, "none"),))
            await transport.call(rng.choice(nodes)["addr"], "ve.create", {"spec": spec.to_dict()}, timeout=60)

        async def listing(addr: str, whole: bool) -> tuple[int, int]:
            """(VEs listed, pages) for one listing through `addr`."""
            count, pages, cursor = 0, 0, None
            while True:
                page = await transport.call(addr, "ve.list", {"limit": limit, "cursor": cursor}, timeout=120)
                pages += 1
                if isinstance(page, list):  # before the index: everything at once
                    return len(page), pages
                count += len(page["ves"])
                cursor = page["next_cursor"]
                if cursor is None or not whole:
                    return count, pages

        for size in sizes:
            while created < size:
                batch = range(created, min(size, created + CREATE_AT_ONCE))
                async with trio.open_nursery() as nursery:
                    for i in batch:
                        nursery.start_soon(create, i)
                created = batch.stop
            figure: dict[str, Any] = {"ves": size}
            for what in ("first_page", "whole"):
                times, listed = [], set()
                for _ in range(samples):
                    start = time.perf_counter()
                    count, pages = await listing(rng.choice(nodes)["addr"], what == "whole")
                    times.append(time.perf_counter() - start)
                    listed.add((count, pages))
                figure[what] = {**summary_ms(times), "listed_and_pages": sorted(listed)}
            figures.append(figure)
    return figures


def main() -> None:
    parser = cluster_parser(__doc__, ves=0, plot="unused")
    parser.add_argument("--sizes", default="0,100,400", help="numbers of VEs to measure at, increasing")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--limit", type=int, default=100)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with (tempfile.TemporaryDirectory(prefix="discovery-bench-") as tmp,
          local_cluster(Path(tmp), args.nodes, args.sites, vcpus=VCPUS, memory_mb=MEMORY_MB) as (state, identity)):
        start = time.perf_counter()
        figures = trio.run(measure, state, identity, sizes, args.samples, args.limit, args.seed)
    json.dump({"nodes": args.nodes, "sites": args.sites, "limit": args.limit, "samples": args.samples,
               "seconds": round(time.perf_counter() - start, 1), "sizes": figures}, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
