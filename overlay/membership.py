"""Cluster membership, SWIM-style, with no I/O: who is in the cluster and who is alive.

Each node probes one member per round (a shuffled round-robin). A failed probe makes the target
`suspect`; a suspect that does not refute within `suspect_timeout` becomes `dead`. A node refutes a
rumour about itself by bumping its incarnation number, and the higher incarnation wins everywhere
(SWIM, Das et al. 2002; Serf/Consul work the same way). A voluntary leave is announced as `left` and
is never refuted.

Each entry also carries the member's latest network coordinate, opaque here, with a sequence number
the member bumps on every change: the higher sequence wins, whatever the entry's status.

News travels as piggybacked deltas (SWIM's infection-style dissemination, as in HashiCorp
memberlist): every change to the table (a new member, a status or incarnation change, a newer
coordinate) queues that member for dissemination, and each probe and each answer carries at most
`max_updates` queued entries, fewest-transmitted first (newest first among equals), status news
before coordinates. An entry is sent `retransmit_mult * ceil(log10(N + 1))` times, then dropped. A
node announces its own coordinate at most every `coord_every` rounds (coordinates move with every
RPC; the module treats them as opaque, so it rate-limits rather than measuring the move), and at
most `max_coord_queue` relayed coordinates wait in the queue, so they never crowd out status news.
Every `sync_every` rounds (random phase per node) the probe is a full-state push-pull instead, with
a random member that is alive or dead (as Serf's reconnect does), which heals partitions and
catches whatever the deltas missed; joins push-pull with the seeds, so a new node gets the whole
table at once. The wire entries are the same `to_wire` dicts either way, so the merge rules are the
same for deltas and tables.

Bytes per probe, packed with msgpack, measured by `python benchmarks/gossip_bytes.py` (simulated
steady clusters, 8-D coordinates, one member in ten moving its coordinate each round, a crash and a
join every 10 rounds; the answer is the same size as the probe; "amortized" is the mean over all
probes, the full sync of one round in `sync_every` = 60 included; docs/benchmarks.md has the run):

    N        full table (old)    deltas, mean (max)    deltas + syncs, amortized
    100           18,492          2,920 (2,974)              3,217
    1,000        186,462          2,994 (3,005)              5,892
    5,000        939,142          3,018 (3,037)             18,569

The deltas are full (16 entries of ~185 bytes) because coordinates always have news; the syncs are
what still grows with N, at 1/`sync_every` of the old rate. Dissemination in rounds is checked by
tests/unit/test_membership.py (1,000 nodes: a join reaches everyone in 6 rounds, a refutation in 11).
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeGuard

ALIVE, SUSPECT, DEAD, LEFT = "alive", "suspect", "dead", "left"
_RANK = {ALIVE: 0, SUSPECT: 1, DEAD: 2, LEFT: 3}
"""At equal incarnation, the worse news wins (SWIM's precedence)."""
RTT_WINDOW = 16
STATUS_NEWS, COORD_NEWS = 0, 1
"""Dissemination classes: status news (join, suspect, dead, left, refutation) go before coordinates."""


@dataclass(slots=True)
class Member:
    name: str
    addr: str
    site: str
    status: str = ALIVE
    incarnation: int = 0
    since: float = 0.0
    coord: Any = None
    coord_seq: int = 0
    rtts: deque[float] | None = None  # created on the first sample: simulations hold millions of entries

    @property
    def rtt(self) -> float | None:
        """Best recent RTT in seconds: the minimum filters out queueing and handler time."""
        return min(self.rtts) if self.rtts else None

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "addr": self.addr, "site": self.site, "status": self.status,
                "incarnation": self.incarnation, "coord": self.coord, "cseq": self.coord_seq}


def member_from_wire(data: Any) -> Member | None:
    """A member from a peer's table, or None if the entry is malformed (it is then ignored)."""
    if not isinstance(data, dict):
        return None
    name, addr, site = data.get("name"), data.get("addr"), data.get("site", "")
    status, inc, cseq = data.get("status"), data.get("incarnation"), data.get("cseq", 0)
    if not (isinstance(name, str) and name and isinstance(addr, str) and isinstance(site, str)
            and status in _RANK and _counter(inc) and _counter(cseq)):
        return None
    return Member(name, addr, site, status, inc, coord=data.get("coord"), coord_seq=cseq)


