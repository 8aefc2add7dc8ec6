"""The VMs of this node: capacity reservations, domain lifecycle, and their persistence.

The embedded `test:///` driver forgets every domain when its connection closes, so the agent keeps
each domain's XML and desired state in SQLite and re-creates them after a restart. Every operation
is idempotent, so a requester may retry after a timeout without fear.

Snapshots live here too: the test driver keeps libvirt snapshots in memory only, so `host.snapshot`
stores the domain's XML and a state (running, paused or shutoff) per (domain, tag) in SQLite, and
`host.restore` re-creates the domain from them. Relocation (`discovery.ve_service`) moves a VM with
`host.export` at the source (XML and snapshots, the source frozen) and `host.confirm` with that XML at
the target, so a VM's snapshots travel with it; undefining a VM drops its snapshots from this node.

Only agents (role node) and operators may call `host.*`: users act on their VMs through `ve.*`, which
checks who owns the VE.
"""

from __future__ import annotations

import logging
import sqlite3
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict
from pathlib import Path
from typing import Any

import trio

from agents.capacity import Insufficient, Ledger, Resources, UnknownReservation
from agents.hypervisor import SETTLED, DomainInfo, Hypervisor, HypervisorError, domain_xml
from agents.runtime import Actor
from overlay.rpc import Caller, Conflict, Endpoint, Forbidden, Handler, NotFound, RequestError

