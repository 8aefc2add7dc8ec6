"""An in-memory network of `IspNode`s under a virtual clock: the DVMS property tests run on it, and the
simulator can, with a real solver as the oracle.

It delivers messages after random delays (so in any order), drops some, cuts a node off the network for
a while (alive, but its leases lapse), crashes and restarts nodes, tells the survivors after a detection
delay (as SWIM would), reports live nodes as failed (SWIM's false positives), answers `Solve` with a
pluggable oracle after a random solving time and finishes each `Apply` after a random time. After every
event it checks what must always hold (on the nodes the event touched), so a test only has to read `violations`:

* **one partition per node**: no node is in, or counted by a live leader in, two partitions at once;
* **one apply per node**: an apply's members are all locked in it until its deadline, and no node is a
  member of two applies running at once (a VM runs on one node: no VM is moved by two plans).

`Trace` keeps what liveness and locality properties need: when each partition was created, how it ended,
the last time any node still had it, merges, and the walk of each partition (who it asked, in which lap).
"""

from __future__ import annotations

import functools
import heapq
import math
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from dvms.partition import (
    Apply,
    Ended,
    IspConfig,
    IspNode,
    Join,
    Message,
    Output,
    PartitionId,
    Send,
    Solve,
    Yield,
)

Oracle = Callable[[PartitionId, tuple[str, ...], random.Random], bool]
"""Whether a plan exists for these members (the VMs on them)."""


def at_least(k: int) -> Oracle:
    """A plan is found once the partition has `k` members."""
    return lambda pid, members, rng: len(members) >= k


def with_probability(p: float) -> Oracle:
    """Each solve finds a plan with probability `p`, whatever the members."""
    return lambda pid, members, rng: rng.random() < p


def never(pid: PartitionId, members: tuple[str, ...], rng: random.Random) -> bool:
    return False


@dataclass
class Running:
    """An apply: from its start to `done` (when the shell finished it, cut at the deadline)."""

    pid: PartitionId
    members: tuple[str, ...]
    start: float
    deadline: float
    done: float = math.inf


@dataclass
class Trace:
    """What happened, for the properties that are judged on a whole run."""

    created: dict[PartitionId, float] = field(default_factory=dict)
    ended: dict[PartitionId, tuple[float, str]] = field(default_factory=dict)
    last_seen: dict[PartitionId, float] = field(default_factory=dict)  # some live node still had it
    leader_crashed: set[PartitionId] = field(default_factory=set)
    merges: list[tuple[PartitionId, PartitionId]] = field(default_factory=list)  # (absorber, yielded)
    walks: dict[PartitionId, list[tuple[int, str]]] = field(default_factory=dict)  # (lap, candidate) asked
    applies: list[Running] = field(default_factory=list)


