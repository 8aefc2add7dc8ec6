"""`discovery sim overlay`: the production Chord code on thousands of simulated nodes.

Every node runs `overlay.ring.Ring` (the agents' ring shell and its sans-IO core) over
`overlay.wire.memnet`, with per-pair latency from a measured RTT matrix (node i sits on host i mod M) or
from the local cluster's site model, under `memnet.SimClock` (virtual time). Every node also runs the
production Vivaldi client (`vivaldi.coordinate.Client`), fed as in agents by the RTT of every RPC it
makes, answers carrying its coordinate; proximity neighbour selection uses each node's own estimate
(`pns="vivaldi"`) or, as an upper bound, the exact RTT (`pns="oracle"`). The ring starts converged
(each node's successors, predecessor and fingers as stabilization would leave them; coordinates at
the origin), then runs its normal maintenance while lookups from random nodes for random keys are
measured, and churn replaces a share of the nodes per minute (a crash plus a join through the
protocol). The same seed gives the same run.

A lookup *succeeds* when it returns an owner before its deadline; it is *correct* when that owner is
the true successor of the key among the nodes in the ring when the lookup ended.
"""

from __future__ import annotations

import bisect
import math
import random
import resource
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from overlay.chord import ID_BITS, Peer
from overlay.ring import Ring
from overlay.wire.memnet import MemNetwork, SimClock, sleep
from overlay.wire.rpc import RequestError, RpcError
from overlay.wire.wan import SITES, rtt_matrix
from vivaldi.coordinate import Client, Coordinate

PNS_MODES = ("off", "vivaldi", "oracle")


@dataclass
class Stats:
    hops: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    failed: int = 0
    incorrect: int = 0
    joins: int = 0
    joins_failed: int = 0
    joins_crashed: int = 0  # the joining node was itself picked to crash
    join_attempts: int = 0
    crashes: int = 0
    outcomes: list[int | None] = field(default_factory=list)  # hops of each recorded lookup, None if it failed
    vivaldi_errors: list[float | None] = field(default_factory=list)  # median error at the end of each minute


