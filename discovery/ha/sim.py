"""`discovery sim ha`: the HA protocol on simulated hosts, under virtual time, with crashes, partitions and loss.

What runs is production code: every node runs SWIM (`agents.node.GossipService` over `overlay.membership`),
the replicated directory (`overlay.dht.DHT`, whose conditional writes are decided by a majority of a key's
replicas) on a static Chord ring, its `LeaseKeeper` and, for each host it watches, a `HostWatch`; all over
`overlay.wire.memnet`, whose cuts and loss make the partitions (both ways, one way, a flapping link) and
the lost messages. What is modelled: a VE is one VM and its record (`ve/<name>`: its host); a VM runs or
not; a recovery is what the agents' transactions do, in its order: the new host covers the VE in its
lease first (`ha.prepare`), then the record moves to it by a conditional write, then it starts the VM
once its lease lists it and the record places it there (it checks again every second, as a host's
fencing pass does). A crash stops the node's processes and its VMs; a restart keeps only its disk: what
it prepared (its defined domains) and its directory shard.

Checked after every change of a VM's state: no VE runs on two hosts at once (`World.double_runs`, with
when and where); at the end, once every fault has ended: every VE runs exactly once, and each failure
took one recovery. `trial` runs one schedule; `campaign` runs many random ones (the property tests and
the benchmark call both).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import random
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from trio import _core as trio_core
from trio.testing import MockClock

from agents.node import GossipService, RepairService, RingService
from agents.runtime import Event, Notifier
from discovery.ha import shell
from discovery.ha.lease import Lease
from discovery.ha.shell import REPLICAS, UNANSWERED, HaShell
from overlay.chord import hash_id
from overlay.dht import DHT, Shard
from overlay.membership import ALIVE, Membership
from overlay.ring import Ring
from overlay.wire.memnet import MemNetwork
from overlay.wire.rpc import ANYONE, Caller, Method

EPOCH = 1.7e9
PROBE_INTERVAL = 0.5
SUSPECT_TIMEOUT = 3.0
RECONCILE = 1.0
REPAIR_INTERVAL = 5.0
PREPARE_WAIT = 5.0
INCOMING_GRACE = 30.0
KINDS = ("crash", "isolate", "isolate_site", "cut_out", "cut_in", "flap")


@dataclass(frozen=True)
class Fault:
    """`kind` of fault on `target` (a node, or a site for isolate_site) from `at` for `lasts` seconds:
    crash (then a restart), isolate (both ways, from every other node), isolate_site, cut_out / cut_in
    (only what the node sends / receives is lost), flap (isolated every other second)."""

    kind: str
    target: str
    at: float
    lasts: float


@dataclass(frozen=True)
class VeName:
    ve: str


HA_PREPARE = Method("ha.prepare", VeName, ANYONE, bool)
HA_START = Method("ha.start", VeName, ANYONE, bool)


@dataclass
class World:
    """What runs where, and what went wrong."""

    now: Any
    running: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    double_runs: list[dict[str, Any]] = field(default_factory=list)
    recoveries: Counter[str] = field(default_factory=Counter)
    revocations: list[tuple[float, str, str]] = field(default_factory=list)
    down_since: dict[str, float] = field(default_factory=dict)
    """When each VE last stopped running anywhere (gone once it runs again)."""
    outages: list[float] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    """What happened, in order: a trial's trace (`trial(..., trace=True)` returns it)."""

    def note(self, what: str) -> None:
        self.log.append(f"{self.now():8.3f} {what}")

    def start(self, ve: str, node: str) -> None:
        self.note(f"{node} starts {ve}")
        self.running[ve].add(node)
        if len(self.running[ve]) > 1:
            self.double_runs.append({"ve": ve, "at": round(self.now(), 3), "on": sorted(self.running[ve])})
        if ve in self.down_since:
            self.outages.append(self.now() - self.down_since.pop(ve))

    def stop(self, ve: str, node: str) -> None:
        self.note(f"{node} stops {ve}")
        self.running[ve].discard(node)
        if not self.running[ve]:
            self.down_since.setdefault(ve, self.now())


