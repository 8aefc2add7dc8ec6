"""Standby copies kept by this node for VMs that run on others (`ve replicate`, `ve failover`: discovery.ve.replicas).

A standby is not a domain: it is what `host.export` gave for a VM that runs on another node (its XML and
snapshots; for a real guest also a consistent copy of its disk, fetched from the VM's host, internal
snapshots inside), kept in its own table, with the VM's room held in the ledger under `standby_key`, a
key no domain can have ('/' is refused in names). So `host.vm.*`, `host.reserve` and the VE service's
checks of where a VM is defined never see it, and a failover onto it never lacks room.
"""

from __future__ import annotations

import json

import trio

from agents.host.args import RESERVATION_TTL, snapshots_arg
from agents.host.capacity import Insufficient, Resources, UnknownReservation
from agents.host.locks import one_vm
from agents.host.mirrors import Mirrors
from agents.host.store import Params
from agents.hypervisor.actor import DomainInfo, HypervisorError
from agents.messages import (
    HOST_PROMOTE,
    HOST_RESERVE_STANDBY,
    HOST_STANDBY,
    HOST_STANDBYS,
    HOST_UNSTANDBY,
    Held,
    Promote,
    Reserve,
    Standby,
    StandbyEntry,
    StandbyKept,
    VmName,
)
from overlay.messages import NoArgs
from overlay.wire.rpc import Caller, Conflict, Endpoint, NotFound, RequestError, RpcError


