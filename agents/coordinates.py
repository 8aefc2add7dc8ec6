"""This node's Vivaldi coordinate, fed by the RPCs the agent already makes.

Every answered call brings the peer's coordinate and a clean RTT (the transport subtracts the
peer's handling time), which `vivaldi.coordinate.Client` turns into an update. Coordinates of other
members travel in the membership gossip. Each tick the service also samples one node of its view,
the closest known nodes by estimate plus a few random far ones, as the DISCOVERY paper asks: close
nodes refine the local map, far ones keep the global one right. A view member that answered some other
call within `SAMPLED_WITHIN` seconds (a gossip probe, a ring round) already gave that sample and is not
pinged: in a small cluster, where those calls reach every member every few seconds, the service's own
pings stop; in a large one they still reach the close nodes that gossip seldom probes. The coordinate
survives restarts.
"""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path
from typing import Any

import trio

from agents.messages import (
    COORD_LIST,
    COORD_PING,
    COORD_PROBE,
    COORD_RTT,
    CoordinateRow,
    Coordinates,
    Probe,
    Rtt,
    RttEstimate,
)
from agents.runtime import Actor
from overlay.membership import Member, Membership
from overlay.messages import NoArgs
from overlay.wire.rpc import Caller, Endpoint, RequestError, RpcError
from vivaldi.coordinate import Client, Config, Coordinate, estimate

log = logging.getLogger(__name__)
VIEW_CLOSE = 8
VIEW_FAR = 4
PROBES = 3
SAVE_EVERY = 10.0
"""Seconds between two saves of a moving coordinate: a restart loses at most that much of its way."""
SAMPLED_WITHIN = float(VIEW_CLOSE + VIEW_FAR)
"""Seconds since a view member's last sample after which the tick pings it: as often as picking one member of
a full view at random each second samples each (on average)."""