class IspNet:
    """N `IspNode`s, one virtual clock; `route(origin)` is each node's route (`spiral_then_ring`)."""

    def __init__(self, names: Sequence[str], route: Callable[[str], Sequence[str]], *, config: IspConfig | None = None,
                 seed: int = 0, oracle: Oracle = never, delay: tuple[float, float] = (0.001, 0.05),
                 drop: float = 0.0, solve_time: tuple[float, float] = (0.01, 0.2),
                 apply_time: tuple[float, float] = (0.1, 1.0), tick: float = 0.1,
                 detection: tuple[float, float] = (1.0, 3.0)) -> None:
        self.config = config or IspConfig()
        self.route, self.oracle, self.rng = route, oracle, random.Random(seed)
        self.delay, self.drop, self.solve_time, self.apply_time = delay, drop, solve_time, apply_time
        self.tick, self.detection = tick, detection
        self.nodes = {name: self._boot(name, 0, -math.inf) for name in names}
        self.active: set[str] = set()  # nodes in or leading a partition: only they need ticks and checks
        self.down: set[str] = set()
        self.cut: dict[str, float] = {}  # node → until when its messages, both ways, are lost
        self.now = 0.0
        self.trace = Trace()
        self.violations: list[str] = []
        self.messages = 0
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self._running: list[Running] = []  # applies not known to be over
        self._counting: dict[str, set[str]] = defaultdict(set)  # member -> live leaders whose partition lists it
        self._listed: dict[str, frozenset[str]] = {}  # leader -> the members its partition lists
        self._touched: set[str] = set()  # nodes whose holders the last event may have changed
        self._busy = 0  # events in the queue other than ticks: the run is over when none is left and all are free
        self._push(0.0, self._tick_all, busy=False)

    def _boot(self, name: str, incarnation: int, quarantine_until: float) -> IspNode:
        return IspNode(name, lambda: self.route(name), self.config, incarnation, quarantine_until)

    # ----------------------------------------------------------------------------------------------------
    # Scripting

    def problem(self, name: str, at: float) -> None:
        self._push(at, lambda: self._input(name, lambda node: node.on_problem(self.now)))

    def crash(self, name: str, at: float, restart_after: float | None = None) -> None:
        self._push(at, lambda: self._crash(name, restart_after))

    def isolate(self, name: str, at: float, duration: float) -> None:
        """Lose every message to or from `name` during [at, at + duration): it lives on, alone."""
        self._push(at, lambda: self.cut.__setitem__(name, self.now + duration))

    def suspect(self, name: str, at: float) -> None:
        """Every other node is told that `name` failed, though it did not."""
        self._push(at, lambda: self._report(name))

    def run(self, until: float) -> None:
        """Run to `until`, or until nothing is scheduled and every node is free."""
        while self._queue and self._queue[0][0] <= until:
            when, _, action = heapq.heappop(self._queue)
            self.now = when
            action()
            self._check()
            if not self._busy and self.quiet:
                return

    @property
    def quiet(self) -> bool:
        """No live node is in a partition."""
        return not self.active

    # ----------------------------------------------------------------------------------------------------
    # Events

    def _push(self, when: float, action: Callable[[], None], busy: bool = True) -> None:
        def run() -> None:
            if busy:
                self._busy -= 1
            action()

        self._busy += busy
        self._seq += 1
        heapq.heappush(self._queue, (when, self._seq, run))

    def _tick_all(self) -> None:
        names = sorted(self.active)  # an idle core's tick does nothing
        self.rng.shuffle(names)
        for name in names:
            self._input(name, lambda node: node.on_tick(self.now))
        self._push(self.now + self.tick, self._tick_all, busy=False)

    def _input(self, name: str, call: Callable[[IspNode], list[Output]]) -> None:
        if name in self.down:
            return
        node = self.nodes[name]
        before = node.lead.pid if node.lead else None
        outputs = call(node)
        if node.lead is not None and node.lead.pid != before:
            self.trace.created[node.lead.pid] = self.now
        if node.membership is not None or node.lead is not None:
            self.active.add(name)
        else:
            self.active.discard(name)
        self._index(name)
        for out in outputs:
            self._carry(name, node, out)

    def _carry(self, name: str, node: IspNode, out: Output) -> None:
        rng = self.rng
        if isinstance(out, Send):
            self._observe(node, out)
            self.messages += 1
            if rng.random() >= self.drop and not self._isolated(name):
                to, msg = out.to, out.msg
                self._push(self.now + rng.uniform(*self.delay), lambda: self._deliver(to, msg))
        elif isinstance(out, Solve):
            found = self.oracle(out.pid, out.members, rng)
            self._push(self.now + rng.uniform(*self.solve_time),
                       lambda: self._input(name, lambda n: n.on_plan_result(out.pid, found, self.now, out.version)))
        elif isinstance(out, Apply):
            self._start_apply(name, out)
        elif isinstance(out, Ended):
            self.trace.ended[out.pid] = (self.now, out.reason)

    def _observe(self, node: IspNode, out: Send) -> None:
        msg = out.msg
        if isinstance(msg, Join) and msg.replaces is None and node.lead is not None:
            self.trace.walks.setdefault(msg.pid, []).append((node.lead.lap, out.to))
        elif isinstance(msg, Yield):
            self.trace.merges.append((msg.to, msg.pid))

    def _isolated(self, name: str) -> bool:
        return self.now < self.cut.get(name, -math.inf)

    def _deliver(self, to: str, msg: Message) -> None:
        if not self._isolated(to) and not self._isolated(msg.sender):
            self._input(to, lambda node: node.on_message(msg, self.now))

    def _start_apply(self, name: str, out: Apply) -> None:
        running = Running(out.pid, out.members, self.now, out.deadline)
        self._running = [r for r in self._running if r.done > self.now and r.deadline > self.now]
        for other in self._running:
            if set(other.members) & set(out.members):
                self.violations.append(f"{self.now:.3f}: applies {other.pid} and {out.pid} share "
                                       f"{sorted(set(other.members) & set(out.members))}")
        for member in out.members:
            node, m = self.nodes[member], self.nodes[member].membership
            locked = m is not None and m.pid == out.pid and (member == name or m.locked_until >= out.deadline)
            if member not in self.down and not locked and node.quarantine_until < out.deadline:
                self.violations.append(f"{self.now:.3f}: {member} is not locked in {out.pid} for its apply")
        self.trace.applies.append(running)
        self._running.append(running)

        def done() -> None:
            running.done = min(self.now, running.deadline)
            self._input(name, lambda n: n.on_apply_done(out.pid, self.now))

        self._push(self.now + self.rng.uniform(*self.apply_time), done)

    def _crash(self, name: str, restart_after: float | None) -> None:
        if name in self.down:
            return
        node = self.nodes[name]
        if node.lead is not None:
            self.trace.leader_crashed.add(node.lead.pid)
        self.down.add(name)
        self.active.discard(name)
        self._index(name)
        self._report(name)
        if restart_after is not None:
            self._push(self.now + restart_after, lambda: self._restart(name, node.incarnation + 1))

    def _report(self, name: str) -> None:
        for other in self.nodes:
            if other != name:
                self._push(self.now + self.rng.uniform(*self.detection),
                           functools.partial(self._tell_failed, other, name))

    def _tell_failed(self, node: str, name: str) -> None:
        self._input(node, lambda n: n.on_peer_failed(name, self.now))

    def _restart(self, name: str, incarnation: int) -> None:
        """A fresh core: everything was lost, and it may have granted a lease before the crash."""
        self.down.discard(name)
        self.nodes[name] = self._boot(name, incarnation, self.now + self.config.quarantine)

    # ----------------------------------------------------------------------------------------------------
    # Safety, after every event

    def _index(self, name: str) -> None:
        """After an input at `name` (or its crash): which members its partition lists, and who is touched."""
        node = self.nodes[name]
        listed = frozenset(node.lead.members) if node.lead is not None and name not in self.down else frozenset()
        before = self._listed.get(name, frozenset())
        for member in before - listed:
            self._counting[member].discard(name)
        for member in listed - before:
            self._counting[member].add(name)
        self._listed[name] = listed
        self._touched |= before | listed | {name}

    def _check(self) -> None:
        """Only the nodes the last event touched: a node's holders change only through its own inputs or those
        of a leader that lists it (time passing only lets leases lapse)."""
        for name in self._touched:
            node = self.nodes[name]
            pids = {node.membership.pid} if node.membership is not None and name not in self.down else set()
            for leader in self._counting[name]:
                lead = self.nodes[leader].lead
                if lead is not None and name in self.nodes[leader].counted(self.now):
                    pids.add(lead.pid)
            for pid in pids:
                self.trace.last_seen[pid] = self.now
            if len(pids) > 1:
                self.violations.append(f"{self.now:.3f}: {name} in {sorted(map(str, pids))}")
        self._touched = set()