def _counter(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class Membership:
    """The member table of one node. Methods return the events they caused, as (kind, member) pairs."""

    def __init__(self, name: str, addr: str, site: str, suspect_timeout: float = 3.0,
                 rng: random.Random | None = None, *, max_updates: int = 16, retransmit_mult: int = 4,
                 sync_every: int = 60, coord_every: int = 10, max_coord_queue: int = 64) -> None:
        self.me = Member(name, addr, site)
        self.members: dict[str, Member] = {name: self.me}
        self.suspect_timeout = suspect_timeout
        self.rng = rng or random.Random()
        self.max_updates = max_updates
        self.retransmit_mult = retransmit_mult
        self.sync_every = sync_every
        self.coord_every = coord_every
        self.max_coord_queue = max_coord_queue
        self._probe_order: list[str] = []
        self._round = 0
        self._sync_phase = self.rng.randrange(1 << 30)  # nodes started together do not sync together
        self._coord_announced = (0, -coord_every)  # (coord_seq, round) of our last announcement
        self._queue: tuple[dict[int, dict[str, None]], ...] = ({}, {})
        """Per class, transmissions so far -> the queued names in order of queuing (dicts keep it)."""
        self._queued: dict[str, tuple[int, int]] = {}  # name -> (class, transmissions)
        self._suspects: dict[str, None] = {}  # a superset of the suspects, so `expire` need not scan the table

    def alive(self, include_me: bool = True) -> list[Member]:
        return [m for m in self.members.values()
                if m.status in (ALIVE, SUSPECT) and (include_me or m is not self.me)]

    def table(self) -> list[dict[str, Any]]:
        return [m.to_wire() for m in self.members.values()]

    # -- rounds and messages --------------------------------------------------------------------

    def next_round(self) -> tuple[Member | None, bool]:
        """Start a round: whom to probe, and whether this round is a full-state push-pull."""
        self._round += 1
        seq, last = self._coord_announced
        if self.me.coord_seq != seq and self._round - last >= self.coord_every:
            self._enqueue(self.me.name, COORD_NEWS)
            self._coord_announced = (self.me.coord_seq, self._round)
        if (self._round + self._sync_phase) % max(1, self.sync_every) == 0:
            partner = self.sync_partner()
            if partner is not None:
                return partner, True
        return self.probe_target(), False

    def message(self, full: bool = False) -> dict[str, Any]:
        """What a probe carries: our whole table (joins, sync rounds) or the next piggybacked updates."""
        return {"members": self.table()} if full else {"updates": self.updates()}

    def receive(self, message: Any, now: float) -> list[tuple[str, Member]]:
        """Merge a probe or an answer: a full table (`members`, also what older peers send), deltas, or both."""
        if not isinstance(message, dict):
            return []
        return self.merge(message.get("members"), now) + self.merge(message.get("updates"), now)

    def answer(self, message: Any, now: float) -> tuple[dict[str, Any], list[tuple[str, Member]]]:
        """Merge a probe, then the reply, which mirrors it: a table for a table, updates for updates."""
        events = self.receive(message, now)
        full = isinstance(message, dict) and "members" in message
        return {"name": self.me.name, **self.message(full)}, events

    def updates(self) -> list[dict[str, Any]]:
        """The next at most `max_updates` queued entries, each counted as one more transmission."""
        limit = self.retransmit_limit()
        picked: list[tuple[str, int, int]] = []
        for cls, buckets in enumerate(self._queue):
            for sent in sorted(buckets):
                if sent >= limit:  # the cluster grew smaller: these were sent often enough
                    for name in buckets.pop(sent):
                        del self._queued[name]
                    continue
                for name in reversed(buckets[sent]):  # newest first
                    if len(picked) == self.max_updates:
                        break
                    picked.append((name, cls, sent))
        for name, cls, sent in reversed(picked):  # oldest first: they stay in order in the next bucket
            self._unqueue(name)
            if sent + 1 < limit:
                self._queue[cls].setdefault(sent + 1, {})[name] = None
                self._queued[name] = (cls, sent + 1)
        return [self.members[name].to_wire() for name, _, _ in picked]

    def retransmit_limit(self) -> int:
        """How many times each update is sent: λ·log10(N + 1), rounded up, as memberlist does."""
        return self.retransmit_mult * math.ceil(math.log10(len(self.members) + 1))

    def pending(self) -> int:
        """Updates still waiting to be sent (or sent again)."""
        return len(self._queued)

    def sync_partner(self) -> Member | None:
        """A random other member, alive or dead (a healed partition is found by trying the dead too)."""
        others = [m for m in self.members.values() if m is not self.me and m.status != LEFT]
        return self.rng.choice(others) if others else None

    def _enqueue(self, name: str, cls: int) -> None:
        """Queue news about `name` afresh; the entry sent is the member's state at sending time."""
        old = self._queued.get(name)
        if old is not None:
            cls = min(cls, old[0])
            self._unqueue(name)
        self._queue[cls].setdefault(0, {})[name] = None
        self._queued[name] = (cls, 0)
        coords = self._queue[COORD_NEWS]
        if cls == COORD_NEWS and sum(map(len, coords.values())) > self.max_coord_queue:
            self._unqueue(next(iter(coords[max(coords)])))  # the most sent, oldest first

    def _unqueue(self, name: str) -> None:
        cls, sent = self._queued.pop(name)
        bucket = self._queue[cls][sent]
        del bucket[name]
        if not bucket:
            del self._queue[cls][sent]

    # -- merging ------------------------------------------------------------------------------

    def merge(self, entries: Any, now: float) -> list[tuple[str, Member]]:
        """Fold a peer's table or updates into ours; malformed entries are skipped, never fatal."""
        events: list[tuple[str, Member]] = []
        if not isinstance(entries, list):
            return events
        for entry in entries:
            if self._known(entry):
                continue
            incoming = member_from_wire(entry)
            if incoming is not None:
                events += self._apply(incoming, now)
        return events

    def _known(self, entry: Any) -> bool:
        """Whether the entry says exactly what we hold (most of a sync's table): nothing to build or apply."""
        if not isinstance(entry, dict) or not isinstance(name := entry.get("name"), str):
            return False
        current = self.members.get(name)
        return (current is not None and entry.get("status") == current.status
                and entry.get("incarnation") == current.incarnation and entry.get("cseq", 0) == current.coord_seq)

    def _apply(self, incoming: Member, now: float) -> list[tuple[str, Member]]:
        if incoming.name == self.me.name:
            if incoming.status != ALIVE and incoming.incarnation >= self.me.incarnation \
                    and self.me.status == ALIVE:
                self.me.incarnation = incoming.incarnation + 1  # refute the rumour
                self._enqueue(self.me.name, STATUS_NEWS)
            return []
        current = self.members.get(incoming.name)
        if current is None:
            incoming.since = now
            self.members[incoming.name] = incoming
            self._enqueue(incoming.name, STATUS_NEWS)
            if incoming.status == SUSPECT:
                self._suspects[incoming.name] = None
            return [("member_joined", incoming)] if incoming.status in (ALIVE, SUSPECT) else []
        if self.learn_coordinate(incoming.name, incoming.coord, incoming.coord_seq):
            self._enqueue(incoming.name, COORD_NEWS)
        if (incoming.incarnation, _RANK[incoming.status]) <= (current.incarnation, _RANK[current.status]):
            return []
        was = current.status
        current.incarnation, current.status = incoming.incarnation, incoming.status
        current.addr, current.site = incoming.addr, incoming.site
        if was != current.status:
            current.since = now
        if current.status == SUSPECT:
            self._suspects[current.name] = None
        self._enqueue(incoming.name, STATUS_NEWS)
        return _transition(was, current)

    def learn_coordinate(self, name: str, coord: Any, seq: int) -> bool:
        """Keep `coord` for member `name` if it is newer than what we have (ours we set ourselves).

        Called directly (a coordinate that came with an RPC answer), it is not relayed: the member
        announces its own coordinate every `coord_every` rounds. Learnt from gossip, it is.
        """
        member = self.members.get(name)
        if member is None or member is self.me or seq <= member.coord_seq:
            return False
        member.coord, member.coord_seq = coord, seq
        return True

    def set_own_coordinate(self, coord: Any, seq: int) -> None:
        self.me.coord, self.me.coord_seq = coord, seq

    def probe_target(self) -> Member | None:
        """Next member to probe: a shuffled round-robin over the others, as SWIM prescribes."""
        while True:
            if not self._probe_order:
                self._probe_order = [n for n, m in self.members.items()
                                     if m is not self.me and m.status in (ALIVE, SUSPECT)]
                self.rng.shuffle(self._probe_order)
                if not self._probe_order:
                    return None
            member = self.members.get(self._probe_order.pop())
            if member is not None and member.status in (ALIVE, SUSPECT):
                return member

    def on_probe_ok(self, name: str, rtt: float) -> None:
        """An RTT sample to `name` (from a probe or any other answered call); absurd values are dropped."""
        member = self.members.get(name)
        if member is not None and 0 < rtt < 10:
            if member.rtts is None:
                member.rtts = deque(maxlen=RTT_WINDOW)
            member.rtts.append(rtt)

    def on_probe_failed(self, name: str, now: float) -> list[tuple[str, Member]]:
        member = self.members.get(name)
        if member is None or member.status != ALIVE:
            return []
        member.status, member.since = SUSPECT, now
        self._suspects[name] = None
        self._enqueue(name, STATUS_NEWS)
        return [("member_suspect", member)]

    def expire(self, now: float) -> list[tuple[str, Member]]:
        """Suspects that did not refute in time are declared dead. The time grows with log N (as in
        memberlist): the suspicion and its refutation take O(log N) rounds to cross the cluster."""
        events = []
        timeout = self.suspect_timeout * max(1.0, math.log10(len(self.members)))
        for name in list(self._suspects):
            member = self.members[name]
            if member.status != SUSPECT:
                del self._suspects[name]
            elif now - member.since >= timeout:
                del self._suspects[name]
                member.status, member.since = DEAD, now
                self._enqueue(member.name, STATUS_NEWS)
                events.append(("member_dead", member))
        return events

    def leave(self) -> None:
        self.me.status = LEFT
        self.me.incarnation += 1
        self._enqueue(self.me.name, STATUS_NEWS)


def _transition(was: str, member: Member) -> list[tuple[str, Member]]:
    if was == member.status:
        return []
    if member.status == DEAD:
        return [("member_dead", member)]
    if member.status == LEFT:
        return [("member_left", member)]
    if member.status == ALIVE and was in (DEAD, LEFT):
        return [("member_joined", member)]
    if member.status == SUSPECT:
        return [("member_suspect", member)]
    return [("member_alive", member)]


def simulate_round(nodes: dict[str, Membership], now: float,
                   link: Callable[[str, str], bool] | None = None) -> list[tuple[dict[str, Any], Any]]:
    """One round of in-process nodes (no network): each probes its target by direct method calls.

    `nodes` maps names to the running nodes: a member missing from it is down. `link(a, b)` says
    whether a can reach b (a partition). Returns each (probe, answer) sent, answer None on failure.
    """
    sent: list[tuple[dict[str, Any], Any]] = []
    for name, node in nodes.items():
        target, full = node.next_round()
        if target is None:
            continue
        probe = node.message(full)
        peer = nodes.get(target.name)
        if peer is None or (link is not None and not link(name, target.name)):
            node.on_probe_failed(target.name, now)
            sent.append((probe, None))
            continue
        reply, _ = peer.answer(probe, now)
        node.receive(reply, now)
        sent.append((probe, reply))
    for node in nodes.values():
        node.expire(now)
    return sent


def simulated_cluster(n: int, seed: int = 0, coordinate: Callable[[random.Random], Any] | None = None,
                      **options: Any) -> dict[str, Membership]:
    """`n` in-process nodes, node-0 … node-(n-1) over four sites, that all know each other (and each
    other's `coordinate(rng)`, if given), with nothing queued: a cluster in its steady state.
    `options` go to each `Membership`."""
    rng = random.Random(seed)
    nodes = {f"node-{i}": Membership(f"node-{i}", f"10.{i >> 16}.{i >> 8 & 255}.{i & 255}:7946", f"site-{i % 4}",
                                     rng=random.Random(rng.random()), **options) for i in range(n)}
    for node in nodes.values():
        if coordinate is not None:
            node.set_own_coordinate(coordinate(rng), 1)
            node._coord_announced = (1, 0)  # everybody knows it already
    for node in nodes.values():
        for other in nodes.values():
            if other is not node:
                me = other.me
                node.members[me.name] = Member(me.name, me.addr, me.site, me.status, me.incarnation,
                                               coord=me.coord, coord_seq=me.coord_seq)
    return nodes
