"""Cluster membership, SWIM-style, with no I/O: who is in the cluster and who is alive.

Each node probes one random member per round; the probe carries the prober's member table and the
answer carries the target's (push-pull gossip), so news spreads in O(log N) rounds. A failed probe
makes the target `suspect`; a suspect that does not refute within `suspect_timeout` becomes `dead`.
A node refutes a rumour about itself by bumping its incarnation number, and the higher incarnation
wins everywhere (SWIM, Das et al. 2002; Serf/Consul work the same way). A voluntary leave is
announced as `left` and is never refuted.

Each entry also carries the member's latest network coordinate, opaque here, with a sequence number
the member bumps on every change: the higher sequence wins, whatever the entry's status.

Full tables travel on each probe, which is simple and fine for clusters of hundreds; the simulator
issue replaces them with piggybacked deltas for thousands of nodes.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any

ALIVE, SUSPECT, DEAD, LEFT = "alive", "suspect", "dead", "left"
_RANK = {ALIVE: 0, SUSPECT: 1, DEAD: 2, LEFT: 3}
"""At equal incarnation, the worse news wins (SWIM's precedence)."""
RTT_WINDOW = 16


@dataclass
class Member:
    name: str
    addr: str
    site: str
    status: str = ALIVE
    incarnation: int = 0
    since: float = 0.0
    coord: Any = None
    coord_seq: int = 0
    rtts: deque[float] = field(default_factory=lambda: deque(maxlen=RTT_WINDOW))

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


def _counter(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class Membership:
    """The member table of one node. Methods return the events they caused, as (kind, member) pairs."""

    def __init__(self, name: str, addr: str, site: str, suspect_timeout: float = 3.0,
                 rng: random.Random | None = None) -> None:
        self.me = Member(name, addr, site)
        self.members: dict[str, Member] = {name: self.me}
        self.suspect_timeout = suspect_timeout
        self.rng = rng or random.Random()
        self._probe_order: list[str] = []

    def alive(self, include_me: bool = True) -> list[Member]:
        return [m for m in self.members.values()
                if m.status in (ALIVE, SUSPECT) and (include_me or m is not self.me)]

    def table(self) -> list[dict[str, Any]]:
        return [m.to_wire() for m in self.members.values()]

    def merge(self, entries: Any, now: float) -> list[tuple[str, Member]]:
        """Fold a peer's table into ours; malformed entries are skipped, never fatal."""
        events: list[tuple[str, Member]] = []
        if not isinstance(entries, list):
            return events
        for entry in entries:
            incoming = member_from_wire(entry)
            if incoming is not None:
                events += self._apply(incoming, now)
        return events

    def _apply(self, incoming: Member, now: float) -> list[tuple[str, Member]]:
        if incoming.name == self.me.name:
            if incoming.status != ALIVE and incoming.incarnation >= self.me.incarnation \
                    and self.me.status == ALIVE:
                self.me.incarnation = incoming.incarnation + 1  # refute the rumour
            return []
        current = self.members.get(incoming.name)
        if current is not None:
            self.learn_coordinate(incoming.name, incoming.coord, incoming.coord_seq)
        if current is None:
            incoming.since = now
            self.members[incoming.name] = incoming
            return [("member_joined", incoming)] if incoming.status in (ALIVE, SUSPECT) else []
        if (incoming.incarnation, _RANK[incoming.status]) <= (current.incarnation, _RANK[current.status]):
            return []
        was = current.status
        current.incarnation, current.status = incoming.incarnation, incoming.status
        current.addr, current.site = incoming.addr, incoming.site
        if was != current.status:
            current.since = now
        return _transition(was, current)

    def learn_coordinate(self, name: str, coord: Any, seq: int) -> None:
        """Keep `coord` for member `name` if it is newer than what we have (ours we set ourselves)."""
        member = self.members.get(name)
        if member is not None and member is not self.me and seq > member.coord_seq:
            member.coord, member.coord_seq = coord, seq

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
            member.rtts.append(rtt)

    def on_probe_failed(self, name: str, now: float) -> list[tuple[str, Member]]:
        member = self.members.get(name)
        if member is None or member.status != ALIVE:
            return []
        member.status, member.since = SUSPECT, now
        return [("member_suspect", member)]

    def expire(self, now: float) -> list[tuple[str, Member]]:
        """Suspects that did not refute in time are declared dead."""
        events = []
        for member in self.members.values():
            if member.status == SUSPECT and now - member.since >= self.suspect_timeout:
                member.status, member.since = DEAD, now
                events.append(("member_dead", member))
        return events

    def leave(self) -> None:
        self.me.status = LEFT
        self.me.incarnation += 1


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
