"""The VMs of this node: capacity reservations, domain lifecycle, and their persistence.

The embedded `test:///` driver forgets every domain when its connection closes, so the agent keeps
each domain's XML and desired state in SQLite and re-creates them after a restart. Every operation
is idempotent, so a requester may retry after a timeout without fear.

Snapshots live here too: the test driver keeps libvirt snapshots in memory only, so `host.snapshot`
stores the domain's XML and a state (running, paused or shutoff) per (domain, tag) in SQLite, and
`host.restore` re-creates the domain from them, `host.snapshot_delete` forgets one; undefining a VM
drops its snapshots from this node. Real guests (`agents.hypervisor.guests.QemuGuests`) get a qcow2 overlay, and a
snapshot is also an internal qcow2 snapshot, reverted by `host.restore`, deleted by `host.snapshot_delete`.

`HostService` is assembled from one class per concern, each extending `agents.host.base.HostBase` (the state
they share): this module's core (recovery, reservations, snapshots), the lifecycle of one VM (`host.vm.*`,
`agents.host.lifecycle`), moving VMs between hosts (`agents.host.moves`), standby copies
(`agents.host.standby`) and the mirrors of disks to them (`agents.host.mirrors`), restarting crashed guests
(`agents.host.crashes`) and images of VMs' disks for shipped snapshots (`agents.host.snapshot_images`); the
rules of their requests' values are in `agents.host.args` (the request types of `agents.messages` apply them),
the SQLite store in `agents.host.store`. Only agents (role node) and operators may call `host.*`
(`agents.messages`, with the types of their requests and answers): users act on their VMs through `ve.*`,
which checks who owns the VE.

Concurrency (`agents.host.locks`): each request runs in its own task, holding the lock of the VM it
names for its whole length, so one VM's operations never interleave (a confirm cannot race an undefine
of it) while a 30 s graceful stop or a live migration of one VM delays no other VM and no call that
names none (`host.info`, reservations, listings). The ledger changes only in synchronous sections; the
store runs its statements one at a time off the event loop.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from agents.host.args import RESERVATION_TTL, nics_arg, snapshots_arg, xml_name
from agents.host.base import CRASHED
from agents.host.capacity import Insufficient, Ledger, Resources, UnknownReservation
from agents.host.crashes import Crashes
from agents.host.freezing import Freezing
from agents.host.lifecycle import Lifecycle
from agents.host.locks import one_vm
from agents.host.moves import Moves
from agents.host.networking import Networking
from agents.host.snapshot_images import SnapshotImages
from agents.host.standby import Standbys
from agents.host.store import Store
from agents.hypervisor.actor import SETTLED, DomainInfo, Hypervisor, HypervisorError
from agents.hypervisor.guests import Domains
from agents.hypervisor.qemu_xml import image_of
from agents.messages import (
    HOST_CONFIRM,
    HOST_INFO,
    HOST_PREFETCH,
    HOST_RELEASE,
    HOST_RESERVE,
    HOST_RESTORE,
    HOST_SNAPSHOT,
    HOST_SNAPSHOT_DELETE,
    Confirm,
    HostInfo,
    Prefetch,
    Release,
    Reservation,
    Reserve,
    Ship,
    Snapshot,
    SnapshotDeleted,
    SnapshotTag,
    SnapshotTaken,
)
from agents.network.interfaces import Interface, with_nics
from overlay.messages import NoArgs
from overlay.wire.rpc import Caller, Conflict, Endpoint, NotFound, RequestError, RpcError

log = logging.getLogger(__name__)
HOLD_LIMIT = 30.0
"""Seconds a VM recovered off at start waits for the directory's word (`release`) before it starts anyway."""
LISTING_PATIENCE = 0.5
"""Seconds `host.info` waits for libvirt's list of domains before it answers the last complete one instead
(the first listing is always waited for): libvirtd can hold a listing for seconds while live migrations run,
and the room that callers weigh (the ledger's) never needs libvirt. One listing at a time: a call arriving
while one is under way answers the last one at once."""


