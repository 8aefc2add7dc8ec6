"""The VMs of this node: capacity reservations, domain lifecycle, and their persistence.

The embedded `test:///` driver forgets every domain when its connection closes, so the agent keeps
each domain's XML and desired state in SQLite and re-creates them after a restart. Every operation
is idempotent, so a requester may retry after a timeout without fear.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import asdict
from pathlib import Path
from typing import Any

import trio

from agents.capacity import Insufficient, Ledger, Resources, UnknownReservation
from agents.hypervisor import DomainInfo, Hypervisor, HypervisorError, domain_xml
from agents.runtime import Actor
from overlay.rpc import Caller, Conflict, Endpoint, Handler, NotFound, RequestError

log = logging.getLogger(__name__)
RESERVATION_TTL = 10.0
ACTIONS = ("start", "stop", "destroy", "suspend", "resume", "undefine", "info")


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
        for method, handler in (("host.reserve", self._on_reserve), ("host.confirm", self._on_confirm),
                                ("host.release", self._on_release), ("host.vm", self._on_vm),
                                ("host.info", self._on_info)):
            transport.route(method, self._through_mailbox(handler))

    def _through_mailbox(self, handler: Handler) -> Handler:
        async def call(caller: Caller, args: dict[str, Any]) -> Any:
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
            if desired in ("running", "paused"):
                await self.hypervisor.start(name)
            if desired == "paused":
                await self.hypervisor.suspend(name)
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
        token = args.get("token")
        if not isinstance(token, str):
            raise RequestError("host.confirm needs a token")
        try:
            reservation = self.ledger.confirm(token, trio.current_time())
        except UnknownReservation as err:
            raise Conflict(str(err)) from None
        need = reservation.need
        xml = domain_xml(reservation.key, need.vcpus, need.memory_mb, domain_type=self.domain_type)
        try:
            await self.hypervisor.define(xml)
            with self._db:
                self._db.execute("INSERT OR REPLACE INTO domains VALUES (?, ?, ?, ?, ?, ?)",
                                 (reservation.key, xml, need.vcpus, need.memory_mb, need.disk_gb, "running"))
            info = await self.hypervisor.start(reservation.key)
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
        name, action = _name(args), args.get("action")
        if action not in ACTIONS:
            raise RequestError(f"action must be one of {', '.join(ACTIONS)}")
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

    async def _forget(self, name: str) -> None:
        await self.hypervisor.undefine(name)
        with self._db:
            self._db.execute("DELETE FROM domains WHERE name = ?", (name,))
        self.ledger.deallocate(name)


def _name(args: dict[str, Any]) -> str:
    name = args.get("name")
    if not isinstance(name, str) or not 0 < len(name) <= 200 or "/" in name:
        raise RequestError("name must be a non-empty string without '/'")
    return name


def _count(args: dict[str, Any], field: str) -> int:
    value = args.get(field)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 2**31:
        raise RequestError(f"{field} must be a non-negative integer")
    return value
