"""The trio shell of the HA cores: one node's `LeaseKeeper` and its `HostWatch`es, over SWIM and the directory.

The same shell runs in every agent (`discovery.ha.service`) and in every node of the simulator
(`discovery.ha.sim`): what differs between them is only what a freeze, a thaw, a fence and a recovery do
to VMs, which the node hands in as `Hooks`. The shell performs the cores' actions and feeds back what
happened; it decides nothing.

The lease records live on a fixed replica set (`overlay.quorum`: counted over every member SWIM has not
seen leave), read and written by majority with a short per-replica timeout, so a read always meets the last
write and a replica that died unnoticed cannot hold a renewal past the term (`discovery.ha.lease`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

import trio

from discovery.ha.lease import LEASE_CALL_TIMEOUT, TERM, Fence, Freeze, Lease, LeaseKeeper, Read, Renew, Thaw, lease_key
from discovery.ha.watch import HostWatch, ReadLease, Recover, Revoke, State, watchers_of
from overlay.dht import DHT, Record, WriteConflict
from overlay.membership import ALIVE, DEAD, SUSPECT, Membership
from overlay.quorum import FixedSets
from overlay.wire.codec import decode, encode
from overlay.wire.rpc import RequestError, RpcError

log = logging.getLogger(__name__)
UNANSWERED = (RpcError, RequestError)
"""What a directory call may fail with (a lost conditional write is caught before)."""
REPLICAS = 3
IDLE_WAKE = 1.0
"""Seconds between two looks at the lease and the watches when neither core asked to be woken sooner."""


class Hooks(Protocol):
    """What a node does with its VMs when its cores say so."""

    def protected(self) -> frozenset[str]:
        """The protected VEs with a VM here: what the lease must list."""

    async def freeze(self) -> None:
        """The lease lapsed: pause every VM of a listed VE."""

    async def thaw(self) -> None:
        """The lease holds again: resume what `freeze` paused."""

    async def fence(self, ves: tuple[str, ...], epoch: int) -> None:
        """The lease was revoked: the VMs of `ves` must never run here again."""

    async def recover(self, host: str, ves: tuple[str, ...], epoch: int, by: str | None) -> bool:
        """Run the VMs of `ves` still placed on `host` elsewhere (its lease of `epoch` revoked by watcher `by`);
        whether all of them run (or needed nothing)."""

    def revoked(self, host: str, lease: Lease) -> None:
        """This node revoked `host`'s lease (for the record: logs, counters, the simulator's world)."""


class HaShell:
    """Node `name`'s lease and watches. `run` until cancelled; `kick` on every membership event."""

    def __init__(self, name: str, membership: Membership, dht: DHT, hooks: Hooks, term: float = TERM,
                 replicas: int = REPLICAS, ready: Callable[[], bool] = lambda: True) -> None:
        self.name, self.membership, self.dht, self.hooks = name, membership, dht, hooks
        self.fixed, self.ready = FixedSets(membership, replicas), ready
        self.keeper = LeaseKeeper(name, term)
        self.watches: dict[str, HostWatch] = {}
        self._lease_kick = trio.Event()
        self._watch_kick = trio.Event()

    def kick(self, *_: Any) -> None:
        """Look again now (a member's state changed, a VE came or went)."""
        self._lease_kick.set()
        self._watch_kick.set()

    def covered(self, ve: str) -> bool:
        return self.keeper.covered(ve, trio.current_time())

    async def run(self) -> None:
        """Once `ready` (the membership view merged from a seed: a lease's replicas are counted over it, and over
        this node alone they would be this node), keep the lease and the watches until cancelled."""
        self.keeper.abandon()  # a restart (the service crashed) cancelled whatever was in flight
        self.watches.clear()  # rebuilt from membership at once; a revocation written is read back as such
        while not self.ready():
            await trio.sleep(IDLE_WAKE / 4)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._lease)
            nursery.start_soon(self._watch)

    # -- the lease --------------------------------------------------------------------------------------------

    async def _lease(self) -> None:
        keeper = self.keeper
        while True:
            keeper.cover(self.hooks.protected())
            for action in keeper.poll(trio.current_time()):
                if isinstance(action, (Read, Renew)):  # a write may take seconds: the freeze must not wait for it
                    self._nursery.start_soon(self._lease_action, action)
                else:
                    await self._lease_action(action)
            wake = keeper.wake_at()
            with trio.move_on_at(wake if wake is not None else trio.current_time() + IDLE_WAKE):
                await self._lease_kick.wait()
            self._lease_kick = trio.Event()

    async def _lease_action(self, action: Any) -> None:
        keeper, now = self.keeper, trio.current_time
        match action:
            case Read():
                try:
                    record = await self.read(lease_key(self.name))
                except UNANSWERED:
                    keeper.failed(now())
                    return
                for then in keeper.read(lease_of(record), record, now()):
                    await self._lease_action(then)
                self._lease_kick.set()
            case Renew(lease=lease, expect=expect):
                sent = now()
                try:
                    record = await self.write(lease_key(self.name), encode(lease), expect)
                except WriteConflict:
                    keeper.conflicted(now())
                except UNANSWERED:
                    keeper.failed(now())
                else:
                    for then in keeper.renewed(lease, record, sent):
                        await self._lease_action(then)
                self._lease_kick.set()
            case Freeze():
                log.warning("ha: %s's lease ran out (held until %.3f): freezing its protected VMs",
                            self.name, keeper.held_until)
                await self.hooks.freeze()
            case Thaw():
                log.warning("ha: %s's lease renewed (held until %.3f): thawing", self.name, keeper.held_until)
                await self.hooks.thaw()
            case Fence(ves=ves, epoch=epoch):
                log.warning("ha: %s's lease (epoch %d) was revoked: %s never run here again", self.name, epoch,
                            ", ".join(ves) or "nothing")
                await self.hooks.fence(ves, epoch)

    # -- the watches ------------------------------------------------------------------------------------------

    async def _watch(self) -> None:
        while True:
            self._update_watches()
            for watch in list(self.watches.values()):
                for action in watch.poll(trio.current_time()):
                    self._nursery.start_soon(self._watch_action, watch, action)
            wakes = [w for w in (x.wake_at() for x in self.watches.values()) if w is not None]
            with trio.move_on_at(min(wakes, default=trio.current_time() + IDLE_WAKE / 2)):
                await self._watch_kick.wait()
            self._watch_kick = trio.Event()

    def _update_watches(self) -> None:
        """Watch the hosts this node is a watcher of in its own view; feed each watch SWIM's state."""
        now = trio.current_time()
        members = [(m.name, m.site) for m in self.membership.members.values() if m.status in (ALIVE, SUSPECT)]
        for name, member in self.membership.members.items():
            if name == self.name:
                continue
            chosen = watchers_of(name, member.site, members)
            if self.name not in chosen:
                if name in self.watches and self.watches[name].state in (State.IDLE, State.DONE):
                    del self.watches[name]
                continue
            watch = self.watches.setdefault(name, HostWatch(self.name, name, chosen.index(self.name)))
            if member.status == SUSPECT:
                watch.suspect(now)
            elif member.status == DEAD:  # one that left said so: it is not recovered
                watch.declared_dead(now)
            elif watch.dead or watch.state is not State.IDLE:
                watch.alive(now)

    async def _watch_action(self, watch: HostWatch, action: Any) -> None:
        now = trio.current_time
        match action:
            case ReadLease(host=host):
                try:
                    record = await self.read(lease_key(host))
                except UNANSWERED:
                    watch.failed(now())
                else:
                    version = (record.version, record.writer) if record is not None else None
                    for then in watch.read(lease_of(record), record, version, now()):
                        await self._watch_action(watch, then)
            case Revoke(lease=lease, expect=expect):
                try:
                    await self.write(lease_key(watch.host), encode(lease), expect)
                except WriteConflict:
                    watch.conflicted(now())
                except UNANSWERED:
                    watch.failed(now())
                else:
                    by = lease.revoked_by
                    what = "revoked" if by == self.name else f"confirmed {by}'s revocation of"
                    log.warning("ha: %s %s %s's lease (epoch %d): recovering %s", self.name, what, watch.host,
                                lease.epoch, ", ".join(lease.ves) or "nothing")
                    self.hooks.revoked(watch.host, lease)
                    for then in watch.revoke_won(lease, now()):
                        await self._watch_action(watch, then)
            case Recover(host=host, ves=ves, epoch=epoch, by=by):
                watch.recovered(await self.hooks.recover(host, ves, epoch, by), now())
        self._watch_kick.set()

    # -- the directory, on fixed replica sets -------------------------------------------------------------------

    async def read(self, key: str) -> Record | None:
        ask, quorum = self.fixed.of(key)
        return await self.dht.read_from(key, ask, quorum, LEASE_CALL_TIMEOUT)

    async def write(self, key: str, value: Any, expect: Record | None) -> Record:
        ask, quorum = self.fixed.of(key)
        return await self.dht.put_if(key, value, expect, ask, quorum, LEASE_CALL_TIMEOUT)


def lease_of(record: Record | None) -> Lease | None:
    return decode(Lease, record.value) if record is not None and record.value is not None else None