log = logging.getLogger(__name__)
RESERVATION_TTL = 10.0
ACTIONS = ("start", "stop", "destroy", "suspend", "resume", "undefine", "info", "settle")
MAX_XML = 64 * 1024
MAX_SNAPSHOTS = 64  # carried in one relocation message


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
                 domain_type: str = "test") -> None:
        super().__init__()
        self.hypervisor = hypervisor
        self.total = total
        self.ledger = Ledger(total)
        self.domain_type = domain_type
        self._db = sqlite3.connect(db_path)
        self._db.execute("CREATE TABLE IF NOT EXISTS domains (name TEXT PRIMARY KEY, xml TEXT, vcpus INTEGER, "
                         "memory_mb INTEGER, disk_gb INTEGER, desired TEXT)")
        self._db.execute("CREATE TABLE IF NOT EXISTS snapshots (name TEXT, tag TEXT, xml TEXT, state TEXT, "
                         "taken REAL, PRIMARY KEY (name, tag))")
        for method, handler in (("host.reserve", self._on_reserve), ("host.confirm", self._on_confirm),
                                ("host.release", self._on_release), ("host.vm", self._on_vm),
                                ("host.info", self._on_info), ("host.export", self._on_export),
                                ("host.snapshot", self._on_snapshot), ("host.restore", self._on_restore)):
            transport.route(method, self._through_mailbox(handler))

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
        """Re-create persisted domains in their desired state (the test driver forgot them)."""
        self.ledger = Ledger(self.total)
        rows = list(self._db.execute("SELECT name, xml, vcpus, memory_mb, disk_gb, desired FROM domains"))
        for name, xml, vcpus, memory_mb, disk_gb, desired in rows:
            self.ledger.allocate(name, Resources(vcpus, memory_mb, disk_gb))
            await self.hypervisor.define(xml)
            await self.hypervisor.settle(name, desired if desired in SETTLED else "shutoff")
        log.info("host: %d VMs recovered", len(rows))

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
        return {"token": reservation.token, "ttl": RESERVATION_TTL}

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
        need = reservation.need
        xml = carried or domain_xml(reservation.key, need.vcpus, need.memory_mb, domain_type=self.domain_type)
        try:
            await self.hypervisor.define(xml)
            with self._db:
                self._db.execute("INSERT OR REPLACE INTO domains VALUES (?, ?, ?, ?, ?, ?)",
                                 (reservation.key, xml, need.vcpus, need.memory_mb, need.disk_gb, state))
                self._db.executemany("INSERT OR REPLACE INTO snapshots VALUES (?, ?, ?, ?, ?)",
                                     [(reservation.key, *snapshot) for snapshot in snapshots])
            info = await self.hypervisor.settle(reservation.key, state)
        except HypervisorError as err:
            await self._forget(reservation.key)
            raise RequestError(f"cannot start {reservation.key}: {err}") from None
        return asdict(info)

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
        if name not in self.ledger.allocated:
            if action in ("undefine", "destroy"):
                return None  # already gone: idempotent
            raise NotFound(f"no VM {name} on this node")
        try:
            if action == "undefine":
                await self._forget(name)
                return None
            if action == "info":
                return asdict(await self.hypervisor.info(name))
            if action == "settle":
                info = await self.hypervisor.settle(name, args["state"])
            else:
                info = await self._act(name, action)
        except HypervisorError as err:
            raise RequestError(f"{action} {name}: {err}") from None
        with self._db:
            self._db.execute("UPDATE domains SET desired = ? WHERE name = ?", (info.state, name))
        return asdict(info)

    async def _act(self, name: str, action: str) -> DomainInfo:
        if action == "start":
            info = await self.hypervisor.info(name)
            return await (self.hypervisor.resume(name) if info.state == "paused" else self.hypervisor.start(name))
        if action == "stop":
            return await self.hypervisor.shutdown(name)
        if action == "destroy":
            return await self.hypervisor.destroy(name)
        if action == "suspend":
            return await self.hypervisor.suspend(name)
        return await self.hypervisor.resume(name)

    async def _on_info(self, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        return {"total": self.ledger.total.to_wire(), "free": self.ledger.free(trio.current_time()).to_wire(),
                "domains": [asdict(d) for d in await self.hypervisor.list()]}

    async def _on_export(self, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        """What relocation carries to the target: the domain's XML, its state, and its snapshots. With
        `freeze`, a running VM is paused first (and persisted paused), so that it never runs at two
        places: the target starts its copy while this one is frozen, and only then is this one removed."""
        name = _name(args)
        if name not in self.ledger.allocated:
            raise NotFound(f"no VM {name} on this node")
        try:
            state = (await self.hypervisor.info(name)).state
            xml = await self.hypervisor.xml(name)
            if args.get("freeze") is True and state == "running":
                await self.hypervisor.suspend(name)
                with self._db:
                    self._db.execute("UPDATE domains SET desired = 'paused' WHERE name = ?", (name,))
        except HypervisorError as err:
            raise RequestError(f"export {name}: {err}") from None
        rows = self._db.execute("SELECT tag, xml, state, taken FROM snapshots WHERE name = ? ORDER BY taken",
                                (name,))
        return {"xml": xml, "state": state, "snapshots": [list(row) for row in rows]}

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
        except HypervisorError as err:
            raise RequestError(f"snapshot {name}: {err}") from None
        if state not in SETTLED:
            raise RequestError(f"cannot snapshot {name}: it is {state}")
        taken = time.time()
        with self._db:
            self._db.execute("INSERT OR REPLACE INTO snapshots VALUES (?, ?, ?, ?, ?)", (name, tag, xml, state, taken))
        return {"tag": tag, "state": state, "taken": taken}

    async def _on_restore(self, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        """Re-create the domain from snapshot `tag`: forced off, redefined from the stored XML, brought to
        the stored state. Idempotent."""
        name, tag = _name(args), _name(args, "tag")
        if name not in self.ledger.allocated:
            raise NotFound(f"no VM {name} on this node")
        row = self._db.execute("SELECT xml, state FROM snapshots WHERE name = ? AND tag = ?", (name, tag)).fetchone()
        if row is None:
            raise NotFound(f"no snapshot {tag!r} of {name} on this node")
        xml, state = row
        try:
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
        with self._db:
            self._db.execute("DELETE FROM domains WHERE name = ?", (name,))
            self._db.execute("DELETE FROM snapshots WHERE name = ?", (name,))
        self.ledger.deallocate(name)


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


def _snapshots(args: dict[str, Any]) -> list[tuple[str, str, str, float]]:
    """The snapshots a relocation carries: [tag, xml, state, taken] each."""
    rows = args.get("snapshots") or []
    if not isinstance(rows, list) or len(rows) > MAX_SNAPSHOTS:
        raise RequestError(f"snapshots must be a list of at most {MAX_SNAPSHOTS}")
    checked = []
    for row in rows:
        if not (isinstance(row, list) and len(row) == 4):
            raise RequestError("each snapshot must be [tag, xml, state, taken]")
        tag, xml, state, taken = row
        _name({"tag": tag}, "tag")
        if not (isinstance(xml, str) and len(xml) <= MAX_XML and state in SETTLED
                and isinstance(taken, int | float) and not isinstance(taken, bool)):
            raise RequestError(f"snapshot {tag}: malformed")
        checked.append((tag, xml, state, float(taken)))
    return checked


def _count(args: dict[str, Any], field: str) -> int:
    value = args.get(field)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 2**31:
        raise RequestError(f"{field} must be a non-negative integer")
    return value
