"""The VMs of this node: capacity reservations, domain lifecycle, and their persistence.

The embedded `test:///` driver forgets every domain when its connection closes, so the agent keeps
each domain's XML and desired state in SQLite and re-creates them after a restart. Every operation
is idempotent, so a requester may retry after a timeout without fear.

Snapshots live here too: the test driver keeps libvirt snapshots in memory only, so `host.snapshot`
stores the domain's XML and a state (running, paused or shutoff) per (domain, tag) in SQLite, and
`host.restore` re-creates the domain from them. Relocation (`discovery.ve_service`) moves a VM with
`host.export` at the source (XML and snapshots, the source frozen) and `host.confirm` with that XML at
the target, so a VM's snapshots travel with it; undefining a VM drops its snapshots from this node.

Real guests (`agents.guests.QemuGuests`) differ in four places, all here: a new VM gets a qcow2
overlay; a snapshot is also an internal qcow2 snapshot (reverted by `host.restore`, redefined with
REDEFINE where the VM moves); a VM moves either by live migration (`host.incoming` at the target,
`host.migrate` at the source, then the target adopts the arrival) or, where that cannot work, by save →
ship → restore (`host.export` with `ship` stops it into a managed save image, the target pulls the
image and the disk with `host.fetch`); and libvirt, not SQLite, is the truth about which domains
exist (the daemon keeps them across agent restarts, and a migration moves them behind the agent's back).

Only agents (role node) and operators may call `host.*`: users act on their VMs through `ve.*`, which
checks who owns the VE.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict
from pathlib import Path
from typing import Any

import libvirt
import trio

from agents.capacity import Insufficient, Ledger, Resources, UnknownReservation
from agents.guests import Domains, TestDomains
from agents.hypervisor import SETTLED, DomainInfo, Hypervisor, HypervisorError
from agents.runtime import Actor
from agents.shipping import CHUNK, fetch_file, read_chunk
from overlay.rpc import Caller, Conflict, Endpoint, Forbidden, Handler, NotFound, RequestError, RpcError

log = logging.getLogger(__name__)
RESERVATION_TTL = 10.0
ACTIONS = ("start", "stop", "destroy", "suspend", "resume", "undefine", "info", "settle")
MAX_XML = 64 * 1024
MAX_SNAPSHOTS = 64  # carried in one relocation message
SHUTDOWN_TIMEOUT = 30.0
"""How long `host.vm stop` waits for a guest to power off before forcing it, unless told (`timeout`)."""
MAX_SHUTDOWN_TIMEOUT = 600.0
MIGRATE_FLAGS = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_NON_SHARED_INC
                 | libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)
"""Live, driven by the source daemon, copying the disk's own layer (the base image is on every node)."""
MIGRATE_PARAMS = {libvirt.VIR_MIGRATE_PARAM_URI: "tcp://127.0.0.1"}
"""Memory and disk travel over loopback: without a URI, libvirt would use the host name."""