class Simulation:
    def __init__(self, nodes: int, seed: int, latency_matrix: Any = None, sites: int = 4,
                 ring_interval: float = 5.0, r: int = 8, pns: bool | str = False, fingers: bool = True,
                 learning: bool = True, coordinates: bool = True) -> None:
        """`pns`: proximity neighbour selection by "vivaldi" (each node's own estimate, as agents do;
        True means this), by "oracle" (the exact RTT, an upper bound) or "off" (False). `coordinates`:
        every node runs a Vivaldi client fed by the RTT of each RPC it makes."""
        if isinstance(pns, bool):
            pns = "vivaldi" if pns else "off"
        if pns not in PNS_MODES:
            raise ValueError(f"pns must be one of {', '.join(PNS_MODES)}, not {pns!r}")
        if pns == "vivaldi" and not coordinates:
            raise ValueError("proximity by Vivaldi estimates needs coordinates")
        self.seed = seed
        self.rng = random.Random(seed)
        self.matrix = latency_matrix
        self.sites = SITES[:sites]
        self.site_rtt = rtt_matrix(self.sites)
        self.ring_interval = ring_interval
        self.r = r
        self.pns = pns
        self.coordinates = coordinates
        self.clients: dict[str, Client] = {}  # address -> that node's Vivaldi client
        self.fingers = fingers
        self.learning = learning
        self.net = MemNetwork(self.latency, check_answers=False)  # every Ring call `ask`s: checked on arrival
        self.rings: dict[str, Ring] = {}
        self.addrs: list[str] = []  # the addresses of `rings`, for O(1) random picks
        self._slot: dict[str, int] = {}
        self.ids: list[int] = []  # sorted ids of the nodes in the ring, the ground truth
        self.joining: set[str] = set()  # addresses of the nodes whose join has not completed
        self.by_id: dict[int, Ring] = {}
        self.stats = Stats()
        self.t0 = 0.0  # virtual time at which the run started
        self._next = 0
        for _ in range(nodes):
            self._add_node()
        self._converge()

    # -- topology ----------------------------------------------------------------------------------

    def latency(self, a: str, b: str) -> float:
        """One-way seconds between two simulated addresses ("sim:<index>")."""
        i, j = int(a[4:]), int(b[4:])
        if i == j:
            return 0.0
        if self.matrix is not None:
            m = len(self.matrix)
            if i % m == j % m:  # two nodes on one host
                return 0.00025
            rtt = self.matrix[i % m][j % m]
            return rtt / 2 if rtt == rtt else 0.05  # NaN: unmeasured
        sa, sb = self.sites[i % len(self.sites)], self.sites[j % len(self.sites)]
        return (0.0005 if sa == sb else self.site_rtt[sa][sb] / 1000) / 2

    def _add_node(self) -> Ring:
        index = self._next
        self._next += 1
        addr, name = f"sim:{index}", f"n{index}"
        site = self.sites[index % len(self.sites)]
        transport = self.net.endpoint(addr, name, site)
        distance = None
        if self.coordinates:
            client = self.clients[addr] = Client(rng=random.Random(self.seed * 1_000_003 + index))
            self._attach(transport, client)
            if self.pns == "vivaldi":
                distance = self._estimator(client)
        if self.pns == "oracle":
            distance = self._oracle(addr)
        ring = Ring(transport, name, addr, site, r=self.r, distance=distance, learn=self.learning)
        self._enter(ring)
        bisect.insort(self.ids, ring.me.id)
        self.by_id[ring.me.id] = ring
        return ring

    @staticmethod
    def _attach(transport: Any, client: Client) -> None:
        """What `agents.coordinates` does: answers carry our coordinate, every answered call is a sample."""
        transport.stamp = lambda: client.coordinate

        def on_rtt(peer: str, rtt: float, stamp: Any) -> None:
            if isinstance(stamp, Coordinate):
                try:  # noqa: SIM105 - once per RPC: contextlib.suppress costs more than the try
                    client.update(peer, stamp, rtt)
                except ValueError:
                    pass  # a sample the client refuses (e.g. RTT 0 between two nodes of one host)

        transport.on_rtt = on_rtt

    def _oracle(self, addr: str) -> Any:
        """The exact RTT to a peer: what no node knows, the upper bound of proximity selection (None
        for a crashed peer, as membership would have it)."""
        return lambda peer: 2 * self.latency(addr, peer.addr) if peer.addr in self.rings else None

    def _estimator(self, client: Client) -> Any:
        """A node's Vivaldi estimate of the RTT to a peer, from the peer's current coordinate (agents get
        it from the membership gossip; here it is fresh, without the dissemination delay)."""
        clients = self.clients

        def estimate(peer: Peer) -> float | None:
            other = clients.get(peer.addr)
            return client.distance_to(other.coordinate) if other is not None else None

        return estimate

    def vivaldi_error(self, pairs: int, rng: random.Random) -> float | None:
        """Median relative error |estimate - RTT| / RTT over random pairs of live nodes."""
        if not self.coordinates or len(self.addrs) < 2:
            return None
        errors = []
        for _ in range(pairs):
            a, b = rng.sample(self.addrs, 2)
            rtt = 2 * self.latency(a, b)
            errors.append(abs(self.clients[a].distance_to(self.clients[b].coordinate) - rtt) / rtt)
        return statistics.median(errors)

    def _enter(self, ring: Ring) -> None:
        addr = ring.transport.addr
        self.rings[addr] = ring
        self._slot[addr] = len(self.addrs)
        self.addrs.append(addr)

    def _leave(self, addr: str) -> Ring:
        ring = self.rings.pop(addr)
        slot, last = self._slot.pop(addr), self.addrs.pop()
        if last != addr:
            self.addrs[slot] = last
            self._slot[last] = slot
        return ring

    def _converge(self) -> None:
        """Set every node's state as stabilization and fix_fingers would leave it."""
        n = len(self.ids)
        peers = [self.by_id[i].me for i in self.ids]
        for k, node_id in enumerate(self.ids):
            state = self.by_id[node_id].state
            state.successors = [peers[(k + j) % n] for j in range(1, min(self.r, n - 1) + 1)] or [state.me]
            state.predecessor = peers[(k - 1) % n] if n > 1 else None
            ring = self.by_id[node_id]
            for index in range(ID_BITS if self.fingers else 0):
                first = bisect.bisect_left(self.ids, (node_id + (1 << index)) % (1 << ID_BITS))
                owners = [peers[(first + j) % n] for j in range(self.r if self.pns != "off" else 1)]
                state.set_finger(index, owners[0], ring.nearest(owners))

    def true_owner(self, key: int) -> int:
        k = bisect.bisect_left(self.ids, key)
        return self.ids[k % len(self.ids)]

    def true_owner_peer(self, key: int) -> Peer:
        return self.by_id[self.true_owner(key)].me

    # -- activity ----------------------------------------------------------------------------------

    async def maintain(self, ring: Ring) -> None:
        await sleep(self.rng.uniform(0, self.ring_interval))
        while ring.transport.addr in self.rings:
            await ring.maintain(self.fingers)
            await sleep(self.ring_interval * self.rng.uniform(0.8, 1.2))

    async def lookup(self, ring: Ring, key: int, record: bool) -> None:
        start = trio.current_time()
        try:
            owners, hops = await ring.lookup_with_hops(key)
        except (RpcError, RequestError):
            if record:
                self.stats.failed += 1
                self.stats.outcomes.append(None)
            return
        if record:
            self.stats.hops.append(hops)
            self.stats.outcomes.append(hops)
            self.stats.latencies.append(trio.current_time() - start)
            if not owners or owners[0].id != self.true_owner(key):
                self.stats.incorrect += 1

    def crash_one(self, addr: str | None = None) -> None:
        """A random node crashes (or the one at `addr`): any node, one still joining too."""
        addr = addr or self.rng.choice(self.addrs)
        ring = self._remove(addr)
        if addr in self.joining:
            self.joining.discard(addr)
            self.stats.joins_crashed += 1
        else:
            del self.ids[bisect.bisect_left(self.ids, ring.me.id)]
        self.stats.crashes += 1

    def _remove(self, addr: str) -> Ring:
        ring = self._leave(addr)
        self.net.crash(addr)
        self.clients.pop(addr, None)
        self.by_id.pop(ring.me.id, None)
        return ring

    async def join_one(self, nursery: trio.Nursery) -> None:
        seed = self.live_addr()
        ring = self._add_node()
        addr = ring.transport.addr
        self.ids.remove(ring.me.id)  # not part of the truth until its join completes
        self.joining.add(addr)
        self.stats.join_attempts += 1
        joined = await ring.join([seed])
        if addr not in self.joining:  # crashed while joining: already counted
            return
        self.joining.discard(addr)
        if joined:
            bisect.insort(self.ids, ring.me.id)
            self.stats.joins += 1
            nursery.start_soon(self.maintain, ring)
        else:
            self.stats.joins_failed += 1
            self._remove(addr)

    def live_addr(self) -> str:
        """A random node that is in the ring (not still joining)."""
        while True:
            addr = self.rng.choice(self.addrs)
            if addr not in self.joining:
                return addr

    async def run(self, duration: float, lookups_per_second: float, churn_per_minute: float,
                  warmup: float) -> None:
        async with trio.open_nursery() as nursery:
            for ring in list(self.rings.values()):
                nursery.start_soon(self.maintain, ring)
            nursery.start_soon(self._workload, nursery, duration, lookups_per_second, warmup)
            if churn_per_minute > 0:
                nursery.start_soon(self._churn, nursery, churn_per_minute)
            if self.coordinates:
                nursery.start_soon(self._watch_coordinates)
            await sleep(duration)
            nursery.cancel_scope.cancel()

    async def _workload(self, nursery: trio.Nursery, duration: float, rate: float, warmup: float) -> None:
        while True:
            await sleep(self.rng.expovariate(rate))
            ring = self.rings[self.live_addr()]
            record = warmup <= trio.current_time() - self.t0 <= duration - ring.transport.default_timeout
            nursery.start_soon(self.lookup, ring, self.rng.getrandbits(ID_BITS), record)

    async def _watch_coordinates(self, every: float = 60.0, pairs: int = 2000) -> None:
        """Median Vivaldi error each minute (its own random stream: the run is the same with or without)."""
        rng = random.Random(self.seed + 1)
        while True:
            await sleep(every)
            self.stats.vivaldi_errors.append(self.vivaldi_error(pairs, rng))

    async def _churn(self, nursery: trio.Nursery, per_minute: float) -> None:
        """Replace `per_minute` of the nodes each minute: Poisson crash events, each followed by a join."""
        rate = per_minute * len(self.rings) / 60.0
        while True:
            await sleep(self.rng.expovariate(rate))
            self.crash_one()
            nursery.start_soon(self.join_one, nursery)