class SimNode:
    """One agent of the simulation: SWIM, the directory, its lease and its watches, and its VMs."""

    def __init__(self, sim: HaSim, name: str, site: str) -> None:
        self.sim, self.name, self.site = sim, name, site
        self.addr = f"mem:{name}"
        self.prepared: set[str] = set()
        """The VEs this host defines (its disk: kept across a crash, lost to a fence)."""
        self.incoming: dict[str, float] = {}
        """VE -> when `ha.prepare` asked for it: kept that long though its record still places it elsewhere
        (the recovering watcher moves the record next), as a host keeps a reservation."""
        self.vms: dict[str, str] = {}
        """VE -> "running" or "frozen" (gone with a crash)."""
        self.boots = 0

    def boot(self) -> None:
        """Fresh processes on this node's disk: transport, ring, directory, SWIM, lease keeper."""
        sim = self.sim
        self.transport = sim.net.endpoint(self.addr, self.name, self.site)
        self.ring = Ring(self.transport, self.name, self.addr, self.site, r=5, learn=False)
        self.shard = Shard(sim.tmp / f"{self.name}.sqlite", inline=True, wall=sim.wall)
        self.dht = DHT(self.transport, self.ring, self.shard, r=REPLICAS, w=2, wall=sim.wall, rng=sim.rng,
                       members=lambda: len(sim.nodes))
        self.membership = Membership(self.name, self.addr, self.site, SUSPECT_TIMEOUT,
                                     random.Random(sim.rng.random()))
        self.membership.me.incarnation = self.boots  # as agents keep theirs: a restart refutes its death
        self.boots += 1
        for other in sim.nodes.values():
            if other is not self:
                self.membership.merge([{"name": other.name, "addr": other.addr, "site": other.site,
                                        "status": ALIVE, "incarnation": 0}], trio.current_time())
        self.events_in, self.events = trio.open_memory_channel[Event](math.inf)
        notifier = Notifier()  # SWIM's events reach the ring and wake the node's loops, as in an agent
        notifier.subscribe(self._told)
        self.gossip = GossipService(self.transport, self.membership, self.ring, notifier, [],
                                    sim.tmp / f"{self.name}.members.json", PROBE_INTERVAL)
        self.ring_service = RingService(self.transport, self.membership, self.ring, PROBE_INTERVAL)
        self.repair = RepairService(self.dht, REPAIR_INTERVAL)
        self.ha = HaShell(self.name, self.membership, self.dht, self, replicas=REPLICAS)
        self.transport.route(HA_PREPARE, self._on_prepare)
        self.transport.route(HA_START, self._on_start)

    def _told(self, event: Event) -> None:
        self.events_in.send_nowait(event)
        self.ha.kick()

    # -- the node's loops ---------------------------------------------------------------------------------

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._swim)
            nursery.start_soon(self._ring)
            nursery.start_soon(self.ha.run)
            nursery.start_soon(self._reconcile)

    async def _swim(self) -> None:
        while True:
            await self.gossip.tick()
            await trio.sleep(PROBE_INTERVAL)

    async def _ring(self) -> None:
        """The agents' ring upkeep (dead members leave the ring at once) and the directory's anti-entropy."""
        next_repair = trio.current_time() + REPAIR_INTERVAL
        while True:
            with trio.move_on_after(PROBE_INTERVAL):
                async for event in self.events:
                    if event.kind in ("member_dead", "member_left"):
                        await self.ring_service.handle(event)
            await self.ring_service.tick()
            if trio.current_time() >= next_repair:
                next_repair += REPAIR_INTERVAL
                await self.repair.tick()

    # -- what the HA shell asks of this node's VMs ----------------------------------------------------------

    def protected(self) -> frozenset[str]:
        return frozenset(self.prepared)

    async def freeze(self) -> None:
        self.sim.world.note(f"{self.name} freezes (lease held until {self.ha.keeper.held_until:.3f})")
        for ve, state in self.vms.items():
            if state == "running":
                self.vms[ve] = "frozen"
                self.sim.world.stop(ve, self.name)

    async def thaw(self) -> None:
        self.sim.world.note(f"{self.name} thaws (held until {self.ha.keeper.held_until:.3f})")
        for ve, state in self.vms.items():
            if state == "frozen":
                self.vms[ve] = "running"
                self.sim.world.start(ve, self.name)

    async def fence(self, ves: tuple[str, ...], epoch: int) -> None:
        self.sim.world.note(f"{self.name} fenced: lease epoch {epoch} revoked, {ves} never here again")
        for ve in ves:
            self.prepared.discard(ve)
            if self.vms.pop(ve, None) == "running":
                self.sim.world.stop(ve, self.name)

    def revoked(self, host: str, lease: Lease) -> None:
        self.sim.world.revocations.append((trio.current_time(), host, self.name))
        self.sim.world.note(f"{self.name} revokes {host}'s lease (epoch {lease.epoch}, {lease.ves})")

    async def _reconcile(self) -> None:
        """Every second, as a host's fencing pass: start a prepared VE that its record places here once the
        lease covers it; forget one placed elsewhere (it never ran here, or was fenced)."""
        while True:
            for ve in sorted(self.prepared):
                if ve not in self.vms or self.vms[ve] == "frozen":
                    await self._settle(ve)
            await trio.sleep(RECONCILE)

    async def _settle(self, ve: str) -> None:
        try:
            record = await self.ha.read(f"ve/{ve}")
        except UNANSWERED:
            return
        host = record.value["host"] if record is not None and record.value is not None else None
        now = trio.current_time()
        if host != self.name and ve not in self.vms and now >= self.incoming.get(ve, 0.0) + INCOMING_GRACE:
            self.prepared.discard(ve)
            self.ha.kick()
        elif host == self.name and ve not in self.vms and self.ha.covered(ve):
            self.vms[ve] = "running"
            self.sim.world.start(ve, self.name)

    async def _on_prepare(self, caller: Caller, request: VeName) -> bool:
        """Cover `ve` in this host's lease before its record may move here."""
        self.prepared.add(request.ve)
        self.incoming[request.ve] = trio.current_time()
        self.ha.kick()
        with trio.move_on_after(PREPARE_WAIT):
            while not self.ha.covered(request.ve):
                await trio.sleep(0.1)
            return True
        return False

    async def _on_start(self, caller: Caller, request: VeName) -> bool:
        """The record now places `ve` here: start it if the lease covers it (else the reconcile pass will)."""
        self.prepared.add(request.ve)
        await self._settle(request.ve)
        return self.vms.get(request.ve) == "running"

    # -- recovery -------------------------------------------------------------------------------------------

    async def recover(self, host: str, ves: tuple[str, ...], epoch: int, by: str | None) -> bool:
        """Move each VE still placed on `host` to a live node: prepared there, then the record moved."""
        done = True
        for ve in ves:
            try:
                record = await self.ha.read(f"ve/{ve}")
                if record is None or record.value is None or record.value["host"] != host:
                    continue
                target = self._target(ve, host)
                if target is None or not await self.transport.call(target.addr, "ha.prepare", {"ve": ve},
                                                                   timeout=PREPARE_WAIT + 1):
                    done = False
                    continue
                await self.ha.write(f"ve/{ve}", {"host": target.name}, record)
                self.sim.world.recoveries[ve] += 1
                self.sim.world.note(f"{self.name} moves {ve}: {host} -> {target.name} (record v{record.version + 1})")
                with contextlib.suppress(*UNANSWERED):
                    await self.transport.call(target.addr, "ha.start", {"ve": ve})
            except UNANSWERED:
                done = False
        return done

    def _target(self, ve: str, host: str) -> Any:
        alive = [m for m in self.membership.members.values() if m.status == ALIVE and m.name != host]
        return max(alive, key=lambda m: hashlib.blake2b(f"{ve}\0{m.name}".encode()).digest(), default=None)


