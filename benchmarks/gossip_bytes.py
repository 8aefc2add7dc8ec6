"""Bytes per membership probe, full tables (the old wire) against piggybacked deltas; prints JSON.

    python benchmarks/gossip_bytes.py [--sizes 100 1000 5000] [--rounds 30] [--seed 1]

For each cluster size N, a steady-state cluster of sans-IO `Membership` nodes (no network, direct
method calls, `overlay.membership.simulate_round`) with 8-D Vivaldi coordinates runs a warm-up of 10
rounds and then `--rounds` measured rounds of this workload: one member in ten moves its coordinate
each round, and every 10 rounds one member crashes and a new one joins through a random seed.
Every probe and every answer is packed with msgpack, as the transport frames it.

- `full_table`: the probe of the old wire, {"members": table}, at that N (its answer is as big);
- `delta_probe`: mean and max of the delta probes, {"updates": [...]}; `delta_answer` likewise;
- `amortized_probe`: the mean over all probes, the full-state syncs (one round in `sync_every`) included.

N = 5,000 holds 25 M table entries in memory (~4.2 GB) and takes about 10 minutes.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

import msgpack

from overlay.membership import Membership, simulate_round, simulated_cluster

DIMENSIONS = 8


def coordinate(rng: random.Random) -> list:
    """A coordinate as `vivaldi.coordinate.Coordinate.to_wire` sends it: vector, error, adjustment, height."""
    return [[rng.gauss(0, 0.05) for _ in range(DIMENSIONS)], rng.random(), rng.gauss(0, 0.001), rng.random() / 100]


def size(message: object) -> int:
    return len(msgpack.packb(message, use_bin_type=True))


def measure(n: int, rounds: int, seed: int, warmup: int = 10) -> dict[str, object]:
    rng = random.Random(seed)
    started = time.monotonic()
    nodes = simulated_cluster(n, seed, coordinate=coordinate)
    full_table = size(next(iter(nodes.values())).message(full=True))
    probes: list[int] = []
    deltas: list[int] = []
    answers: list[int] = []
    joined = 0
    for r in range(1, warmup + rounds + 1):
        for node in nodes.values():
            if rng.random() < 0.1:
                node.set_own_coordinate(coordinate(rng), node.me.coord_seq + 1)
        if r % 10 == 0:
            del nodes[rng.choice(list(nodes))]
            joined += 1
            newcomer = Membership(f"new-{joined}", f"192.168.{joined >> 8}.{joined & 255}:7946", "site-0",
                                  rng=random.Random(rng.random()))
            newcomer.set_own_coordinate(coordinate(rng), 1)
            reply, _ = nodes[rng.choice(list(nodes))].answer(newcomer.message(full=True), r)
            newcomer.receive(reply, r)
            nodes[newcomer.me.name] = newcomer
        sent = simulate_round(nodes, float(r))
        if r <= warmup:
            continue
        for probe, answer in sent:
            probes.append(size(probe))
            if "updates" in probe:
                deltas.append(probes[-1])
                if answer is not None:
                    answers.append(size(answer))
    return {"nodes": n, "full_table": full_table,
            "delta_probe": {"mean": round(statistics.fmean(deltas)), "max": max(deltas)},
            "delta_answer": {"mean": round(statistics.fmean(answers)), "max": max(answers)},
            "amortized_probe": round(statistics.fmean(probes)),
            "probes": len(probes), "seconds": round(time.monotonic() - started, 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    results = []
    for n in args.sizes:
        results.append(measure(n, args.rounds, args.seed))
        print(json.dumps(results[-1]), file=sys.stderr)
    print(json.dumps({"sync_every": Membership("x", "x:1", "x").sync_every, "rounds": args.rounds,
                      "results": results}, indent=2))


if __name__ == "__main__":
    main()
