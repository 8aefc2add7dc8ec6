"""Moving VMs between hosts: the source's and the target's side of a relocation (`discovery.ve.relocation`).

A VM moves with its snapshots: `host.export` at the source gives its XML, state and snapshots (the source
frozen, so the VM never runs at two places), `host.confirm` at the target defines it from them. Real
guests (`agents.hypervisor.guests.QemuGuests`) move by live migration where they can (`host.incoming` at the
target, `host.migrate` at the source, then the target adopts the arrival), otherwise by save → ship →
restore (`host.export` with `ship` stops the VM into a managed save image, the target pulls the image and
the disk with `host.fetch`). For them libvirt, not SQLite, is the truth about which domains exist: the
daemon keeps them across agent restarts, and a migration moves them behind the agent's back.
"""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import urlsplit

import libvirt
import trio

from agents.host.args import nics_arg
from agents.host.locks import one_vm
from agents.host.networking import Networking
from agents.host.shipping import CHUNK, read_chunk
from agents.hypervisor.actor import HypervisorError
from agents.messages import (
    HOST_EXPORT,
    HOST_FETCH,
    HOST_INCOMING,
    HOST_MIGRATE,
    Export,
    Exported,
    Fetch,
    Incoming,
    IncomingVm,
    Migrate,
    Migrated,
    Ship,
    Shipped,
)
from overlay.wire.rpc import Caller, Conflict, Endpoint, NotFound, RequestError

MIGRATE_FLAGS = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_NON_SHARED_INC
                 | libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)
"""Live, driven by the source daemon, copying the disk's own layer (the base image is on every node)."""


def migrate_params(uri: str) -> dict[str, str]:
    """Memory and disk travel to the host of the target daemon's `uri` (its node's address): without a URI
    parameter, libvirt would send them to whatever the target's host name resolves to."""
    host = urlsplit(uri).hostname
    if not host:
        raise RequestError(f"migration URI {uri!r} names no host")
    return {libvirt.VIR_MIGRATE_PARAM_URI: f"tcp://[{host}]" if ":" in host else f"tcp://{host}"}


