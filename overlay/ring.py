"""The I/O shell of the Chord ring: RPC handlers and the maintenance rounds around `ChordState`.

All decisions live in `overlay.chord`; this module only carries messages. Lookups are iterative
(the asker contacts each hop itself), so a dead hop costs one timeout and a retry, not a lost request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from overlay.chord import ChordState, Peer, hash_id
from overlay.messages import (
    CHORD_NOTIFY,
    CHORD_STATE,
    CHORD_STEP,
    MAX_AVOID,
    ChordHop,
    ChordNotify,
    ChordStep,
    ChordView,
    NoArgs,
    PeerWire,
)
from overlay.wire.rpc import Caller, Endpoint, RemoteError, RequestError, RpcError

log = logging.getLogger(__name__)
MAX_HOPS = 64
HOP_TIMEOUT = 2.0


def peer_to_wire(peer: Peer) -> PeerWire:
    return peer.id, peer.name, peer.addr, peer.site


_decoded: dict[tuple[Any, ...], Peer] = {}
"""Peers already decoded (equal wire forms give one shared, immutable Peer); bounded."""
MAX_DECODED = 1 << 16


def peer_from_wire(data: Any) -> Peer:
    """`data` as a Peer: a request's `PeerWire` as it came (a list), or an answer's as decoded (a tuple)."""
    if (isinstance(data, list | tuple) and len(data) == 4 and isinstance(data[0], int)
            and isinstance(data[1], str) and isinstance(data[2], str) and isinstance(data[3], str)):
        key = tuple(data)
        peer = _decoded.get(key)
        if peer is None:
            if len(_decoded) >= MAX_DECODED:
                _decoded.clear()
            peer = _decoded[key] = Peer(*key)
        return peer
    raise RequestError(f"malformed peer {str(data)[:60]!r}")


class Ring:
    """One node's place on the Chord ring."""

    def __init__(self, transport: Endpoint, name: str, addr: str, site: str, r: int = 8,
                 distance: Callable[[Peer], float | None] | None = None, learn: bool = True) -> None:
        """`distance` estimates the latency to a peer (Vivaldi in agents): with it, fingers prefer the
        nearest acceptable node (proximity neighbour selection), and so do learned links. With `learn`,
        every lookup teaches the asker the nodes on its path and the owner (with `distance`, the owner's
        successors too), and teaches each node on the path the asker."""
        self.transport = transport
        self.distance = distance
        self.learn = learn
        self.me = Peer(hash_id(name), name, addr, site)
        self._me_wire = peer_to_wire(self.me)  # sent with every hop (copied by the transport)
        self.state = ChordState(self.me, r, distance=distance)
        self._pred_called = False
        """The predecessor called us (its stabilize, a lookup) since our last round: it is alive, no need to ask."""
        transport.route(CHORD_STEP, self._on_step)
        transport.route(CHORD_STATE, self._on_state)
        transport.route(CHORD_NOTIFY, self._on_notify)

    # -- handlers ----------------------------------------------------------------------------------

    def _heard(self, caller: Caller) -> None:
        """A call from our predecessor shows it alive: `check_predecessor` need not ask it this round."""
        pred = self.state.predecessor
        self._pred_called |= pred is not None and caller.node == pred.name

    async def _on_step(self, caller: Caller, request: ChordStep) -> ChordHop:
        self._heard(caller)
        if self.learn and request.sender is not None:
            self.state.learn(peer_from_wire(request.sender))
        avoided = frozenset(request.avoid)
        for dead in avoided:  # the asker found them dead: no longer worth a learned link here either
            self.state.unlearn(dead)
        done, peer = self.state.lookup_step(request.key, avoided)
        if not done:
            return ChordHop(False, peer_to_wire(peer))
        return ChordHop(True, peer_to_wire(peer), [peer_to_wire(p) for p in self.state.live_successors(avoided)])

    async def _on_state(self, caller: Caller, request: NoArgs) -> ChordView:
        self._heard(caller)
        pred = self.state.predecessor
        return ChordView(peer_to_wire(pred) if pred else None, [peer_to_wire(p) for p in self.state.successor_list()])

    async def _on_notify(self, caller: Caller, request: ChordNotify) -> bool:
        self._heard(caller)
        return self.state.on_notify(peer_from_wire(request.peer))

    # -- operations --------------------------------------------------------------------------------

    async def join(self, seeds: list[str]) -> bool:
        """Join through the first seed that answers; with none, this node starts (or stays) alone."""
        for seed in seeds:
            if seed == self.me.addr:
                continue
            try:
                owners = await self._walk([Peer(-1, seed, seed, "")], self.me.id, set(), [0])
            except (RpcError, RequestError) as err:
                owners = None
                log.info("join through %s failed: %s", seed, err)
            if not owners:
                continue
            successors = [p for p in owners if p.name != self.me.name]
            if successors:
                self.state.join(successors[0], successors[1:])
                log.info("joined the ring through %s; successor %s", seed, successors[0].name)
                return True
        return False

    async def lookup(self, key: int, count: int = 1) -> list[Peer]:
        """The `count` live nodes that follow `key` on the ring (its owner first)."""
        return (await self.lookup_with_hops(key, count))[0]

    async def lookup_with_hops(self, key: int, count: int = 1) -> tuple[list[Peer], int]:
        """`lookup`, plus how many nodes were asked (hops of the iterative lookup, failed ones included).

        A hop that does not answer is avoided from then on: the walk backs up to the previous node
        and asks it for another route, and our own dead fingers and successors are dropped.
        """
        avoid: set[int] = set()
        hops = [0]
        while hops[0] < MAX_HOPS:
            avoided = frozenset(avoid)
            done, start = self.state.lookup_step(key, avoided)
            if done:
                return self.state.live_successors(avoided)[:count], hops[0]
            found = await self._walk([start], key, avoid, hops)
            if found is not None:
                return found[:count], hops[0]
            self.state.on_dead(start)  # it (or everything after it) failed: stop relying on it
        raise RequestError(f"lookup of key {key:x} exceeded {MAX_HOPS} hops")

    async def _walk(self, path: list[Peer], key: int, avoid: set[int], hops: list[int]) -> list[Peer] | None:
        """Iterate from path[-1] toward `key`; None if every node of the path failed."""
        while path and hops[0] < MAX_HOPS:
            node = path[-1]
            hops[0] += 1
            step = ChordStep(key, sorted(avoid)[:MAX_AVOID] if avoid else [], self._me_wire)
            try:
                reply = await self.transport.ask(node.addr, CHORD_STEP, step, timeout=HOP_TIMEOUT)
            except RemoteError:
                raise
            except RpcError as err:
                log.debug("lookup hop %s failed: %s", node.name, err)
                avoid.add(node.id)
                self.state.unlearn(node.id)
                path.pop()  # back up one hop and ask there for another route
                continue
            peer = peer_from_wire(reply.peer)
            if reply.done:
                owners = [peer_from_wire(p) for p in reply.successors]
                if self.learn:
                    # with latency estimates, the owner's successors come along too: more links to choose
                    # the nearer from (without, they would only push out the path's more useful nodes)
                    for met in [*path, *(owners if self.distance is not None else owners[:1])]:
                        if met.id >= 0:  # not the placeholder of a seed known by address only
                            self.state.learn(met)
                return owners
            if peer.id == node.id or peer.id in avoid:
                raise RequestError(f"lookup of key {key:x} stuck at {node.name}")
            path.append(peer)
        return None

    async def stabilize(self) -> None:
        """One round of Zave's stabilize: learn from the successor, then notify it."""
        while True:
            target = self.state.stabilize_target()
            try:
                if target == self.me:  # alone: answer our own query (a joiner may have notified us)
                    pred, succs = self.state.predecessor, self.state.successor_list()
                else:
                    view = await self.transport.ask(target.addr, CHORD_STATE, NoArgs(), timeout=HOP_TIMEOUT)
                    pred = peer_from_wire(view.predecessor) if view.predecessor else None
                    succs = [peer_from_wire(p) for p in view.successors]
            except (RpcError, RequestError) as err:
                log.info("successor %s unreachable (%s); trying the next", target.name, err)
                self.state.on_dead(target)
                continue
            notify = self.state.on_stabilize(target, pred, succs)
            if notify == target and pred == self.me:
                return  # it holds us as its predecessor already: a notify would change nothing
            if notify is not None and notify != self.me and not await self._notify(notify):
                # the adopted successor (our successor's stale predecessor) is dead: drop it and notify
                # the successor we had; asking that successor again would only hand the dead node back
                self.state.on_dead(notify)
                if self.state.successor != self.me:
                    await self._notify(self.state.successor)
            return

    async def _notify(self, peer: Peer) -> bool:
        try:
            await self.transport.ask(peer.addr, CHORD_NOTIFY, ChordNotify(self._me_wire), timeout=HOP_TIMEOUT)
        except RpcError as err:
            log.info("notify of %s failed: %s", peer.name, err)
            return False
        return True

    async def check_predecessor(self) -> None:
        """Ask the predecessor whether it is alive, unless it called us since the last round (an idle ring's
        RPCs: one state and one finger step per round, rather than also a notify and this check)."""
        pred, called, self._pred_called = self.state.predecessor, self._pred_called, False
        if pred is None or pred == self.me or called:
            return
        try:
            await self.transport.ask(pred.addr, CHORD_STATE, NoArgs(), timeout=HOP_TIMEOUT)
        except RpcError:
            self.state.on_dead(pred)

    async def fix_finger(self) -> None:
        index, target = self.state.next_finger()
        try:
            owners = await self.lookup(target, self.state.r if self.distance else 1)
        except (RpcError, RequestError):
            return
        if owners:
            self.state.set_finger(index, owners[0], self.nearest(owners))

    def nearest(self, peers: list[Peer]) -> Peer | None:
        """The peer estimated nearest to us (None without a distance function or estimates)."""
        if self.distance is None:
            return None
        known = [(d, p) for p in peers if p != self.me and (d := self.distance(p)) is not None]
        return min(known, key=lambda pair: pair[0])[1] if known else None

    async def maintain(self, fingers: bool = True) -> None:
        """One maintenance round: stabilize, check the predecessor, fix one finger (unless `fingers` is off)."""
        await self.stabilize()
        await self.check_predecessor()
        if fingers:
            await self.fix_finger()