@dataclass(frozen=True)
class _Annotation:
    """`HostService.set_metadata`'s request: served as a `host.*` request is (gate, the VM's lock), from this node."""

    name: str
    uri: str
    key: str
    xml: str | None


class HostService(Lifecycle, Moves, Standbys, Crashes, SnapshotImages, Freezing, Networking):
    """Serves `host.*` RPCs for the VMs placed on this node (one VM's lifecycle in `Lifecycle`, moves in
    `Moves`, standby copies in `Standbys`, the state they share in `agents.host.base.HostBase`), and restarts
    its crashed guests in place (`Crashes`, driven by `agents.host.restarts`).

    Each request runs in the task that received it, inside the `gate` and, for a request about one VM,
    holding that VM's lock (`one_vm`). The actor's own task recovers the node's VMs at start (`start`,
    the gate closed meanwhile) and runs `tick`. A handler that fails unexpectedly (a bug, not a
    `RequestError`) fails its request and crashes the service: the supervisor restarts it, and `start`
    rebuilds the ledger and the domains from SQLite once the operations in flight have finished.
    """

    name = "host"
    tick_interval = 1.0

    def __init__(self, transport: Endpoint, hypervisor: Hypervisor, total: Resources, db_path: Path,
                 domains: Domains | None = None, migration_uri: str | None = None) -> None:
        super().__init__(transport, hypervisor, total, db_path, domains, migration_uri)
        self._listed: list[DomainInfo] = []
        self._listed_at: float | None = None
        self._listing = False
        transport.route(HOST_RESERVE, self._served(self._on_reserve))
        transport.route(HOST_PREFETCH, self._served(self._on_prefetch))
        transport.route(HOST_CONFIRM, self._served(self._on_confirm))
        transport.route(HOST_RELEASE, self._served(self._on_release))
        transport.route(HOST_INFO, self._served(self._on_info))
        transport.route(HOST_SNAPSHOT, self._served(self._on_snapshot))
        transport.route(HOST_RESTORE, self._served(self._on_restore))
        transport.route(HOST_SNAPSHOT_DELETE, self._served(self._on_snapshot_delete))
        self._serve_lifecycle(transport)
        self._serve_moves(transport)
        self._serve_standbys(transport)
        self._serve_snapshot_images(transport)

    async def start(self) -> None:
        """Re-create persisted domains (the test driver forgot them). A real guest's daemon kept its
        domains: one it no longer has left while the agent was down (migrated away), and is forgotten here
        rather than brought back, which could make it run at two places.

        A VM that should run but is off (the test driver forgot it; a real host lost power) is defined
        and *held* off: while this node was down its VM may have failed over to a standby elsewhere, so
        it waits for the directory's word (`host.vm.release`, from the VE layer's fencing pass) and
        starts only if the directory still places it here. Without a word for HOLD_LIMIT seconds (no VE
        layer, or no directory reachable) it starts anyway. A VM that kept running is left alone.

        Runs with the gate closed, after the operations in flight (a restart after a crash) have ended;
        the gate opens when the node's state is whole again."""
        await self.gate.drain()
        if self.store is None:
            self.store = await Store.open(self.db_path)
        self.ledger = Ledger(self.total)
        self.held = {}
        self.crashed = set()
        await self._hold_standbys()
        rows = await self.db.rows("SELECT name, xml, vcpus, memory_mb, disk_gb, desired FROM domains")
        kept = []
        for name, xml, vcpus, memory_mb, disk_gb, desired in rows:
            if self.domains.kind != "test" and not await self.hypervisor.persistent(name):
                log.warning("host: %s is no longer defined in %s; forgetting it", name, self.hypervisor.uri)
                await self._forget(name)
                continue
            self.ledger.allocate(name, Resources(vcpus, memory_mb, disk_gb))
            await self.hypervisor.define(xml)
            kept.append((name, desired))
        await self.carry_segments()  # the bridges the VMs' taps join, before any VM starts
        for name, desired in kept:
            if desired == CRASHED:  # left down after crashes: it stays so, shown crashed, until a verb says
                self.crashed.add(name)
            desired = desired if desired in SETTLED else "shutoff"
            state = (await self.hypervisor.info(name)).state
            if desired != "shutoff" and (state == "shutoff" or state != desired and not self.may_run(name)):
                self.held[name] = desired  # off, or frozen by the HA layer before this restart
            else:
                await self.hypervisor.settle(name, desired)
        self._hold_until = trio.current_time() + HOLD_LIMIT
        log.info("host: %d VMs recovered, %d held until the directory places them", len(self.ledger.allocated),
                 len(self.held))
        self.gate.open()

    async def tick(self) -> None:
        for lapsed in self.ledger.expire(trio.current_time()):
            log.info("reservation %s expired unconfirmed", lapsed.token)
        if self.held and trio.current_time() >= self._hold_until:
            for name in list(self.held):
                async with self.vm_locks.hold(name):
                    if name not in self.held or not self.may_run(name):  # released or undefined meanwhile,
                        continue  # or the HA lease keeps it off (frozen, fenced, not covered yet): no word to wait
                    log.warning("host: no word on %s within %gs of start; starting it", name, HOLD_LIMIT)
                    try:
                        await self._release(name)
                    except (HypervisorError, RequestError) as err:
                        log.warning("host: cannot start held %s: %s", name, err)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
        if self.dataplane is not None:
            self.dataplane.close()

    # -- handlers ----------------------------------------------------------------------------------

    async def _on_reserve(self, caller: Caller, request: Reserve) -> Reservation:
        try:
            reservation = self.ledger.reserve(request.name, request.need(), trio.current_time(), RESERVATION_TTL)
        except Insufficient as err:
            raise Conflict(str(err)) from None
        return Reservation(reservation.token, RESERVATION_TTL, self.domains.kind, self.migration_uri)

    async def _on_confirm(self, caller: Caller, request: Confirm) -> DomainInfo:
        """Turn a reservation into a VM: a new domain started, or (relocation) the domain carried in `xml`,
        brought to `state` with its `snapshots`. Everything is persisted before the domain starts."""
        token, carried, snapshots = request.token, request.xml, snapshots_arg(request.snapshots)
        held = self.ledger.reserved.get(token)
        if held is None:
            raise Conflict(f"reservation {token} is unknown or expired")
        if carried is not None and xml_name(carried) != held.key:
            raise RequestError(f"the carried domain is not {held.key}")
        async with self.vm_locks.hold(held.key):
            return await self._confirm(token, carried, request.state, snapshots, request.ship, request.image,
                                       nics_arg(request.nics))

    async def _confirm(self, token: str, carried: str | None, state: str,
                       snapshots: list[tuple[str, str, str, float, str]], ship: Ship | None,
                       image: str | None, nics: list[Interface]) -> DomainInfo:
        try:
            reservation = self.ledger.confirm(token, trio.current_time())
        except UnknownReservation as err:  # it lapsed while the VM's lock was busy
            raise Conflict(str(err)) from None
        need, name = reservation.need, reservation.key
        try:
            if carried:
                await self._booted(carried=carried)
                xml = self.domains.adapt(carried)
            else:
                await self.check_ports(name, nics)
                xml = with_nics(self.domains.new_xml(name, need.vcpus, need.memory_mb, need.disk_gb,
                                                     await self._booted(image)), self._made(name, nics),
                                await self.nic_mtu())
            memory = await self._pull(name, ship) if ship is not None else None
            await self.hypervisor.define(xml)
            await self.db.transaction(
                ("INSERT OR REPLACE INTO domains VALUES (?, ?, ?, ?, ?, ?)",
                 (name, xml, need.vcpus, need.memory_mb, need.disk_gb, state)),
                ("INSERT OR REPLACE INTO snapshots VALUES (?, ?, ?, ?, ?, ?)",
                 [(name, *snapshot) for snapshot in snapshots]))
            for *_, snapshot_xml in snapshots:
                if snapshot_xml:
                    await self.hypervisor.snapshot_redefine(name, self.domains.adapt(snapshot_xml))
            await self.carry_segments()  # its networks' bridges, before its taps join them
            if memory is not None and state != "shutoff":
                info = await self.hypervisor.restore_file(str(memory), xml, state)
            else:
                info = await self.hypervisor.settle(name, state)
        except (HypervisorError, OSError, RpcError, RequestError, ValueError) as err:
            await self._forget(name)
            raise RequestError(f"cannot start {name}: {err}") from None
        finally:
            with contextlib.suppress(NotImplementedError):
                self.domains.incoming_image(name)[0].unlink(missing_ok=True)
        return info

    async def _on_prefetch(self, caller: Caller, request: Prefetch) -> bool:
        """Bring an image into this node's store (`images`, wired by the composition place) while keeping
        the VM's reservation alive, renewed every third of its TTL: the VM's start then never waits for
        bytes, and its room does not lapse during a long pull."""
        if self.images is None:
            raise RequestError("this agent has no image store")
        try:
            self.ledger.renew(request.token, trio.current_time(), RESERVATION_TTL)
        except UnknownReservation as err:
            raise Conflict(str(err)) from None
        failure: RequestError | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._renew, request.token)
            try:
                await self._booted(digest=await self.images.bring(request.image))  # a base made now, not at start
            except RequestError as err:
                failure = err
            except RpcError as err:
                failure = RequestError(f"prefetch of image {request.image!r}: {err}")
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        return True

    async def _renew(self, token: str) -> None:
        """Renew until cancelled, or until the reservation is gone (released by its requester)."""
        with contextlib.suppress(UnknownReservation):
            while True:
                await trio.sleep(RESERVATION_TTL / 3)
                self.ledger.renew(token, trio.current_time(), RESERVATION_TTL)

    async def _on_release(self, caller: Caller, request: Release) -> bool:
        if request.token is not None:
            self.ledger.release(request.token)
        return True

    async def set_metadata(self, name: str, uri: str, key: str, xml: str | None) -> None:
        """Set (None: remove) a metadata element of VM `name`, for the layers above to annotate a VM: it is
        part of the domain's definition, so it moves with the VM by every method and leaves with it. The
        stored definition follows, so a restart keeps it. Holding the VM's lock, never beside a move of it.
        NotFound if the VM is not here."""
        await self._served(self._set_metadata)(Caller("host", "node", "", ""), _Annotation(name, uri, key, xml))

    @one_vm
    async def _set_metadata(self, caller: Caller, request: _Annotation) -> None:
        name = request.name
        await self._reconcile(name)
        if name not in self.ledger.allocated:
            raise NotFound(f"no VM {name} on this node")
        try:
            definition = await self.hypervisor.set_metadata(name, request.uri, request.key, request.xml)
        except HypervisorError as err:
            raise RequestError(f"annotate {name}: {err}") from None
        await self.db.write("UPDATE domains SET xml = ? WHERE name = ?", (definition, name))

    async def images_in_use(self) -> set[str]:
        """The digests of the images this node's VMs and standby copies boot (their bases must stay)."""
        rows = await self.db.rows("SELECT xml FROM domains UNION ALL SELECT xml FROM standbys")
        return {digest for (xml,) in rows if (digest := image_of(xml)) is not None}

    async def listing(self) -> list[DomainInfo]:
        """libvirt's domains on this node: a fresh listing, or the last complete one when it takes longer than
        LISTING_PATIENCE or one is under way already (see there). `host.info` and the metrics read it."""
        if not self._listing or self._listed_at is None:
            self._listing = True
            try:
                with trio.move_on_after(math.inf if self._listed_at is None else LISTING_PATIENCE):
                    self._listed, self._listed_at = await self.hypervisor.list(), trio.current_time()
            finally:
                self._listing = False
        return [self.shown(info) for info in self._listed]

    async def _on_info(self, caller: Caller, request: NoArgs) -> HostInfo:
        listed = await self.listing()
        now = trio.current_time()
        return HostInfo(self.ledger.total, self.ledger.free(now), listed, self.domains.kind, self.migration_uri,
                        self.vm_locks.in_use(), None if self._listed_at is None else round(now - self._listed_at, 3))

    @one_vm
    async def _on_snapshot(self, caller: Caller, request: Snapshot) -> SnapshotTaken:
        """Store the domain's XML and a state under `tag` (`state`: the one to restore, default the current
        one; the VE service passes the state a VM had before it paused it for a consistent snapshot)."""
        name, tag, state = request.name, request.tag, request.state
        if name not in self.ledger.allocated:
            raise NotFound(f"no VM {name} on this node")
        try:
            xml = await self.hypervisor.xml(name)
            state = state or (await self.hypervisor.info(name)).state
            if state not in SETTLED:
                raise RequestError(f"cannot snapshot {name}: it is {state}")
            internal = await self.hypervisor.snapshot(name, tag) if self.domains.kind != "test" else ""
        except HypervisorError as err:
            raise RequestError(f"snapshot {name}: {err}") from None
        taken = time.time()
        await self.db.write("INSERT OR REPLACE INTO snapshots VALUES (?, ?, ?, ?, ?, ?)",
                            (name, tag, xml, state, taken, internal))
        return SnapshotTaken(tag, state, taken)

    @one_vm
    async def _on_restore(self, caller: Caller, request: SnapshotTag) -> DomainInfo:
        """Re-create the domain from snapshot `tag`: forced off, redefined from the stored XML, brought to
        the stored state. Idempotent."""
        name, tag = request.name, request.tag
        if name not in self.ledger.allocated:
            raise NotFound(f"no VM {name} on this node")
        row = await self.db.one("SELECT xml, state, libvirt FROM snapshots WHERE name = ? AND tag = ?", (name, tag))
        if row is None:
            raise NotFound(f"no snapshot {tag!r} of {name} on this node")
        xml, state, internal = row
        try:
            if internal:  # the disk (and memory) come back from the qcow2 file
                info = await self.hypervisor.snapshot_revert(name, tag, state)
                await self._set_desired(name, info.state)
                return info
            await self.hypervisor.destroy(name)
            await self.hypervisor.define(xml)
            await self.db.write("UPDATE domains SET xml = ?, desired = ? WHERE name = ?", (xml, state, name))
            self.crashed.discard(name)
            info = await self.hypervisor.settle(name, state)
        except HypervisorError as err:
            raise RequestError(f"restore {name} to {tag}: {err}") from None
        return info

    @one_vm
    async def _on_snapshot_delete(self, caller: Caller, request: SnapshotTag) -> SnapshotDeleted:
        """Forget snapshot `tag` of the domain: its stored XML and state and, for a real guest, its internal
        qcow2 snapshot (first, so that a failure leaves the row for a retry; one the row does not mention,
        left by a snapshot interrupted before its row was written, goes too). Idempotent: `deleted` says
        whether there was anything to delete."""
        name, tag = request.name, request.tag
        if name not in self.ledger.allocated:
            raise NotFound(f"no VM {name} on this node")
        internal = False
        if self.domains.kind != "test":
            try:
                internal = await self.hypervisor.snapshot_delete(name, tag)
            except HypervisorError as err:
                raise RequestError(f"delete snapshot {tag} of {name}: {err}") from None
        rows = await self.db.write("DELETE FROM snapshots WHERE name = ? AND tag = ?", (name, tag))
        return SnapshotDeleted(name, tag, internal or rows > 0)