class Moves(Networking):
    """`host.export`, `host.fetch`, `host.incoming` and `host.migrate`, and what `host.confirm` needs of a
    move (`_pull`); a VM that arrived by live migration is adopted by `HostBase._reconcile`.

    Each request about a VM holds that VM's lock, but `host.fetch`: it only reads files another request of
    the move made, and a target fetching them holds the VM's lock there.
    """

    def _serve_moves(self, transport: Endpoint) -> None:
        transport.route(HOST_EXPORT, self._served(self._on_export))
        transport.route(HOST_FETCH, self._served(self._on_fetch))
        transport.route(HOST_INCOMING, self._served(self._on_incoming))
        transport.route(HOST_MIGRATE, self._served(self._on_migrate))

    @one_vm
    async def _on_export(self, caller: Caller, request: Export) -> Exported:
        """What relocation carries to the target: the domain's XML, its state, and its snapshots. With
        `freeze`, a running VM is paused first (and persisted paused), so that it never runs at two
        places: the target starts its copy while this one is frozen, and only then is this one removed.
        With `ship` (real guests), an active VM is instead stopped into a managed save image, persisted
        off; the target fetches the image and the disk (`host.fetch`), and an undone move resumes the VM
        here from the image. `ship` in the answer says whether there is an image to fetch. With `copy`
        (a standby copy, `agents.host.standby`), a real guest's disk is copied aside, consistent (the VM
        paused meanwhile: QEMU flushes its disks when it stops), for the standby's node to fetch;
        `copy` in the answer says whether there is one."""
        name = request.name
        if name not in self.ledger.allocated:
            raise NotFound(f"no VM {name} on this node")
        ship, disk = request.ship, self.domains.disk(name)
        copy = disk if request.copy else None  # the disk to copy aside, if asked and there is one
        if ship and disk is None:
            raise RequestError(f"export {name}: this node's backend ({self.domains.kind}) has no disks to ship")
        try:
            state = (await self.hypervisor.info(name)).state
            xml = await self.hypervisor.xml(name)
            if ship and state != "shutoff":
                await self.hypervisor.managed_save(name)
                await self._set_desired(name, "shutoff")
            elif request.freeze and state == "running":
                await self.hypervisor.suspend(name)
                await self._set_desired(name, "paused")
            elif copy is not None:
                await self._copy_disk(name, copy, state, self.domains.copy(name))
        except (HypervisorError, OSError) as err:
            raise RequestError(f"export {name}: {err}") from None
        rows = await self.db.rows("SELECT tag, xml, state, taken, libvirt FROM snapshots WHERE name = ? "
                                  "ORDER BY taken", (name,))
        return Exported(xml, state, [list(row) for row in rows], Shipped(state != "shutoff") if ship else None,
                        copy is not None)

    async def _on_fetch(self, caller: Caller, request: Fetch) -> bytes:
        """A chunk of an exported VM's files, from `offset`: `part` "disk", "image" (its memory, saved) or
        "copy" (the copy of its disk made for a standby)."""
        name, part, offset = request.name, request.part, request.offset
        disk = self.domains.disk(name)
        if name not in self.ledger.allocated or disk is None:
            raise NotFound(f"no VM {name} with files on this node")
        paths = {"disk": disk, "image": self.domains.saved(name), "copy": self.domains.copy(name)}
        if part not in paths:
            raise RequestError(f"part must be one of {', '.join(paths)}")
        path = paths[part]
        try:
            chunk = await trio.to_thread.run_sync(read_chunk, path, offset, CHUNK)
        except FileNotFoundError:
            raise NotFound(f"{name} has no {part} to fetch here") from None
        self.shipped["sent"] += len(chunk)
        return chunk

    async def _pull(self, name: str, ship: Ship) -> Path | None:
        """Fetch a shipped VM's disk and memory image from the host that exported it (`host.fetch`);
        returns where libvirt sees the image, or None when only a disk came (the VM was off)."""
        source, disk = ship.source, self.domains.disk(name)
        if disk is None:
            raise RequestError("ship needs a backend with disks")
        await self._fetch(source, name, "disk", disk)
        if not ship.image:
            return None
        local, seen = self.domains.incoming_image(name)
        await self._fetch(source, name, "image", local)
        return seen

    @one_vm
    async def _on_incoming(self, caller: Caller, request: IncomingVm) -> Incoming:
        """Get ready to receive reserved VM `name` by live migration: an empty overlay of the base of the
        image it boots (`image`, a digest: brought here before the move), for the disk copy."""
        name = request.name
        held = next((r for r in self.ledger.reserved.values() if r.key == name), None)
        if held is None:
            raise Conflict(f"no reservation for {name} on this node")
        if self.migration_uri is None:
            raise RequestError(f"this node ({self.domains.kind}) cannot receive a live migration")
        if not await self.hypervisor.persistent(name):
            boot = await self._booted(digest=request.image) if request.image else None
            try:
                await trio.to_thread.run_sync(self.domains.prepare, name, held.need.disk_gb, boot)
            except ValueError as err:
                raise RequestError(str(err)) from None
        await self.expect_segments(name, {nic.vni for nic in nics_arg(request.nics)})
        return Incoming(self.migration_uri)

    @one_vm
    async def _on_migrate(self, caller: Caller, request: Migrate) -> Migrated:
        """Live-migrate VM `name` to the daemon at `uri` (peer to peer, incremental disk copy); once it
        answers, the target's libvirt holds the VM and this one no longer does. The target adopts it at
        its next `host.vm.*`; the coordinator then forgets it here (`host.vm.undefine`)."""
        name, uri = request.name, request.uri
        if name not in self.ledger.allocated:
            raise NotFound(f"no VM {name} on this node")
        started = time.monotonic()
        try:
            await self.hypervisor.migrate(name, uri, MIGRATE_FLAGS, migrate_params(uri))
        except HypervisorError as err:
            raise RequestError(f"live migration of {name} failed: {err}") from None
        return Migrated(time.monotonic() - started)
