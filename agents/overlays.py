"""The agent's two overlays, and the record store its services use, which can move between them at run time.

Chord's DHT (`overlay.dht`, over the ring) is always there; a Kademlia overlay (`overlay.kad`, the
`kademlia` package under trio-asyncio) runs beside it when the agent's config enables it; otherwise nothing
here imports it, nor asyncio (the node builds the Kademlia overlay and hands it over). Services (the
VE directory) never hold either: they hold `agent.records`, a `Records` binding, which answers from
whichever overlay the cluster is bound to now. `discovery overlay bind kademlia` re-binds every agent:

1. the agent that got the request freezes every live member's binding (`overlay.freeze`: new writes
   wait, writes in flight finish; a lease ends the freeze if the coordinator dies);
2. it copies every record of the old overlay to the new one (`interface.copy_records`): the newest
   version of each key, deletions included, so nothing stale reappears;
3. it tells every member to switch (`overlay.switch`), which thaws it.

A member that missed step 3 (or was down) adopts the newest binding from its peers: each binding carries
an epoch, and the higher one wins. It asks a peer for its binding at start (until one answers), at every
tick while frozen, from each member that joins or comes back (after a partition healed, either side may hold
the newer binding) and, failing all that, every PULL_EVERY seconds; not every tick, which would cost every
agent an RPC served every two seconds for a switch that is almost never missed. The binding survives a
restart (`binding.json` in the data directory). If a member cannot be frozen, nothing switches.

Kademlia cannot list a key space, and neither can Chord cheaply: `Records.scan` asks every live member
for the records it holds locally of the bound overlay and keeps the newest copy of each key.
"""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from agents.messages import (
    OVERLAY_BIND,
    OVERLAY_CONTACT,
    OVERLAY_FREEZE,
    OVERLAY_GET,
    OVERLAY_PUT,
    OVERLAY_SCAN,
    OVERLAY_STATUS,
    OVERLAY_SWITCH,
    OVERLAY_THAW,
    KademliaContact,
    KademliaStatus,
    KvGet,
    KvPut,
    KvRead,
    KvWritten,
    OverlayName,
    OverlayScan,
    OverlayStatus,
    OverlaySwitch,
    Rebound,
)
from agents.runtime import Actor, Event
from overlay.dht import DHT, Record, record_from_wire
from overlay.interface import Binding, Overlay, copy_records
from overlay.membership import Member, Membership
from overlay.messages import NoArgs
from overlay.wire.rpc import Caller, Endpoint, RequestError, RpcError, split_addr

if TYPE_CHECKING:
    from overlay.kad import KademliaOverlay

log = logging.getLogger(__name__)
CHORD, KADEMLIA = "chord", "kademlia"
FREEZE_LEASE = 30.0
"""How long a member stays frozen without hearing the switch: longer than a copy of the directory takes."""
OP_TIMEOUT = 15.0
CALL_TIMEOUT = 5.0
REJOIN_EVERY = 30.0
PULL_EVERY = 30.0
"""Seconds between two unprompted reads of a random peer's binding (module doc)."""


class Records(Binding):
    """The binding the agent's services use: records on the bound overlay, with a cluster-wide listing.

    Kademlia's failures (nobody answered, a value too large) come out as `RequestError`, as the Chord
    DHT's do, so a service handles one kind of error whichever overlay answers.
    """

    def __init__(self, service: OverlayService, overlay: Overlay, name: str) -> None:
        super().__init__(overlay, name)
        self.service = service

    async def get(self, key: str) -> Record | None:
        return await _guarded(super().get(key), self.service.errors)

    async def get_record(self, key: str) -> Record | None:
        return await _guarded(super().get_record(key), self.service.errors)

    async def put(self, key: str, value: Any, after: int | None = None) -> Record:
        return await _guarded(super().put(key, value, after), self.service.errors)

    async def put_if(self, key: str, value: Any, expect: Record | None) -> Record:
        return await _guarded(super().put_if(key, value, expect), self.service.errors)

    async def update(self, key: str, value: Any, expect: Record | None) -> Record:
        return await _guarded(super().update(key, value, expect), self.service.errors)

    async def scan(self, prefix: str) -> list[Record]:
        """Every live record whose key starts with `prefix`, newest copy of each, from all live members."""
        return [r for r in await self.service.scan(self.name, prefix) if not r.deleted]


