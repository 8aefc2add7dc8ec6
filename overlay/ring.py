"""The I/O shell of the Chord ring: RPC handlers and the maintenance rounds around `ChordState`.

All decisions live in `overlay.chord`; this module only carries messages. Lookups are iterative
(the asker contacts each hop itself), so a dead hop costs one timeout and a retry, not a lost request.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from overlay.chord import ChordState, Peer, hash_id
from overlay.rpc import Caller, RequestError, RpcError, Transport

log = logging.getLogger(__name__)
MAX_HOPS = 64
HOP_TIMEOUT = 2.0


def peer_to_wire(peer: Peer) -> list[Any]:
    return [peer.id, peer.name, peer.addr, peer.site]


def peer_from_wire(data: Any) -> Peer:
    if not (isinstance(data, list) and len(data) == 4 and isinstance(data[0], int)
            and all(isinstance(x, str) for x in data[1:])):
        raise RequestError(f"malformed peer {str(data)[:60]!r}")
    return Peer(data[0], data[1], data[2], data[3])


def peers_from_wire(data: Any) -> list[Peer]:
    if not isinstance(data, list):
        raise RequestError("expected a list of peers")
    return [peer_from_wire(p) for p in data]


class Ring:
    """One node's place on the Chord ring."""

    def __init__(self, transport: Transport, name: str, addr: str, site: str, r: int = 8) -> None:
        self.transport = transport
        self.me = Peer(hash_id(name), name, addr, site)
        self.state = ChordState(self.me, r)
        transport.route("chord.step", self._on_step)
        transport.route("chord.state", self._on_state)
        transport.route("chord.notify", self._on_notify)

    # -- handlers ----------------------------------------------------------------------------------

    async def _on_step(self, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        key = args.get("key")
        if not isinstance(key, int) or not 0 <= key < 2**64:
            raise RequestError("chord.step needs an integer key")
        done, peer = self.state.lookup_step(key)
        reply: dict[str, Any] = {"done": done, "peer": peer_to_wire(peer)}
        if done:
            reply["successors"] = [peer_to_wire(p) for p in self.state.successor_list()]
        return reply

    async def _on_state(self, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        pred = self.state.predecessor
        return {"predecessor": peer_to_wire(pred) if pred else None,
                "successors": [peer_to_wire(p) for p in self.state.successor_list()]}

    async def _on_notify(self, caller: Caller, args: dict[str, Any]) -> bool:
        return self.state.on_notify(peer_from_wire(args.get("peer")))

    # -- operations --------------------------------------------------------------------------------

    async def join(self, seeds: list[str]) -> bool:
        """Join through the first seed that answers; with none, this node starts (or stays) alone."""
        for seed in seeds:
            if seed == self.me.addr:
                continue
            try:
                owners = await self._lookup_from(seed, self.me.id)
            except (RpcError, RequestError) as err:
                log.info("join through %s failed: %s", seed, err)
                continue
            successors = [p for p in owners if p.name != self.me.name]
            if successors:
                self.state.join(successors[0], successors[1:])
                log.info("joined the ring through %s; successor %s", seed, successors[0].name)
                return True
        return False

    async def lookup(self, key: int, count: int = 1) -> list[Peer]:
        """The `count` live nodes that follow `key` on the ring (its owner first)."""
        for _ in range(3):
            start = self.state.closest_preceding(key)
            if start == self.me:
                done, peer = self.state.lookup_step(key)
                if done:
                    return self.state.successor_list()[:count]
                start = peer
            try:
                return (await self._lookup_from(start.addr, key))[:count]
            except (RpcError, RequestError) as err:
                log.debug("lookup of %x via %s failed: %s", key, start.name, err)
                self.state.on_dead(start)
        raise RequestError(f"lookup of key {key:x} failed after 3 attempts")

    async def _lookup_from(self, addr: str, key: int) -> list[Peer]:
        for _ in range(MAX_HOPS):
            reply = await self.transport.call(addr, "chord.step", {"key": key}, timeout=HOP_TIMEOUT)
            peer = peer_from_wire(reply.get("peer"))
            if reply.get("done"):
                return peers_from_wire(reply.get("successors"))
            if peer.addr == addr:
                raise RequestError(f"lookup stuck at {peer.name}")
            addr = peer.addr
        raise RequestError(f"lookup of key {key:x} exceeded {MAX_HOPS} hops")

    async def stabilize(self) -> None:
        """One round of Zave's stabilize: learn from the successor, then notify it."""
        while True:
            target = self.state.stabilize_target()
            try:
                if target == self.me:  # alone: answer our own query (a joiner may have notified us)
                    pred, succs = self.state.predecessor, self.state.successor_list()
                else:
                    reply = await self.transport.call(target.addr, "chord.state", timeout=HOP_TIMEOUT)
                    raw = reply.get("predecessor")
                    pred, succs = (peer_from_wire(raw) if raw else None), peers_from_wire(reply.get("successors"))
            except (RpcError, RequestError) as err:
                log.info("successor %s unreachable (%s); trying the next", target.name, err)
                self.state.on_dead(target)
                continue
            notify = self.state.on_stabilize(target, pred, succs)
            if notify is not None and notify != self.me:
                try:
                    await self.transport.call(notify.addr, "chord.notify",
                                              {"peer": peer_to_wire(self.me)}, timeout=HOP_TIMEOUT)
                except RpcError as err:
                    # the adopted successor is unreachable: drop it, or it would be re-adopted every round
                    log.info("notify of %s failed: %s", notify.name, err)
                    self.state.on_dead(notify)
                    continue
            return

    async def check_predecessor(self) -> None:
        pred = self.state.predecessor
        if pred is None or pred == self.me:
            return
        try:
            await self.transport.call(pred.addr, "chord.state", timeout=HOP_TIMEOUT)
        except RpcError:
            self.state.on_dead(pred)

    async def fix_finger(self) -> None:
        index, target = self.state.next_finger()
        try:
            owners = await self.lookup(target)
        except (RpcError, RequestError):
            return
        if owners:
            self.state.set_finger(index, owners[0])

    async def maintain(self, interval: float = 0.5) -> None:
        """Stabilize, check the predecessor and fix a finger, forever."""
        while True:
            await self.stabilize()
            await self.check_predecessor()
            await self.fix_finger()
            await trio.sleep(interval)