class HaSim:
    """One trial: `nodes` agents on `sites` sites, `ves` protected VEs spread over them, then the faults."""

    def __init__(self, tmp: Path, nodes: int, sites: int, ves: int, seed: int, loss: float = 0.0,
                 latency: float = 0.005) -> None:
        self.tmp = tmp
        self.rng = random.Random(seed)
        self.net = MemNetwork(lambda a, b: latency)
        self.net.rng = random.Random(seed + 1)
        self.loss = loss
        self.world = World(lambda: trio.current_time())
        self.nodes: dict[str, SimNode] = {}
        for i in range(nodes):
            name = f"n{i + 1}"
            self.nodes[name] = SimNode(self, name, f"s{i % sites + 1}")
        self.ves = [f"ve{i + 1}" for i in range(ves)]
        self.scopes: dict[str, trio.CancelScope] = {}

    def wall(self) -> float:
        return EPOCH + trio.current_time()

    async def run(self, faults: list[Fault], settle: float) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            for node in self.nodes.values():
                node.boot()
            self._wire_ring()
            await self._place()
            for node in self.nodes.values():
                self._start(node)
            self.net.loss = self.loss
            end = max((f.at + f.lasts for f in faults), default=0.0)
            for fault in faults:
                nursery.start_soon(self._inject, fault)
            await trio.sleep(end + 1)
            self.net.loss = 0.0
            await trio.sleep(settle)
            nursery.cancel_scope.cancel()

    def _wire_ring(self) -> None:
        ordered = sorted(self.nodes, key=hash_id)
        for k, name in enumerate(ordered):
            state = self.nodes[name].ring.state
            state.successors = [self.nodes[ordered[(k + j) % len(ordered)]].ring.me
                                for j in range(1, min(state.r + 1, len(ordered)))]
            state.predecessor = self.nodes[ordered[k - 1]].ring.me

    async def _place(self) -> None:
        """Each VE on a host, covered by its lease and running, before anything fails."""
        hosts = list(self.nodes.values())
        for i, ve in enumerate(self.ves):
            host = hosts[i % len(hosts)]
            host.prepared.add(ve)
            await host.ha.write(f"ve/{ve}", {"host": host.name}, None)

    def _start(self, node: SimNode) -> None:
        scope = trio.CancelScope()
        self.scopes[node.name] = scope

        async def run() -> None:
            with scope:
                await node.run()

        self.nursery.start_soon(run)

    async def _inject(self, fault: Fault) -> None:
        await trio.sleep_until(fault.at)
        if fault.kind == "crash":
            node = self.nodes[fault.target]
            self.scopes[node.name].cancel()
            self.net.crash(node.addr)
            for ve in list(node.vms):
                self.world.stop(ve, node.name)
            node.vms.clear()
            node.shard.close()
            await trio.sleep(fault.lasts)
            node.boot()
            self._wire_ring()
            self._start(node)
            return
        if fault.kind == "flap":
            end = trio.current_time() + fault.lasts
            while trio.current_time() < end:
                self._cut(fault, True)
                await trio.sleep(1.0)
                self._cut(fault, False)
                await trio.sleep(1.0)
            return
        self._cut(fault, True)
        await trio.sleep(fault.lasts)
        self._cut(fault, False)

    def _cut(self, fault: Fault, on: bool) -> None:
        inside = ({n.addr for n in self.nodes.values() if n.site == fault.target} if fault.kind == "isolate_site"
                  else {self.nodes[fault.target].addr})
        outside = {n.addr for n in self.nodes.values()} - inside
        pairs = set()
        for a in inside:
            for b in outside:
                if fault.kind != "cut_in":
                    pairs.add((a, b))
                if fault.kind != "cut_out":
                    pairs.add((b, a))
        if on:
            self.net.cut |= pairs
        else:
            self.net.cut -= pairs

    def report(self, faults: list[Fault]) -> dict[str, Any]:
        running = {ve: sorted(self.world.running.get(ve, ())) for ve in self.ves}
        return {"double_runs": self.world.double_runs, "running": running,
                "not_running_once": sorted(ve for ve, on in running.items() if len(on) != 1),
                "recoveries": dict(self.world.recoveries), "revocations": len(self.world.revocations),
                "outages_s": sorted(round(o, 2) for o in self.world.outages)}