async def _guarded(operation: Any, errors: tuple[type[Exception], ...]) -> Any:
    """Await an overlay operation: its failures (`errors`) and a timeout become RequestError."""
    try:
        with trio.fail_after(OP_TIMEOUT):
            return await operation
    except errors as err:
        raise RequestError(str(err)) from None
    except trio.TooSlowError:
        raise RequestError(f"the overlay did not answer within {OP_TIMEOUT:.0f} s") from None


class OverlayService(Actor):
    """Owns both overlays and the binding; bootstraps Kademlia from members; adopts newer bindings.

    Receives the transport, the membership (whom to freeze, scan and bootstrap from), the Chord DHT (whose
    shard answers this node's part of a scan), the Kademlia overlay or None, where Kademlia listens (host,
    UDP port: 0 picks one) and the file that keeps the binding across restarts.
    """

    name = "overlays"
    tick_interval = 2.0

    def __init__(self, transport: Endpoint, membership: Membership, chord: DHT, kad: KademliaOverlay | None,
                 listen: tuple[str, int], path: Path) -> None:
        super().__init__()
        self.transport = transport
        self.membership = membership
        self.chord = chord
        self.kad = kad
        self.listen = listen
        self.errors: tuple[type[Exception], ...] = (ValueError,)
        """What the bound overlays raise for a failed operation (Kademlia's own error when it runs)."""
        self.overlays: dict[str, Overlay] = {CHORD: chord}
        if kad is not None:
            from overlay.kad import KademliaError  # loaded already, with the overlay: only then is asyncio in
            self.errors += (KademliaError,)
            self.overlays[KADEMLIA] = kad
        self.path = path
        bound, self.epoch = self._load()
        self.records = Records(self, self.overlays[bound], bound)
        self._lease_end = 0.0
        self._kad_started = False
        self._next_rejoin = 0.0
        self._next_pull = -math.inf
        transport.route(OVERLAY_STATUS, self._on_status)
        transport.route(OVERLAY_CONTACT, self._on_contact)
        transport.route(OVERLAY_SCAN, self._on_scan)
        transport.route(OVERLAY_FREEZE, self._on_freeze)
        transport.route(OVERLAY_SWITCH, self._on_switch)
        transport.route(OVERLAY_THAW, self._on_thaw)
        transport.route(OVERLAY_BIND, self._on_bind)
        transport.route(OVERLAY_GET, self._on_get)
        transport.route(OVERLAY_PUT, self._on_put)

    async def start_kademlia(self) -> None:
        """Listen on UDP beside the agent's TCP address; joining waits for the first tick with members."""
        if self.kad is None or self._kad_started:
            return
        host, port = self.listen
        await self.kad.start(host, port, [])
        self._kad_started = True
        log.info("kademlia listening on %s:%d/udp", host, self.kad.port)

    async def close(self) -> None:
        if self.kad is not None and self._kad_started:
            await self.kad.close()

    async def tick(self) -> None:
        if self.records.frozen and trio.current_time() > self._lease_end:
            log.warning("binding frozen for %.0f s without a switch: thawing", FREEZE_LEASE)
            self.records.thaw()
        if self.records.frozen or trio.current_time() >= self._next_pull:
            others = self.membership.alive(include_me=False)
            if others:
                await self._adopt_newer_binding(random.choice(others))
        if self.kad is not None and self._kad_started:
            await self._keep_kademlia_joined(self.kad)

    # -- Kademlia bootstrap ------------------------------------------------------------------------

    async def _keep_kademlia_joined(self, kad: KademliaOverlay) -> None:
        """Join through a few random members when alone, and again every REJOIN_EVERY while the routing
        table knows fewer contacts than there are members: nodes that bootstrapped through each other
        at the same moment would otherwise stay islands, each finding only its own copies."""
        others = self.membership.alive(include_me=False)
        known = kad.neighbours()
        now = trio.current_time()
        if not others or (known and (known >= len(others) or now < self._next_rejoin)):
            return
        self._next_rejoin = now + REJOIN_EVERY
        contacts = []
        for member in random.sample(others, min(3, len(others))):
            try:
                contact = await self.transport.ask(member.addr, OVERLAY_CONTACT, NoArgs(), timeout=CALL_TIMEOUT)
                contacts.append((split_addr(member.addr)[0], contact.kad_port))
            except RpcError as err:
                log.debug("no kademlia contact from %s: %s", member.name, err)
        if contacts:
            with trio.move_on_after(OP_TIMEOUT):
                await kad.join(contacts)

    async def _on_contact(self, caller: Caller, request: NoArgs) -> KademliaContact:
        if self.kad is None or not self._kad_started:
            raise RequestError("this agent runs no Kademlia overlay")
        return KademliaContact(self.kad.port)

    # -- the binding -------------------------------------------------------------------------------

    def _load(self) -> tuple[str, int]:
        try:
            saved = json.loads(self.path.read_text())
            if saved["overlay"] in self.overlays and isinstance(saved["epoch"], int):
                return saved["overlay"], saved["epoch"]
            log.warning("%s names an overlay this agent does not run: bound to chord", self.path)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("ignoring %s: %s", self.path, err)
        return CHORD, 0

    def _switch(self, name: str, epoch: int) -> None:
        self.records.switch(self.overlays[name], name)
        self.epoch = epoch
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"overlay": name, "epoch": epoch}))
        tmp.replace(self.path)
        self.records.thaw()
        log.info("records bound to %s (epoch %d)", name, epoch)

    async def handle(self, event: Event) -> None:
        """A member joined or came back: it may hold a binding we missed, or have missed ours (it asks us)."""
        member = self.membership.members.get(event.data["name"])
        if member is not None:
            await self._adopt_newer_binding(member)

    async def _adopt_newer_binding(self, peer: Member) -> None:
        try:
            status = await self.transport.ask(peer.addr, OVERLAY_STATUS, NoArgs(), timeout=CALL_TIMEOUT)
        except RpcError:
            return
        self._next_pull = trio.current_time() + PULL_EVERY
        if status.epoch > self.epoch and status.overlay in self.overlays and not status.frozen:
            log.info("adopting %s's binding", peer.name)
            self._switch(status.overlay, status.epoch)

    def _status(self) -> OverlayStatus:
        kad = None
        if self.kad is not None and self._kad_started:
            kad = KademliaStatus(self.kad.port, self.kad.neighbours())
        return OverlayStatus(self.membership.me.name, self.records.name, self.epoch, self.records.frozen,
                             sorted(self.overlays), kad)

    async def _on_status(self, caller: Caller, request: NoArgs) -> OverlayStatus:
        return self._status()

    async def _on_freeze(self, caller: Caller, request: OverlayName) -> bool:
        """Hold writes until the switch; refused by a member that does not run the overlay to come."""
        self._overlay_named(request.overlay)
        self._lease_end = trio.current_time() + FREEZE_LEASE
        await self.records.freeze()
        return True

    async def _on_thaw(self, caller: Caller, request: NoArgs) -> bool:
        self.records.thaw()
        return True

    async def _on_switch(self, caller: Caller, request: OverlaySwitch) -> bool:
        name = self._overlay_named(request.overlay)
        if request.epoch > self.epoch:
            self._switch(name, request.epoch)
        self.records.thaw()
        return True

    async def _on_bind(self, caller: Caller, request: OverlayName) -> Rebound:
        """Re-bind the whole cluster's records to another overlay (see the module docstring)."""
        target = self._overlay_named(request.overlay)
        source = self.records.name
        if target == source:
            return Rebound(**vars(self._status()), copied=0, changed=False)
        addrs = [m.addr for m in self.membership.alive()]
        answers = await self.transport.call_many(addrs, "overlay.freeze", {"overlay": target}, OP_TIMEOUT)
        unfrozen = [a for a, v in answers.items() if v is not True]
        failures: tuple[type[Exception], ...] = (RequestError, RpcError, trio.TooSlowError, *self.errors)
        try:
            if unfrozen:
                raise RequestError(f"could not freeze {len(unfrozen)} of {len(addrs)} members "
                                   f"({', '.join(unfrozen[:3])}): nothing changed")
            keys = {r.key for r in await self.scan(source, "")} | {
                r.key for r in await self.scan(target, "") if not r.deleted}
            with trio.fail_after(OP_TIMEOUT * 4):
                copied = await copy_records(self.overlays[source], self.overlays[target], sorted(keys))
        except failures as err:
            await self.transport.call_many(addrs, "overlay.thaw", {}, CALL_TIMEOUT)
            raise RequestError(f"re-binding to {target} failed, still on {source}: {err}") from None
        epoch = self.epoch + 1
        answers = await self.transport.call_many(addrs, "overlay.switch", {"overlay": target, "epoch": epoch},
                                                       CALL_TIMEOUT)
        missed = sorted(a for a, v in answers.items() if v is not True)
        return Rebound(**vars(self._status()), copied=copied, changed=True, members=len(addrs), missed=missed)

    # -- listing and direct access -----------------------------------------------------------------

    async def scan(self, overlay: str, prefix: str) -> list[Record]:
        """The newest copy of each record under `prefix` that live members hold of `overlay`, deletions included."""
        addrs = [m.addr for m in self.membership.alive()]
        answers = await self.transport.call_many(addrs, "overlay.scan", {"overlay": overlay, "prefix": prefix},
                                                       OP_TIMEOUT)
        newest: dict[str, Record] = {}
        for answer in answers.values():
            if isinstance(answer, list):
                for raw in answer:
                    record = record_from_wire(raw)
                    if record.newer_than(newest.get(record.key)):
                        newest[record.key] = record
        return sorted(newest.values(), key=lambda r: r.key)

    async def _on_scan(self, caller: Caller, request: OverlayScan) -> list[list[Any]]:
        name, prefix = self._overlay_named(request.overlay), request.prefix
        if name == CHORD:
            return [list(r.to_wire()) for k, r in self.chord.shard.records.items() if k.startswith(prefix)]
        kad = self.kad
        assert kad is not None  # _overlay_named checked it
        return [(await _guarded(kad.record_of(e), self.errors)).to_wire() for e in kad.local_envelopes(prefix)]

    async def _on_get(self, caller: Caller, request: KvGet) -> KvRead:
        """One read through a named overlay (default: the bound one), timed here: `discovery kv get`."""
        name = self._overlay_or_bound(request.overlay)
        key = _kv_key(request.key, request.owner or caller.cn)
        start = trio.current_time()
        try:
            record = await _guarded(self.overlays[name].get(key), self.errors)
        except RpcError as err:
            raise RequestError(str(err)) from None
        return KvRead(key, record is not None, record.value if record else None, record.version if record else None,
                      name, round((trio.current_time() - start) * 1000, 3))

    async def _on_put(self, caller: Caller, request: KvPut) -> KvWritten:
        name = self._overlay_or_bound(request.overlay)
        overlay: Overlay = self.overlays[name]
        key = _kv_key(request.key, caller.cn)
        start = trio.current_time()
        if overlay is self.records.overlay:
            overlay = self.records  # through the binding, so a re-bind in progress holds it
        try:
            record = await _guarded(overlay.put(key, request.value), self.errors)
        except RpcError as err:
            raise RequestError(str(err)) from None
        return KvWritten(key, record.version, name, round((trio.current_time() - start) * 1000, 3))

    def _overlay_or_bound(self, name: str | None) -> str:
        return self._overlay_named(name) if name is not None else self.records.name

    def _overlay_named(self, name: str) -> str:
        """`name`, if this agent runs that overlay (which depends on its config)."""
        if name not in self.overlays:
            raise RequestError(f"overlay must be one of {', '.join(sorted(self.overlays))}, got {name!r}")
        return name


KV_PREFIX = "kv/"


def _kv_key(key: str, owner: str) -> str:
    """User keys live under kv/, so `discovery kv` can never overwrite the VE directory, and each under
    its writer's certificate name (kv/OWNER/KEY): a key is owned by whoever wrote it, and nobody else can
    overwrite it. Reads name another writer's key with `owner`."""
    return f"{KV_PREFIX}{owner}/{key}"
