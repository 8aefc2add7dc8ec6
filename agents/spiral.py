"""The spiral search between live agents: the sans-IO walk of `overlay.spiral` driven over the agents' RPC.

Every agent keeps a spiral `View` and answers `spiral.step`: it replies with the entries of its view the
asker lacks (each with its own distance to them) and what the asker's predicate may need (its site and
free capacity), then learns from the spiral view it received. The asker contacts each hop itself, so
every hop's RTT is measured on the way (the transport subtracts the peer's handling time) and becomes
that node's key in the walk.

The distance oracle is what an agent knows: its own measured RTT to a member when it has one (the
minimum of recent samples), else the Vivaldi estimate between the two coordinates. Gossip tells an
agent every member and its coordinate, so a view learns from all live members each tick, ranked by
that oracle (SWIM probes and the coordinate service's pings keep measuring the nearest ones), and from
every spiral that crosses it. `discovery sim spiral` measures this configuration on PlanetLab.

`SpiralService.search(count, predicate)` is the `spiral(origin, count, predicate)` of the DISCOVERY
paper with this agent as the origin; placement (`discovery.ve.service`) and DVMS use it.

A view never waits for the periodic refresh to be useful: it learns every live member when the service
starts, each member as membership announces it (`member_joined`, through the agent's notifier), and
again whenever it is found empty when a search starts or a step is asked of it. So a search on a fresh
cluster finds nodes as soon as membership knows them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agents.messages import SPIRAL_SEARCH, SPIRAL_STEP, SpiralFound, SpiralHop, SpiralNode, SpiralQuery, SpiralStep
from agents.runtime import Actor, Event
from overlay.membership import ALIVE, SUSPECT, Member, Membership
from overlay.spiral import Entry, SpiralSearch, View, answer
from overlay.wire.rpc import Caller, Endpoint, RequestError, RpcError
from vivaldi.coordinate import Coordinate

log = logging.getLogger(__name__)
VIEW_SIZE = 16
VIEW_FAR = 4
STEP_TIMEOUT = 3.0

Predicate = Callable[[Entry, dict[str, Any]], bool]
"""Whether a contacted node suits the application, given the node and its reply (site, free capacity)."""


@dataclass
class SpiralResult:
    nodes: list[Entry]
    replies: dict[str, dict[str, Any]] = field(default_factory=dict)
    hops: int = 0
    messages: int = 0
    failures: int = 0

    def keys(self) -> dict[str, float]:
        return {name: reply["rtt"] for name, reply in self.replies.items() if reply.get("rtt") is not None}


class SpiralService(Actor):
    """Receives the transport, the membership (this node is `membership.me`, with its name and site), a
    coordinate lookup for members (`CoordinateService.coordinate_of`) and a function giving this node's
    free capacity (what `spiral.step` answers, for the asker's predicate). Deliver it `member_joined`
    events (`Notifier.subscribe(service.tell_nowait, {"member_joined"})`) to learn members at once."""

    name = "spiral"
    tick_interval = 5.0

    def __init__(self, transport: Endpoint, membership: Membership,
                 coordinate_of: Callable[[Member], Coordinate | None], free: Callable[[], dict[str, int]]) -> None:
        super().__init__()
        self.transport = transport
        self.membership = membership
        self.coordinate_of = coordinate_of
        self.free = free
        self.view = View(self.entry(self.membership.me), self.distance, VIEW_SIZE, VIEW_FAR)
        transport.route(SPIRAL_STEP, self._on_step)
        transport.route(SPIRAL_SEARCH, self._on_search)

    async def start(self) -> None:
        self.refresh()

    async def tick(self) -> None:
        self.refresh()

    async def handle(self, event: Event) -> None:
        """A member joined: learn it now rather than at the next tick."""
        member = self.membership.members.get(event.data.get("name", ""))
        if member is not None and member is not self.membership.me and member.status in (ALIVE, SUSPECT):
            self.view.me = self.entry(self.membership.me)
            self.view.learn([self.entry(member)])

    def refresh(self) -> None:
        """Forget members no longer alive and learn every live one, ranked by the oracle."""
        alive = self.membership.alive(include_me=False)
        names = {m.name for m in alive}
        for entry in self.view.entries():
            if entry.name not in names:
                self.view.forget(entry.name)
        self.view.me = self.entry(self.membership.me)
        self.view.learn(self.entry(m) for m in alive)

    def _fill_if_empty(self) -> None:
        if not self.view.entries():
            self.refresh()

    # -- the oracle --------------------------------------------------------------------------------

    def entry(self, member: Member) -> Entry:
        return Entry(member.name, member.addr, self.coordinate_of(member), member.coord_seq)

    def distance(self, a: Entry, b: Entry) -> float:
        """Measured RTT when one end is this node and it has measured the other, else the estimate."""
        me = self.membership.me.name
        if me in (a.name, b.name):
            other = self.membership.members.get(b.name if a.name == me else a.name)
            if other is not None and other.rtt is not None:
                return other.rtt
        if isinstance(a.coord, Coordinate) and isinstance(b.coord, Coordinate):
            return a.coord.distance_to(b.coord)
        return math.inf  # no coordinate yet: last in every ranking

    # -- asking ------------------------------------------------------------------------------------

    async def search(self, count: int, predicate: Predicate | None = None, n: int | None = None) -> SpiralResult:
        """The `count` nearest live nodes to this one that satisfy `predicate`, nearest first."""
        self._fill_if_empty()
        replies: dict[str, dict[str, Any]] = {}
        suits = predicate or (lambda entry, reply: True)
        walk = SpiralSearch(self.distance, far=VIEW_FAR)
        walk.start(self.entry(self.membership.me), count, lambda e: suits(e, replies[e.name]),
                   n or max(count, VIEW_SIZE), self.view.entries())
        while (hop := walk.next_hop()) is not None:
            try:
                reply = await self.transport.ask(hop.addr, SPIRAL_STEP, SpiralStep(
                    [_entry_to_wire(e) for e in walk.spiral_view()]), timeout=STEP_TIMEOUT)
                entries = [(_entry_from_wire(hint[:4]), hint[4]) for hint in reply.entries]
            except (RpcError, RequestError) as err:
                log.debug("spiral hop %s failed: %s", hop.name, err)
                walk.on_failure(hop)
                self.view.forget(hop.name)
                continue
            member = self.membership.members.get(hop.name)
            rtt = member.rtt if member is not None else None
            replies[hop.name] = {"site": reply.site, "free": reply.free, "rtt": rtt}
            walk.on_reply(hop, entries, rtt)
        return SpiralResult(walk.result(), replies, walk.hops, walk.messages, walk.failures)

    # -- answering ---------------------------------------------------------------------------------

    async def _on_step(self, caller: Caller, request: SpiralStep) -> SpiralHop:
        spiral_view = [_entry_from_wire(item) for item in request.view]
        self._fill_if_empty()
        self.view.me = self.entry(self.membership.me)
        hinted = answer(self.view, spiral_view)
        return SpiralHop([(*_entry_to_wire(e), d) for e, d in hinted if math.isfinite(d)],
                         self.membership.me.site, self.free())

    async def _on_search(self, caller: Caller, request: SpiralQuery) -> SpiralFound:
        """`discovery spiral`: the nearest nodes to this agent, optionally in one site, with the walk's cost."""
        site = request.site
        result = await self.search(request.count, lambda e, reply: site is None or reply.get("site") == site)
        keys = result.keys()
        return SpiralFound(self.membership.me.name, result.hops, result.messages, result.failures,
                           [SpiralNode(e.name, result.replies[e.name].get("site"),
                                       round(keys[e.name] * 1000, 3) if e.name in keys else None,
                                       result.replies[e.name].get("free")) for e in result.nodes])


def _entry_to_wire(e: Entry) -> list[Any]:
    return [e.name, e.addr, e.coord.to_wire() if isinstance(e.coord, Coordinate) else None, e.seq]


def _entry_from_wire(data: Any) -> Entry:
    if not (isinstance(data, list | tuple) and len(data) >= 4 and isinstance(data[0], str) and data[0]
            and isinstance(data[1], str) and isinstance(data[3], int)):
        raise RequestError(f"malformed spiral entry {str(data)[:60]!r}")
    return Entry(data[0], data[1], Coordinate.from_wire(data[2]), data[3])