@contextlib.contextmanager
def _scratch() -> Iterator[Path]:
    """A directory for the nodes' shards, and the shell's warnings kept for agents' logs (a trace tells more)."""
    shell_log = logging.getLogger(shell.__name__)
    level = shell_log.level
    shell_log.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(prefix="discovery-ha-sim-") as tmp:
            yield Path(tmp)
    finally:
        shell_log.setLevel(level)


def trial(faults: list[Fault], nodes: int = 6, sites: int = 2, ves: int = 4, seed: int = 0, loss: float = 0.0,
          settle: float = 40.0, trace: bool = False) -> dict[str, Any]:
    """Run one schedule of faults; the report of `HaSim.report` (with `trace`, what happened, in order)."""
    with _scratch() as tmp:
        sim = HaSim(tmp, nodes, sites, ves, seed, loss)
        trio_core._run._r.seed(seed)  # trio reverses each batch of ready tasks at random: seeded, a trial replays
        trio.run(sim.run, faults, settle, clock=MockClock(autojump_threshold=0))
        return sim.report(faults) | ({"trace": sim.world.log} if trace else {})


def random_faults(rng: random.Random, nodes: int, sites: int, count: int = 2, window: float = 40.0,
                  kinds: tuple[str, ...] = KINDS) -> list[Fault]:
    """`count` random faults of `kinds` starting within `window` seconds (after 10 s: the first leases are
    written)."""
    faults = []
    for _ in range(count):
        kind = rng.choice(kinds)
        target = f"s{rng.randrange(sites) + 1}" if kind == "isolate_site" else f"n{rng.randrange(nodes) + 1}"
        faults.append(Fault(kind, target, round(10 + rng.uniform(0, window), 2), round(rng.uniform(2, 30), 2)))
    return faults