class Standbys(Mirrors):
    """`host.reserve_standby`, `host.standby`, `host.unstandby`, `host.standbys` and `host.promote`.

    Standbys live in the store's `standbys` table. Requests about a VM's standby hold that VM's lock (one
    name, one lock, whether the VM or its copy is here); reserving room and listing take none.
    """

    def _serve_standbys(self, transport: Endpoint) -> None:
        self._serve_mirrors(transport)
        transport.route(HOST_RESERVE_STANDBY, self._served(self._on_reserve_standby))
        transport.route(HOST_STANDBY, self._served(self._on_standby))
        transport.route(HOST_UNSTANDBY, self._served(self._on_unstandby))
        transport.route(HOST_STANDBYS, self._served(self._on_standbys))
        transport.route(HOST_PROMOTE, self._served(self._on_promote))

    async def _hold_standbys(self) -> None:
        """At start: hold the room of every persisted standby again, and end the mirrors' exports an earlier run
        left (their hosts open them again: `agents.host.mirrors`), each kept as its copy if it was ready and its
        qemu-nbd flushed it on the way out."""
        rows = await self.db.rows("SELECT name, vcpus, memory_mb, disk_gb FROM standbys")
        if self.domains.kind != "test":
            names = [name for name, *_ in rows]
            flushed = await trio.to_thread.run_sync(self.exports.end_leftovers, names)
            for name in names:  # a ready mirror flushed as its export ended is the copy now; a torn one is dropped
                await self._keep_mirror(name, name in flushed)
        for name, vcpus, memory_mb, disk_gb in rows:
            self.ledger.allocate(standby_key(name), Resources(vcpus, memory_mb, disk_gb))

    async def _on_reserve_standby(self, caller: Caller, request: Reserve) -> Held:
        """Hold room for a standby of VM `name` for RESERVATION_TTL seconds; `host.standby` confirms it."""
        name = request.name
        if name in self.ledger.allocated:
            raise Conflict(f"{name} itself is on this node; its standby must be on another")
        try:
            token = self.ledger.reserve(standby_key(name), request.need(), trio.current_time(), RESERVATION_TTL).token
        except Insufficient as err:
            raise Conflict(f"no room for a standby of {name}: {err}") from None
        return Held(token, RESERVATION_TTL)

    @one_vm
    async def _on_standby(self, caller: Caller, request: Standby) -> StandbyKept:
        """Keep, or refresh, the standby of VM `name`: its `xml` and `snapshots` as `host.export` gave them
        at time `taken`, and for a real guest the copy of its disk, fetched from `ship["from"]` (the VM's
        host). A new standby confirms reservation `token`; one held already is updated in place (a retried
        confirm too), so this is idempotent. The disk is fetched before anything is recorded."""
        name, token, taken, ship = request.name, request.token, request.taken, request.ship
        snapshots = snapshots_arg(request.snapshots)
        if name in self.ledger.allocated:
            raise Conflict(f"{name} itself is on this node; its standby must be on another")
        if self.domains.disk(name) is not None:
            if ship is None:
                raise RequestError(f"a standby of real guest {name} needs its disk: ship from its host")
            try:
                await self._fetch(ship.source, name, "copy", self.domains.standby(name))
            except (OSError, RpcError) as err:
                raise RequestError(f"cannot fetch the disk of {name}: {err}") from None
            await self._booted(carried=request.xml)  # the copy's base is ready before its host may die
        key = standby_key(name)
        if key in self.ledger.allocated:
            if token is not None:
                self.ledger.release(token)  # a retried confirm: the standby is held already
        elif token is None:
            raise NotFound(f"no standby of {name} on this node")
        else:
            held = self.ledger.reserved.get(token)
            if held is not None and held.key != key:
                raise RequestError(f"reservation {token} is not for a standby of {name}")
            try:
                self.ledger.confirm(token, trio.current_time())
            except UnknownReservation as err:
                raise Conflict(str(err)) from None
        need = self.ledger.allocated[key]
        await self.db.write("INSERT OR REPLACE INTO standbys VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (name, request.xml, need.vcpus, need.memory_mb, need.disk_gb, json.dumps(snapshots), taken))
        return StandbyKept(name, taken, len(snapshots))

    @one_vm
    async def _on_unstandby(self, caller: Caller, request: VmName) -> bool:
        """Drop the standby of VM `name` and free its room; True if there was one (none is fine)."""
        name = request.name
        await self._settle_mirror(name, keep=False)
        dropped = await self.db.write("DELETE FROM standbys WHERE name = ?", (name,)) > 0
        self.ledger.deallocate(standby_key(name))
        if self.domains.disk(name) is not None:
            self.domains.standby(name).unlink(missing_ok=True)
        return dropped

    async def _on_standbys(self, caller: Caller, request: NoArgs) -> list[StandbyEntry]:
        """The standbys this node keeps: VM name, room held, how many snapshots, when exported, its mirror's state."""
        rows = await self.db.rows("SELECT name, vcpus, memory_mb, disk_gb, snapshots, taken FROM standbys "
                                  "ORDER BY name")
        return [StandbyEntry(name, Resources(vcpus, memory_mb, disk_gb), len(json.loads(snapshots)), taken,
                             self.mirror_state(name))
                for name, vcpus, memory_mb, disk_gb, snapshots, taken in rows]

    @one_vm
    async def _on_promote(self, caller: Caller, request: Promote) -> DomainInfo:
        """Turn the standby of VM `name` into the VM: defined from the stored XML with its snapshots, its
        held room now the VM's (one transaction), then brought to `state`. If the VM is here already (a
        retried promote), it is only brought to `state`. A real guest's standby disk becomes its disk
        (and its internal snapshots are redefined); it then boots from that disk, as after a power cut."""
        name, state = request.name, request.state
        try:
            if name not in self.ledger.allocated:
                await self._settle_mirror(name)  # a ready mirror is the freshest disk
                row = await self.db.one("SELECT xml, vcpus, memory_mb, disk_gb, snapshots FROM standbys "
                                        "WHERE name = ?", (name,))
                if row is None:
                    raise NotFound(f"no standby of {name} on this node")
                xml, vcpus, memory_mb, disk_gb, snapshots = row
                xml, disk = self.domains.adapt(xml), self.domains.disk(name)
                if disk is not None:
                    self.domains.standby(name).replace(disk)
                await self.hypervisor.define(xml)
                rows = [(name, *snapshot) for snapshot in json.loads(snapshots)]
                for *_, internal in rows:
                    if internal:
                        await self.hypervisor.snapshot_redefine(name, self.domains.adapt(internal))
                statements: list[tuple[str, Params]] = [("INSERT OR REPLACE INTO domains VALUES (?, ?, ?, ?, ?, ?)",
                                                         (name, xml, vcpus, memory_mb, disk_gb, state))]
                if rows:
                    marks = ", ".join("?" * len(rows[0]))
                    statements.append((f"INSERT OR REPLACE INTO snapshots VALUES ({marks})", rows))
                statements.append(("DELETE FROM standbys WHERE name = ?", (name,)))
                await self.db.transaction(*statements)
                self.ledger.deallocate(standby_key(name))
                self.ledger.allocate(name, Resources(vcpus, memory_mb, disk_gb))
                await self.carry_segments()  # its networks' bridges, before its taps join them
            info = await self.hypervisor.settle(name, state)
        except (HypervisorError, OSError) as err:
            raise RequestError(f"promote {name}: {err}") from None
        await self._set_desired(name, info.state)
        return info


def standby_key(name: str) -> str:
    """The ledger key of the standby of VM `name`: never a domain's name (those cannot hold '/')."""
    return f"{name}/standby"