def simulate(nodes: int, duration: float = 600.0, matrix_path: str | None = None, churn: float = 0.0,
             seed: int = 1, lookups_per_second: float = 20.0, ring_interval: float = 5.0,
             warmup: float = 30.0, pns: bool | str = False, fingers: bool = True, learning: bool = True,
             coordinates: bool = True, unit: str | None = None) -> dict[str, Any]:
    """Run one simulation; latencies from the matrix at `matrix_path` (in `unit`: see
    `vivaldi.sim.load_matrix`), or the site model without one; `churn` is the share of nodes replaced per
    minute (0.05 = 5 %/min); `pns` is False, True or "vivaldi" (fingers by each node's estimates), or
    "oracle" (by the exact RTT)."""
    matrix = None
    if matrix_path:
        from vivaldi.sim import load_matrix, symmetrise

        matrix = symmetrise(load_matrix(matrix_path, unit)).tolist()
    wall = time.perf_counter()
    sim = Simulation(nodes, seed, matrix, ring_interval=ring_interval, pns=pns, fingers=fingers, learning=learning,
                     coordinates=coordinates)

    async def main() -> None:
        sim.t0 = trio.current_time()
        await sim.run(duration, lookups_per_second, churn, warmup)

    _seed_trio_scheduler(seed)
    trio.run(main, clock=SimClock())
    s = sim.stats
    done = len(s.hops)
    return {
        "nodes": nodes, "duration_s": duration, "churn_per_minute": churn, "seed": seed,
        "latency_model": matrix_path or f"{len(sim.sites)} sites",
        "ring_interval_s": ring_interval, "successors": sim.r,
        "proximity_fingers": {"off": "off", "vivaldi": "Vivaldi estimates",
                              "oracle": "exact RTT (upper bound of what coordinates give)"}[sim.pns],
        "fingers": fingers, "learned_links": learning,
        "coordinates": "Vivaldi, fed by every RPC" if coordinates else "off",
        "vivaldi_median_error": _round(sim.vivaldi_error(10_000, random.Random(seed + 2)), 3),
        "vivaldi_error_by_minute": [_round(e, 3) for e in s.vivaldi_errors],
        "lookups": done + s.failed,
        "success_rate": round(done / (done + s.failed), 5) if done + s.failed else None,
        "correct_rate": round((done - s.incorrect) / (done + s.failed), 5) if done + s.failed else None,
        "hops_mean": round(statistics.fmean(s.hops), 3) if s.hops else None,
        "hops_p99": sorted(s.hops)[int(0.99 * (len(s.hops) - 1))] if s.hops else None,
        "half_log2_n_plus_1": round(0.5 * math.log2(nodes) + 1, 3),
        "lookup_latency_ms_p50": round(1000 * statistics.median(s.latencies), 2) if s.latencies else None,
        "lookup_latency_ms_p50_over_time": [round(1000 * x, 1) for x in _tenths(s.latencies, statistics.median)],
        "crashes": s.crashes, "joins": s.joins, "joins_failed": s.joins_failed, "joins_crashed": s.joins_crashed,
        "joins_in_flight": s.join_attempts - s.joins - s.joins_failed - s.joins_crashed,  # cut off by the end
        "messages": sim.net.messages,
        "wall_s": round(time.perf_counter() - wall, 1),
        "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "hop_histogram": {h: s.hops.count(h) for h in sorted(set(s.hops))},
        "hops_over_time": [round(x, 2) for x in _tenths(s.hops)],
        **_by_lookups(s.outcomes),
    }