class CoordinateService(Actor):
    """Receives the transport (whose answered calls it samples, and whose responses it stamps with this
    node's coordinate), the membership (where members' coordinates and measured RTTs live) and the file
    that keeps the coordinate across restarts."""

    name = "coordinates"
    tick_interval = 1.0

    def __init__(self, transport: Endpoint, membership: Membership, path: Path, config: Config | None = None) -> None:
        super().__init__()
        self.transport = transport
        self.membership = membership
        self.config = config or Config()
        self.client = Client(self.config)
        self.rng = random.Random()
        self.path = path
        self.seq = 0
        self._saved_seq = -1
        self._saved_at = -SAVE_EVERY
        self._last_rtt: dict[str, float] = {}
        self._sampled: dict[str, float] = {}
        """Member name -> when its last RTT sample came (trio time)."""
        self._decoded: dict[str, tuple[Any, Coordinate | None]] = {}
        """Member name -> (its coordinate as gossip or an answer gave it, decoded): decoding is checked, and the
        ring and the view ask for the same coordinates many times a second."""
        self._restore()
        transport.stamp = self.stamp
        transport.on_rtt = self.on_rtt
        transport.route(COORD_PING, self._on_ping)
        transport.route(COORD_LIST, self._on_list)
        transport.route(COORD_RTT, self._on_rtt)
        transport.route(COORD_PROBE, self._on_probe)

    # -- samples -----------------------------------------------------------------------------------

    def stamp(self) -> dict[str, Any]:
        return {"c": self.client.coordinate.to_wire(), "s": self.seq}

    def on_rtt(self, peer: str, rtt: float, stamp: Any) -> None:
        """Every answered call: a measured RTT for membership, and a Vivaldi sample if the peer sent its coordinate."""
        self.membership.on_probe_ok(peer, rtt)
        self._last_rtt[peer] = rtt
        self._sampled[peer] = trio.current_time()
        if not isinstance(stamp, dict) or not isinstance(stamp.get("s"), int):
            return
        other = Coordinate.from_wire(stamp.get("c"), self.config.dimensionality)
        if other is None:
            return
        wire = other.to_wire()
        if self.membership.learn_coordinate(peer, wire, stamp["s"]):
            self._decoded[peer] = (wire, other)
        try:
            self.client.update(peer, other, rtt)
        except ValueError as err:
            log.debug("sample from %s rejected: %s", peer, err)
            return
        self.seq += 1
        self.membership.set_own_coordinate(self.client.coordinate.to_wire(), self.seq)

    async def tick(self) -> None:
        target = self.pick_from_view(trio.current_time())
        if target is not None:
            try:
                await self.transport.call(target.addr, "coord.ping", timeout=2.0)
            except RpcError as err:
                log.debug("coordinate sample from %s failed: %s", target.name, err)
        if self.seq != self._saved_seq and trio.current_time() >= self._saved_at + SAVE_EVERY:
            self._save()
        for table in (self._decoded, self._sampled):  # forget the members forgotten
            for gone in [name for name in table if name not in self.membership.members]:
                del table[gone]

    def pick_from_view(self, now: float) -> Member | None:
        """A random member of the view that gave no sample within SAMPLED_WITHIN seconds; None if there is none."""
        def stale(m: Member) -> bool:
            return now - self._sampled.get(m.name, -math.inf) >= SAMPLED_WITHIN

        if not any(map(stale, self.membership.alive(include_me=False))):
            return None  # nobody to ping, whatever the view: no need to rank the members
        candidates = [m for m in self.view() if stale(m)]
        return self.rng.choice(candidates) if candidates else None

    def view(self) -> list[Member]:
        """The closest known members by estimated RTT, plus a few random far ones."""
        others = [m for m in self.membership.alive(include_me=False)]
        known = [(self.estimate_to(m), m) for m in others]
        ranked = sorted((d, m.name, m) for d, m in known if d is not None)
        close = [m for _, _, m in ranked[:VIEW_CLOSE]]
        rest = [m for m in others if m not in close]
        return close + self.rng.sample(rest, min(VIEW_FAR, len(rest)))

    def coordinate_of(self, member: Member) -> Coordinate | None:
        if member is self.membership.me:
            return self.client.coordinate
        cached = self._decoded.get(member.name)
        if cached is not None and cached[0] is member.coord:  # the same wire object: the same coordinate
            return cached[1]
        coordinate = Coordinate.from_wire(member.coord, self.config.dimensionality)
        self._decoded[member.name] = (member.coord, coordinate)
        return coordinate

    def estimate_to(self, member: Member) -> float | None:
        other = self.coordinate_of(member)
        return self.client.distance_to(other) if other is not None else None

    # -- persistence -------------------------------------------------------------------------------

    def _restore(self) -> None:
        try:
            saved = json.loads(self.path.read_text())
            coordinate = Coordinate.from_wire(saved["coordinate"], self.config.dimensionality)
            if coordinate is None:
                raise ValueError("invalid coordinate")
            self.client.set_coordinate(coordinate)
            self.seq = self._saved_seq = int(saved["seq"])
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("ignoring saved coordinate in %s: %s", self.path, err)
            return
        self.membership.set_own_coordinate(self.client.coordinate.to_wire(), self.seq)

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"coordinate": self.client.coordinate.to_wire(), "seq": self.seq}))
        tmp.replace(self.path)  # atomic: a crash never leaves half a file
        self._saved_seq, self._saved_at = self.seq, trio.current_time()

    # -- handlers ----------------------------------------------------------------------------------

    async def _on_ping(self, caller: Caller, request: NoArgs) -> bool:
        return True  # the coordinate and the held time ride on the response itself

    async def _on_list(self, caller: Caller, request: NoArgs) -> Coordinates:
        me = self.membership.me
        rows = []
        for member in sorted(self.membership.members.values(), key=lambda m: m.name):
            coordinate = self.coordinate_of(member)
            if coordinate is None:
                continue
            est, bound = estimate(self.client.coordinate, coordinate) if member is not me else (None, None)
            rows.append(CoordinateRow(member.name, member.site, member.status,
                                      [round(x * 1000, 3) for x in coordinate.vec],
                                      round(coordinate.height * 1000, 3), round(coordinate.error, 4), _ms(est),
                                      _ms(bound), _ms(member.rtt), member is me))
        return Coordinates(me.name, self.config.dimensionality, rows)

    async def _on_rtt(self, caller: Caller, request: Rtt) -> RttEstimate:
        """Estimated vs measured RTT between `a` and `b` (default: this node), like `consul rtt`."""
        a = self._member(request.a)
        b = self._member(request.b) if request.b is not None else self.membership.me
        ca, cb = self.coordinate_of(a), self.coordinate_of(b)
        if ca is None or cb is None:
            raise RequestError(f"no coordinate known yet for {a.name if ca is None else b.name}")
        est, bound = estimate(ca, cb)
        if a is self.membership.me or b is self.membership.me:
            other = b if a is self.membership.me else a
            measured = await self._measure(other)
        else:  # ask one end to measure the other
            measured = await self.transport.ask(a.addr, COORD_PROBE, Probe(b.name), timeout=10)
        return RttEstimate(a.name, b.name, round(est * 1000, 3), round(bound * 1000, 3), round(measured * 1000, 3))

    async def _on_probe(self, caller: Caller, request: Probe) -> float:
        return await self._measure(self._member(request.target))

    async def _measure(self, member: Member) -> float:
        """The minimum of a few fresh RTT samples to `member` (seconds)."""
        if member is self.membership.me:
            return 0.0
        samples = []
        for _ in range(PROBES):
            self._last_rtt.pop(member.name, None)
            await self.transport.call(member.addr, "coord.ping", timeout=5)
            if member.name in self._last_rtt:  # set by on_rtt while the call returned
                samples.append(self._last_rtt[member.name])
        if not samples:
            raise RequestError(f"no RTT sample from {member.name}")
        return min(samples)

    def _member(self, name: str) -> Member:
        member = self.membership.members.get(name)
        if member is None:
            raise RequestError(f"unknown node {name!r}")
        return member


def _ms(seconds: float | None) -> float | None:
    return round(seconds * 1000, 3) if seconds is not None else None