def campaign(trials: int, seed: int = 0, nodes: int = 6, sites: int = 2, ves: int = 4, loss: float = 0.0,
             faults: int = 3, settle: float = 40.0, kinds: tuple[str, ...] = KINDS) -> dict[str, Any]:
    """`trials` random schedules (1 to `faults` faults each, trial i seeded with seed + i): how many ran a VE
    twice, how many left one not running once every fault ended, and the outages (seconds a VE ran nowhere:
    recoveries, and freezes of hosts that lost their lease for a moment)."""
    failed: list[dict[str, Any]] = []
    outages: list[float] = []
    recoveries = revocations = 0
    for i in range(trials):
        rng = random.Random(seed + i)
        schedule = random_faults(rng, nodes, sites, count=rng.randint(1, faults), kinds=kinds)
        report = trial(schedule, nodes, sites, ves, seed + i, loss, settle)
        recoveries += sum(report["recoveries"].values())
        revocations += report["revocations"]
        outages += report["outages_s"]
        if report["double_runs"] or report["not_running_once"]:
            failed.append({"seed": seed + i, "faults": [vars(f) for f in schedule],
                           "double_runs": report["double_runs"], "not_running_once": report["not_running_once"]})
    ordered = sorted(outages)

    def pct(q: float) -> float | None:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None

    return {"trials": trials, "nodes": nodes, "sites": sites, "ves": ves, "loss": loss,
            "double_run_trials": sum(1 for f in failed if f["double_runs"]),
            "not_running_trials": sum(1 for f in failed if f["not_running_once"]),
            "revocations": revocations, "recoveries": recoveries,
            "outage_s": {"count": len(ordered), "p50": pct(0.5), "p95": pct(0.95), "max": pct(1.0)},
            "failed": failed}
