"""One `discovery top` refresh on a local cluster: its answer's size in bytes and its time; print JSON.

    python benchmarks/top_refresh.py --nodes 12 --sites 4 --ves 24 --samples 50

A refresh is one `top.cluster` call on one kept connection, as the CLI makes it. Beside it, what a client
would move and wait for if it asked each member itself for the same facts (`host.info` and `dvms.status` of
every member, and one `agent.members`), all at once on the same connection: the shape `top` avoids.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack
import trio
from harness import cluster_parser, local_cluster  # benchmarks/harness.py, beside this script
from stats import summary_ms

from discovery.ve.spec import VESpec, VMSpec
from overlay.wire import tls
from overlay.wire.rpc import Transport


def size(answer: Any) -> int:
    return len(msgpack.packb(answer))


async def measure(identity: tls.Identity, addrs: list[str], ves: int, samples: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    async with Transport(identity, node="bench") as transport:
        for i in range(ves):  # something to show: VMs on the nodes, and their creation among the events
            spec = VESpec(f"top-{i}", (VMSpec("vm", 1, 512, 1, "none"),))
            await transport.call(rng.choice(addrs), "ve.create", {"spec": spec.to_dict()}, timeout=60)
        agent = addrs[0]
        query = {"events": 12, "migrations": 8, "deadline": 2.0}
        while not all("usage" in n for n in (await transport.call(agent, "top.cluster", query))["nodes"]):
            await trio.sleep(0.2)
        refresh, sizes = [], []
        for _ in range(samples):
            start = time.perf_counter()
            answer = await transport.call(agent, "top.cluster", query, timeout=10)
            refresh.append(time.perf_counter() - start)
            sizes.append(size(answer))
        largest = await transport.call(agent, "top.cluster", {"events": 64, "migrations": 50}, timeout=10)
        direct, direct_bytes = [], 0
        for _ in range(samples):
            start = time.perf_counter()
            members = await transport.call(agent, "agent.members", {})
            live = [m["addr"] for m in members if m["status"] == "alive"]
            infos = await transport.call_many(live, "host.info", {}, timeout=10)
            statuses = await transport.call_many(live, "dvms.status", {}, timeout=10)
            direct.append(time.perf_counter() - start)
            direct_bytes = size(members) + sum(size(a) for a in [*infos.values(), *statuses.values()])
        return {"refresh_ms": summary_ms(refresh), "answer_bytes": max(sizes), "nodes": len(answer["nodes"]),
                "events": len(answer["events"]), "migrations": len(answer["migrations"]),
                "answer_bytes_at_most_events_and_migrations": size(largest),
                "per_member_calls": {"calls": 1 + 2 * len(live), "bytes": direct_bytes, "ms": summary_ms(direct)}}


def main() -> None:
    parser = cluster_parser(__doc__, ves=24, plot="unused")
    parser.add_argument("--samples", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="discovery-bench-") as tmp, \
            local_cluster(Path(tmp), args.nodes, args.sites) as (state, identity):
        result = trio.run(measure, identity, [n["addr"] for n in state["nodes"]], args.ves, args.samples, args.seed)
    json.dump({"benchmark": "top_refresh", "cluster_nodes": args.nodes, "sites": args.sites, "ves": args.ves,
               "samples": args.samples, **result}, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