def _seed_trio_scheduler(seed: int) -> None:
    """trio reverses (or, under Hypothesis, shuffles) each batch of runnable tasks with a private RNG
    that nobody seeds; seeding it makes a simulation repeatable: same seed, same figures. Tasks woken
    at the same virtual instant are common here (timers of equal latency). A no-op if trio moves it."""
    try:
        from trio._core._run import _r as scheduler_rng  # noqa: PLC2701 - no public way to seed it
    except ImportError:
        return
    if isinstance(scheduler_rng, random.Random):
        scheduler_rng.seed(seed)


def _tenths(values: list[Any], summary: Any = statistics.fmean) -> list[float]:
    """`summary` (the mean) of each tenth of the values, in order: how routing improves as links are learned."""
    size = max(1, len(values) // 10)
    return [summary(values[i:i + size]) for i in range(0, size * 10, size) if values[i:i + size]]


def _by_lookups(outcomes: list[int | None]) -> dict[str, dict[str, Any]]:
    """Mean hops (of those that succeeded) and failures among the 1st-100th recorded lookups, the
    101st-200th, 201st-500th, ... (1-2-5 steps): how fast learning pays, against the number of requests
    made so far."""
    edges, step = [0], 0
    while edges[-1] < len(outcomes):
        edges.append(min(len(outcomes), (1, 2, 5)[step % 3] * 100 * 10 ** (step // 3)))
        step += 1
    hops: dict[str, Any] = {}
    failed: dict[str, int] = {}
    for lo, hi in zip(edges, edges[1:], strict=False):
        done = [h for h in outcomes[lo:hi] if h is not None]
        hops[f"{lo + 1}-{hi}"] = round(statistics.fmean(done), 2) if done else None
        failed[f"{lo + 1}-{hi}"] = hi - lo - len(done)
    return {"hops_by_lookups": hops, "failed_by_lookups": failed}


def _round(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)


def plot(result: dict[str, Any], path: str) -> None:
    """Hop-count distribution against the ½·log2 N + 1 bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    histogram = result["hop_histogram"]
    total = sum(histogram.values())
    ax.bar([int(h) for h in histogram], [c / total for c in histogram.values()], color="tab:blue")
    ax.axvline(result["hops_mean"], color="tab:orange", label=f"mean {result['hops_mean']}")
    ax.axvline(result["half_log2_n_plus_1"], color="tab:red", linestyle="--",
               label=f"½·log2 N + 1 = {result['half_log2_n_plus_1']}")
    ax.set_xlabel("hops per lookup")
    ax.set_ylabel("share of lookups")
    ax.set_title(f"Chord lookups, N = {result['nodes']}, churn {result['churn_per_minute']:.0%}/min")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_learning(results: dict[str, dict[str, Any]], path: str) -> None:
    """Mean hops against the number of lookups made so far (`hops_by_lookups`), one line per labelled
    result: how fast learned links pay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, result in results.items():
        bins = [(int(span.split("-")[1]), hops) for span, hops in result["hops_by_lookups"].items() if hops is not None]
        ax.plot([b for b, _ in bins], [h for _, h in bins], marker="o", label=label)
    nodes = {r["nodes"] for r in results.values()}
    for n in sorted(nodes):
        ax.axhline(0.5 * math.log2(n) + 1, color="tab:red", linestyle="--", linewidth=1,
                   label=f"½·log2 N + 1, N = {n}")
    ax.set_xscale("log")
    ax.set_xlabel("lookups made so far (end of each bin)")
    ax.set_ylabel("mean hops per lookup")
    ax.set_title("Learned long links")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