class HostService(Actor):
    """Serves `host.*` RPCs for the VMs placed on this node.

    Requests go through the actor's mailbox, so operations on this node's VMs never interleave (a
    confirm cannot race an undefine of the same VM). A crash restarts the actor, and `start`
    rebuilds the ledger and the domains from SQLite.
    """

    name = "host"
    tick_interval = 1.0
    expected_errors = (RequestError,)

    def __init__(self, transport: Endpoint, hypervisor: Hypervisor, total: Resources, db_path: Path,
                 domains: Domains | None = None, migration_uri: str | None = None) -> None:
        super().__init__()
        self.transport = transport
        self.hypervisor = hypervisor
        self.total = total
        self.ledger = Ledger(total)
        self.domains = domains or TestDomains()
        self.migration_uri = migration_uri
        """Where peers migrate VMs to this node (its libvirtd); None where live migration cannot work."""
        self._db = sqlite3.connect(db_path)
        self._db.execute("CREATE TABLE IF NOT EXISTS domains (name TEXT PRIMARY KEY, xml TEXT, vcpus INTEGER, "
                         "memory_mb INTEGER, disk_gb INTEGER, desired TEXT)")
        self._db.execute("CREATE TABLE IF NOT EXISTS snapshots (name TEXT, tag TEXT, xml TEXT, state TEXT, "
                         "taken REAL, libvirt TEXT DEFAULT '', PRIMARY KEY (name, tag))")
        if "libvirt" not in {row[1] for row in self._db.execute("PRAGMA table_info(snapshots)")}:
            self._db.execute("ALTER TABLE snapshots ADD COLUMN libvirt TEXT DEFAULT ''")  # an older store
        for method, handler in (("host.reserve", self._on_reserve), ("host.confirm", self._on_confirm),
                                ("host.release", self._on_release), ("host.vm", self._on_vm),
                                ("host.info", self._on_info), ("host.export", self._on_export),
                                ("host.snapshot", self._on_snapshot), ("host.restore", self._on_restore),
                                ("host.incoming", self._on_incoming), ("host.migrate", self._on_migrate),
                                ("host.fetch", self._on_fetch)):
            transport.route(method, self._through_mailbox(handler))
        self._serve_standbys(transport)

    def _through_mailbox(self, handler: Handler) -> Handler:
        async def call(caller: Caller, args: dict[str, Any]) -> Any:
            if caller.role not in ("node", "operator"):
                raise Forbidden(f"{caller.cn!r} ({caller.role}) may not call host methods; use the ve commands")
            return await self.ask((handler, caller, args))
        return call

    async def handle(self, message: tuple[Handler, Caller, dict[str, Any]]) -> Any:
        handler, caller, args = message
        return await handler(caller, args)

    async def start(self) -> None:
        """Re-create persisted domains in their desired state (the test driver forgot them). A real guest's
        daemon kept its domains: one it no longer has left while the agent was down (migrated away), and is
        forgotten here rather than brought back, which could make it run at two places."""
        self.ledger = Ledger(self.total)
        self._hold_standbys()
        rows = list(self._db.execute("SELECT name, xml, vcpus, memory_mb, disk_gb, desired FROM domains"))
        for name, xml, vcpus, memory_mb, disk_gb, desired in rows:
            if self.domains.kind != "test" and not await self.hypervisor.persistent(name):
                log.warning("host: %s is no longer defined in %s; forgetting it", name, self.hypervisor.uri)
                await self._forget(name)
                continue
            self.ledger.allocate(name, Resources(vcpus, memory_mb, disk_gb))
            await self.hypervisor.define(xml)
            await self.hypervisor.settle(name, desired if desired in SETTLED else "shutoff")
        log.info("host: %d VMs recovered", len(self.ledger.allocated))

    async def tick(self) -> None:
        for lapsed in self.ledger.expire(trio.current_time()):
            log.info("reservation %s expired unconfirmed", lapsed.token)

    def close(self) -> None:
        self._db.close()

    # -- handlers ----------------------------------------------------------------------------------

    async def _on_reserve(self, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        name = _name(args)
        need = Resources(*(_count(args, f) for f in ("vcpus", "memory_mb", "disk_gb")))
        try:
            reservation = self.ledger.reserve(name, need, trio.current_time(), RESERVATION_TTL)
        except Insufficient as err:
            raise Conflict(str(err)) from None
        return {"token": reservation.token, "ttl": RESERVATION_TTL, "backend": self.domains.kind,
                "migration_uri": self.migration_uri}

    async def _on_confirm(self, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        """Turn a reservation into a VM: a new domain started, or (relocation) the domain carried in `xml`,
        brought to `state` with its `snapshots`. Everything is persisted before the domain starts."""
        token = args.get("token")
        if not isinstance(token, str):
            raise RequestError("host.confirm needs a token")
        carried, state, snapshots = args.get("xml"), args.get("state", "running"), _snapshots(args)
        if state not in SETTLED:
            raise RequestError(f"state must be one of {', '.join(SETTLED)}")
        if carried is not None and not (isinstance(carried, str) and len(carried) <= MAX_XML):
            raise RequestError(f"xml must be a domain definition of at most {MAX_XML} characters")
        held = self.ledger.reserved.get(token)
        if carried is not None and held is not None and _xml_name(carried) != held.key:
            raise RequestError(f"the carried domain is not {held.key}")
        try:
            reservation = self.ledger.confirm(token, trio.current_time())
        except UnknownReservation as err:
            raise Conflict(str(err)) from None
        need, name = reservation.need, reservation.key
        try:
            image = await self._pull(name, args["ship"]) if isinstance(args.get("ship"), dict) else None
            xml = self.domains.adapt(carried) if carried else self.domains.new_xml(name, need.vcpus, need.memory_mb)
            await self.hypervisor.define(xml)
            with self._db:
                self._db.execute("INSERT OR REPLACE INTO domains VALUES (?, ?, ?, ?, ?, ?)",
                                 (name, xml, need.vcpus, need.memory_mb, need.disk_gb, state))
                self._db.executemany("INSERT OR REPLACE INTO snapshots VALUES (?, ?, ?, ?, ?, ?)",
                                     [(name, *snapshot) for snapshot in snapshots])
            for *_, snapshot_xml in snapshots:
                if snapshot_xml:
                    await self.hypervisor.snapshot_redefine(name, self.domains.adapt(snapshot_xml))
            if image is not None and state != "shutoff":
                info = await self.hypervisor.restore_file(str(image), xml, state)
            else:
                info = await self.hypervisor.settle(name, state)
        except (HypervisorError, OSError, RpcError) as err:
            await self._forget(name)
            raise RequestError(f"cannot start {name}: {err}") from None
        finally:
            with contextlib.suppress(NotImplementedError):
                self.domains.incoming_image(name)[0].unlink(missing_ok=True)
        return asdict(info)

    async def _pull(self, name: str, ship: dict[str, Any]) -> Path | None:
        """Fetch a shipped VM's disk and memory image from the host that exported it (`host.fetch`);
        returns where libvirt sees the image, or None when only a disk came (the VM was off)."""
        source = ship.get("from")
        if not isinstance(source, str) or self.domains.disk(name) is None:
            raise RequestError("ship needs the exporting host's address, and a backend with disks")
        await fetch_file(self.transport, source, name, "disk", self.domains.disk(name))
        if not ship.get("image"):
            return None
        local, seen = self.domains.incoming_image(name)
        await fetch_file(self.transport, source, name, "image", local)
        return seen

    async def _on_release(self, caller: Caller, args: dict[str, Any]) -> bool:
        token = args.get("token")
        if isinstance(token, str):
            self.ledger.release(token)
        return True

    async def _on_vm(self, caller: Caller, args: dict[str, Any]) -> dict[str, Any] | None:
        """`action` on one VM; `settle` brings it to `state` (running, paused or shutoff) from any state."""
        name, action = _name(args), args.get("action")
        if action not in ACTIONS:
            raise RequestError(f"action must be one of {', '.join(ACTIONS)}")
        if action == "settle" and args.get("state") not in SETTLED:
            raise RequestError(f"settle needs a state, one of {', '.join(SETTLED)}")
        timeout = shutdown_timeout(args)
        await self._reconcile(name)
        if name not in self.ledger.allocated:
            if action in ("undefine", "destroy"):
                return None  # already gone: idempotent
            raise NotFound(f"no VM {name} on this node")
        try:
            if action == "undefine":
                await self._forget(name)
                return None
            if action == "info":
                return {**asdict(await self.hypervisor.info(name)), **await self._movability(name)}
            if action == "settle":
                info = await self.hypervisor.settle(name, args["state"])
            else:
                info = await self._act(name, action, timeout)
        except HypervisorError as err:
            raise RequestError(f"{action} {name}: {err}") from None
        with self._db:
            self._db.execute("UPDATE domains SET desired = ? WHERE name = ?", (info.state, name))
        return asdict(info)

    async def _act(self, name: str, action: str, timeout: float = SHUTDOWN_TIMEOUT) -> DomainInfo:
        if action == "start":
            info = await self.hypervisor.info(name)
            return await (self.hypervisor.resume(name) if info.state == "paused" else self.hypervisor.start(name))
        if action == "stop":  # graceful, forced off after `timeout` seconds
            return await self.hypervisor.shutdown(name, timeout)
        if action == "destroy":
            return await self.hypervisor.destroy(name)
        if action == "suspend":
            return await self.hypervisor.suspend(name)
        return await self.hypervisor.resume(name)

    async def _on_info(self, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        return {"total": self.ledger.total.to_wire(), "free": self.ledger.free(trio.current_time()).to_wire(),
                "domains": [asdict(d) for d in await self.hypervisor.list()], "backend": self.domains.kind,
                "migration_uri": self.migration_uri}

    async def _on_export(self, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        """What relocation carries to the target: the domain's XML, its state, and its snapshots. With
        `freeze`, a running VM is paused first (and persisted paused), so that it never runs at two
        places: the target starts its copy while this one is frozen, and only then is this one removed.
        With `ship` (real guests), an active VM is instead stopped into a managed save image, persisted
        off; the target fetches the image and the disk (`host.fetch`), and an undone move resumes the VM
        here from the image. `ship` in the answer says whether there is an image to fetch."""
        name = _name(args)
        if name not in self.ledger.allocated:
            raise NotFound(f"no VM {name} on this node")
        ship = args.get("ship") is True
        if ship and self.domains.disk(name) is None:
            raise RequestError(f"export {name}: this node's backend ({self.domains.kind}) has no disks to ship")
        try:
            state = (await self.hypervisor.info(name)).state
            xml = await self.hypervisor.xml(name)
            if ship and state != "shutoff":
                await self.hypervisor.managed_save(name)
                self._set_desired(name, "shutoff")
            elif args.get("freeze") is True and state == "running":
                await self.hypervisor.suspend(name)
                self._set_desired(name, "paused")
        except HypervisorError as err:
            raise RequestError(f"export {name}: {err}") from None
        rows = self._db.execute("SELECT tag, xml, state, taken, libvirt FROM snapshots WHERE name = ? "
                                "ORDER BY taken", (name,))
        answer = {"xml": xml, "state": state, "snapshots": [list(row) for row in rows]}
        if ship:
            answer["ship"] = {"image": state != "shutoff"}
        return answer

    def _set_desired(self, name: str, state: str) -> None:
        with self._db:
            self._db.execute("UPDATE domains SET desired = ? WHERE name = ?", (state, name))

    async def _on_fetch(self, caller: Caller, args: dict[str, Any]) -> bytes:
        """A chunk of an exported VM's disk or memory image: `part` "disk" or "image", from `offset`."""
        name, part, offset = _name(args), args.get("part"), _count(args, "offset")
        if name not in self.ledger.allocated or self.domains.disk(name) is None:
            raise NotFound(f"no VM {name} with files on this node")
        if part not in ("disk", "image"):
            raise RequestError("part must be disk or image")
        path = self.domains.disk(name) if part == "disk" else self.domains.saved(name)
        try:
            return await trio.to_thread.run_sync(read_chunk, path, offset, CHUNK)
        except FileNotFoundError:
            raise NotFound(f"{name} has no {part} to fetch here") from None

    async def _on_incoming(self, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        """Get ready to receive reserved VM `name` by live migration: an empty overlay for the disk copy."""
        name = _name(args)
        if not any(r.key == name for r in self.ledger.reserved.values()):
            raise Conflict(f"no reservation for {name} on this node")
        if self.migration_uri is None:
            raise RequestError(f"this node ({self.domains.kind}) cannot receive a live migration")
        if not await self.hypervisor.persistent(name):
            await trio.to_thread.run_sync(self.domains.prepare, name)
        return {"uri": self.migration_uri}

    async def _on_migrate(self, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        """Live-migrate VM `name` to the daemon at `uri` (peer to peer, incremental disk copy); once it
        answers, the target's libvirt holds the VM and this one no longer does. The target adopts it at
        its next `host.vm`; the coordinator then forgets it here (`host.vm undefine`)."""
        name, uri = _name(args), args.get("uri")
        if not (isinstance(uri, str) and uri.startswith("qemu+tcp://")):
            raise RequestError("uri must be the target's qemu+tcp:// libvirt URI")
        if name not in self.ledger.allocated:
            raise NotFound(f"no VM {name} on this node")
        started = time.monotonic()
        try:
            await self.hypervisor.migrate(name, uri, MIGRATE_FLAGS, MIGRATE_PARAMS)
        except HypervisorError as err:
            raise RequestError(f"live migration of {name} failed: {err}") from None
        return {"seconds": time.monotonic() - started}

    async def _movability(self, name: str) -> dict[str, Any]:
        """How the VM can leave this node (`discovery.relocation`): its backend, and whether it may migrate
        live (a daemon here, and no internal snapshots, which an NBD disk copy would not carry)."""
        live = self.migration_uri is not None and not await self.hypervisor.snapshot_names(name)
        return {"backend": self.domains.kind, "live": live}

    async def _reconcile(self, name: str) -> None:
        """Make this store agree with libvirt about VM `name` (real guests only, whose daemon keeps domains
        and whose migrations move them behind the agent's back): adopt a persistent domain the store
        lacks (it arrived by live migration; the reservation made for it, if still held, is what it
        takes), forget one that libvirt no longer has (it migrated away)."""
        if self.domains.kind == "test":
            return
        if name in self.ledger.allocated:
            if not await self.hypervisor.persistent(name):
                log.info("host: %s is no longer defined here (it migrated away); forgetting it", name)
                await self._forget(name)
            return
        if not await self.hypervisor.persistent(name):
            return
        info = await self.hypervisor.info(name)
        held = next((r for r in self.ledger.reserved.values() if r.key == name), None)
        if held is not None:
            self.ledger.confirm(held.token, trio.current_time())
            need = held.need
        else:
            need = Resources(info.vcpus, info.memory_mb, 0)
            self.ledger.allocate(name, need)
        xml = await self.hypervisor.xml(name)
        with self._db:
            self._db.execute("INSERT OR REPLACE INTO domains VALUES (?, ?, ?, ?, ?, ?)",
                             (name, xml, need.vcpus, need.memory_mb, need.disk_gb, info.state))
        log.info("host: adopted %s, which arrived by live migration (%s)", name, info.state)

    async def _on_snapshot(self, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        """Store the domain's XML and a state under `tag` (`state`: the one to restore, default the current
        one; the VE service passes the state a VM had before it paused it for a consistent snapshot)."""
        name, tag, state = _name(args), _name(args, "tag"), args.get("state")
        if state is not None and state not in SETTLED:
            raise RequestError(f"state must be one of {', '.join(SETTLED)}")
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
        with self._db:
            self._db.execute("INSERT OR REPLACE INTO snapshots VALUES (?, ?, ?, ?, ?, ?)",
                             (name, tag, xml, state, taken, internal))
        return {"tag": tag, "state": state, "taken": taken}

    async def _on_restore(self, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        """Re-create the domain from snapshot `tag`: forced off, redefined from the stored XML, brought to
        the stored state. Idempotent."""
        name, tag = _name(args), _name(args, "tag")
        if name not in self.ledger.allocated:
            raise NotFound(f"no VM {name} on this node")
        row = self._db.execute("SELECT xml, state, libvirt FROM snapshots WHERE name = ? AND tag = ?",
                               (name, tag)).fetchone()
        if row is None:
            raise NotFound(f"no snapshot {tag!r} of {name} on this node")
        xml, state, internal = row
        try:
            if internal:  # the disk (and memory) come back from the qcow2 file
                info = await self.hypervisor.snapshot_revert(name, tag, state)
                self._set_desired(name, info.state)
                return asdict(info)
            await self.hypervisor.destroy(name)
            await self.hypervisor.define(xml)
            with self._db:
                self._db.execute("UPDATE domains SET xml = ?, desired = ? WHERE name = ?", (xml, state, name))
            info = await self.hypervisor.settle(name, state)
        except HypervisorError as err:
            raise RequestError(f"restore {name} to {tag}: {err}") from None
        return asdict(info)

    async def _forget(self, name: str) -> None:
        await self.hypervisor.undefine(name)
        await trio.to_thread.run_sync(self.domains.remove, name)
        with self._db:
            self._db.execute("DELETE FROM domains WHERE name = ?", (name,))
            self._db.execute("DELETE FROM snapshots WHERE name = ?", (name,))
        self.ledger.deallocate(name)

    # -- standby copies (`ve replicate`, `ve failover`: discovery.replicas) ---------------------------
    # A standby is not a domain: it is what `host.export` gave for a VM that runs on another node (its XML
    # and snapshots), kept in its own table, with the VM's room held in the ledger under `standby_key`, a
    # key no domain can have ('/' is refused in names). So `host.vm`, `host.reserve` and the VE service's
    # checks of where a VM is defined never see it, and a failover onto it never lacks room.

    def _serve_standbys(self, transport: Endpoint) -> None:
        self._db.execute("CREATE TABLE IF NOT EXISTS standbys (name TEXT PRIMARY KEY, xml TEXT, vcpus INTEGER, "
                         "memory_mb INTEGER, disk_gb INTEGER, snapshots TEXT, taken REAL)")
        for method, handler in (("host.reserve_standby", self._on_reserve_standby),
                                ("host.standby", self._on_standby), ("host.unstandby", self._on_unstandby),
                                ("host.standbys", self._on_standbys), ("host.promote", self._on_promote)):
            transport.route(method, self._through_mailbox(handler))

    def _hold_standbys(self) -> None:
        """At start: hold the room of every persisted standby again."""
        for name, vcpus, memory_mb, disk_gb in self._db.execute("SELECT name, vcpus, memory_mb, disk_gb "
                                                                "FROM standbys"):
            self.ledger.allocate(standby_key(name), Resources(vcpus, memory_mb, disk_gb))

    async def _on_reserve_standby(self, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        """Hold room for a standby of VM `name` for RESERVATION_TTL seconds; `host.standby` confirms it."""
        name = _name(args)
        if self.domains.kind != "test":
            raise RequestError(f"this node ({self.domains.kind}) keeps no standbys: a real guest's copy needs "
                               "its disk, which is not shipped yet")
        if name in self.ledger.allocated:
            raise Conflict(f"{name} itself is on this node; its standby must be on another")
        need = Resources(*(_count(args, f) for f in ("vcpus", "memory_mb", "disk_gb")))
        try:
            token = self.ledger.reserve(standby_key(name), need, trio.current_time(), RESERVATION_TTL).token
        except Insufficient as err:
            raise Conflict(f"no room for a standby of {name}: {err}") from None
        return {"token": token, "ttl": RESERVATION_TTL}

    async def _on_standby(self, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        """Keep, or refresh, the standby of VM `name`: its `xml` and `snapshots` as `host.export` gave them
        at time `taken`. A new standby confirms reservation `token`; one held already is updated in place
        (a retried confirm too), so this is idempotent."""
        name, token, xml, taken = _name(args), args.get("token"), args.get("xml"), args.get("taken")
        snapshots = _snapshots(args)
        if not (isinstance(xml, str) and len(xml) <= MAX_XML and _xml_name(xml) == name):
            raise RequestError(f"xml must be the definition of {name}, at most {MAX_XML} characters")
        if not isinstance(taken, int | float) or isinstance(taken, bool):
            raise RequestError("taken must be a time in seconds")
        if name in self.ledger.allocated:
            raise Conflict(f"{name} itself is on this node; its standby must be on another")
        key = standby_key(name)
        if key in self.ledger.allocated:
            if isinstance(token, str):
                self.ledger.release(token)  # a retried confirm: the standby is held already
        elif not isinstance(token, str):
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
        with self._db:
            self._db.execute("INSERT OR REPLACE INTO standbys VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (name, xml, need.vcpus, need.memory_mb, need.disk_gb, json.dumps(snapshots), taken))
        return {"name": name, "taken": taken, "snapshots": len(snapshots)}

    async def _on_unstandby(self, caller: Caller, args: dict[str, Any]) -> bool:
        """Drop the standby of VM `name` and free its room; True if there was one (none is fine)."""
        name = _name(args)
        with self._db:
            dropped = self._db.execute("DELETE FROM standbys WHERE name = ?", (name,)).rowcount > 0
        self.ledger.deallocate(standby_key(name))
        return dropped

    async def _on_standbys(self, caller: Caller, args: dict[str, Any]) -> list[dict[str, Any]]:
        """The standbys this node keeps: VM name, room held, how many snapshots, when exported."""
        rows = self._db.execute("SELECT name, vcpus, memory_mb, disk_gb, snapshots, taken FROM standbys "
                                "ORDER BY name")
        return [{"name": name, "need": Resources(vcpus, memory_mb, disk_gb).to_wire(),
                 "snapshots": len(json.loads(snapshots)), "taken": taken}
                for name, vcpus, memory_mb, disk_gb, snapshots, taken in rows]

    async def _on_promote(self, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        """Turn the standby of VM `name` into the VM: defined from the stored XML with its snapshots, its
        held room now the VM's (one transaction), then brought to `state`. If the VM is here already (a
        retried promote), it is only brought to `state`."""
        name, state = _name(args), args.get("state")
        if state not in SETTLED:
            raise RequestError(f"state must be one of {', '.join(SETTLED)}")
        try:
            if name not in self.ledger.allocated:
                row = self._db.execute("SELECT xml, vcpus, memory_mb, disk_gb, snapshots FROM standbys "
                                       "WHERE name = ?", (name,)).fetchone()
                if row is None:
                    raise NotFound(f"no standby of {name} on this node")
                xml, vcpus, memory_mb, disk_gb, snapshots = row
                await self.hypervisor.define(xml)
                rows = [(name, *snapshot) for snapshot in json.loads(snapshots)]
                with self._db:
                    self._db.execute("INSERT OR REPLACE INTO domains VALUES (?, ?, ?, ?, ?, ?)",
                                     (name, xml, vcpus, memory_mb, disk_gb, state))
                    if rows:
                        marks = ", ".join("?" * len(rows[0]))
                        self._db.executemany(f"INSERT OR REPLACE INTO snapshots VALUES ({marks})", rows)
                    self._db.execute("DELETE FROM standbys WHERE name = ?", (name,))
                self.ledger.deallocate(standby_key(name))
                self.ledger.allocate(name, Resources(vcpus, memory_mb, disk_gb))
            info = await self.hypervisor.settle(name, state)
        except HypervisorError as err:
            raise RequestError(f"promote {name}: {err}") from None
        self._set_desired(name, info.state)
        return asdict(info)


def standby_key(name: str) -> str:
    """The ledger key of the standby of VM `name`: never a domain's name (those cannot hold '/')."""
    return f"{name}/standby"


def _name(args: dict[str, Any], field: str = "name") -> str:
    name = args.get(field)
    if not isinstance(name, str) or not 0 < len(name) <= 200 or "/" in name:
        raise RequestError(f"{field} must be a non-empty string without '/'")
    return name


def _xml_name(xml: str) -> str | None:
    try:
        return ET.fromstring(xml).findtext("name")
    except ET.ParseError:
        return None


def _snapshots(args: dict[str, Any]) -> list[tuple[str, str, str, float, str]]:
    """The snapshots a relocation carries: [tag, xml, state, taken, libvirt] each (libvirt: the internal
    snapshot's XML for REDEFINE, "" on the test driver; an older agent sends four fields)."""
    rows = args.get("snapshots") or []
    if not isinstance(rows, list) or len(rows) > MAX_SNAPSHOTS:
        raise RequestError(f"snapshots must be a list of at most {MAX_SNAPSHOTS}")
    checked = []
    for row in rows:
        if not (isinstance(row, list) and len(row) in (4, 5)):
            raise RequestError("each snapshot must be [tag, xml, state, taken, libvirt]")
        tag, xml, state, taken, internal = (*row, "")[:5]
        _name({"tag": tag}, "tag")
        if not (isinstance(xml, str) and len(xml) <= MAX_XML and state in SETTLED and isinstance(internal, str)
                and len(internal) <= 2 * MAX_XML and isinstance(taken, int | float) and not isinstance(taken, bool)):
            raise RequestError(f"snapshot {tag}: malformed")
        checked.append((tag, xml, state, float(taken), internal))
    return checked


def shutdown_timeout(args: dict[str, Any]) -> float:
    """`timeout` of a stop, in seconds: more than 0, at most MAX_SHUTDOWN_TIMEOUT (default SHUTDOWN_TIMEOUT)."""
    timeout = args.get("timeout", SHUTDOWN_TIMEOUT)
    if (not isinstance(timeout, int | float) or isinstance(timeout, bool)
            or not 0 < timeout <= MAX_SHUTDOWN_TIMEOUT):
        raise RequestError(f"timeout must be a number of seconds, more than 0 and at most {MAX_SHUTDOWN_TIMEOUT:g}")
    return float(timeout)


def _count(args: dict[str, Any], field: str) -> int:
    value = args.get(field)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 2**31:
        raise RequestError(f"{field} must be a non-negative integer")
    return value
