"""A running VM's disk mirrored to the node of its standby copy: both ends' steps (the shell that drives them
is `agents.host.replication`; the libvirt side, `agents.hypervisor.mirror`).

**The standby's node** (`host.mirror_open`, `host.mirror_ready`, `host.mirror_close`): a mirror is received
into a fresh overlay beside the standby copy (`Domains.new_mirror`), exported over NBD (`agents.host.nbd`),
never into the copy itself: a mirror's first pass writes the disk in no useful order, so until it is
*ready* the copy kept is the last consistent one. Once the VM's host says it is ready (`host.mirror_ready`,
persisted as a marker file), the mirror file is what a failover boots (`Standbys._on_promote` calls
`_settle_mirror` first). A mirror that ends (`host.mirror_close`) either becomes the copy (`keep`: the host
ended a ready job, so the file is the disk as it was at that moment) or is dropped. Internal snapshots are
not mirrored: a copy replaced by its mirror lists none (the VE's shipped snapshots are the ones meant to
outlive the host).

**The VM's host** (`begin_mirror`, `announce_ready`, `end_mirror`, called by the shell): under the VM's lock,
checked to be here, running or paused and not held, the standby's node opens an export and libvirt starts
the job; ending it ends the job, then tells that node whether to keep the file.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import trio

from agents.host.base import HostBase
from agents.host.locks import one_vm
from agents.host.nbd import NbdError, NbdExports
from agents.hypervisor.actor import HypervisorError
from agents.hypervisor.mirror import CopyJob
from agents.messages import (
    HOST_MIRROR_CLOSE,
    HOST_MIRROR_OPEN,
    HOST_MIRROR_READY,
    HOST_MIRRORS,
    MirrorClose,
    MirrorExport,
    MirrorOpen,
    MirrorStatus,
    VmName,
)
from images.tinyguest import ImageError
from overlay.messages import NoArgs
from overlay.wire.rpc import Caller, Endpoint, NotFound, RequestError, split_addr

log = logging.getLogger(__name__)
MIRROR_CALL_TIMEOUT = 30.0
"""Seconds a call to the standby's node about a mirror may take (opening one makes a file, starts qemu-nbd)."""


class Mirrors(HostBase):
    """Both ends of a mirrored disk (module docstring). `exports` are this node's NBD exports."""

    exports: NbdExports

    def _serve_mirrors(self, transport: Endpoint) -> None:
        self.exports = NbdExports(self.db_path.parent / "nbd")
        transport.route(HOST_MIRROR_OPEN, self._served(self._on_mirror_open))
        transport.route(HOST_MIRROR_READY, self._served(self._on_mirror_ready))
        transport.route(HOST_MIRROR_CLOSE, self._served(self._on_mirror_close))
        transport.route(HOST_MIRRORS, self._served(self._on_mirrors))

    # -- the standby's node ----------------------------------------------------------------------------

    @one_vm
    async def _on_mirror_open(self, caller: Caller, request: MirrorOpen) -> MirrorExport:
        """Export a fresh overlay to mirror VM `name`'s disk into, taking at most `bandwidth` bytes/s of writes
        (0: no limit); an export already there is settled first (its host started over)."""
        name = request.name
        if self.domains.kind == "test":
            raise RequestError(f"{name}: the {self.domains.kind} backend has no disks to mirror")
        if await self.db.one("SELECT 1 FROM standbys WHERE name = ?", (name,)) is None:
            raise NotFound(f"no standby of {name} on this node")
        await self._settle_mirror(name)
        host = split_addr(self.transport.addr)[0]
        try:
            file = await trio.to_thread.run_sync(self.domains.new_mirror, name)
            export = await trio.to_thread.run_sync(self.exports.start, name, file, host, request.bandwidth)
        except (ImageError, NbdError, OSError) as err:
            raise RequestError(f"cannot receive the mirror of {name}: {err}") from None
        log.info("host: receiving the mirror of %s on %s:%d", name, export.host, export.port)
        return MirrorExport(export.host, export.port, export.name)

    @one_vm
    async def _on_mirror_ready(self, caller: Caller, request: VmName) -> bool:
        """The mirror of VM `name` caught up: from now on it is what a failover boots. False if none runs."""
        if self.exports.get(request.name) is None:
            return False
        self._ready_marker(request.name).touch()
        return True

    @one_vm
    async def _on_mirror_close(self, caller: Caller, request: MirrorClose) -> bool:
        """End the mirror of VM `name`: kept as the standby's disk if `keep` and it was ready, else dropped;
        whether it was kept."""
        return await self._settle_mirror(request.name, request.keep)

    async def _settle_mirror(self, name: str, keep: bool = True) -> bool:
        """Stop the export of VM `name`'s mirror (qemu-nbd flushes it) and make a ready one the standby's disk
        (`keep`, and its qemu-nbd flushed it: `NbdExports.stop`) or drop it; whether it became the disk. Its lock
        held."""
        if self.domains.kind == "test":
            return False
        whole = await trio.to_thread.run_sync(self.exports.stop, name)
        return await self._keep_mirror(name, keep and whole)

    async def _keep_mirror(self, name: str, keep: bool) -> bool:
        """Make VM `name`'s mirror, its export ended, the standby's disk if `keep` and it was ready, else drop it;
        whether it became the disk."""
        marker, mirror = self._ready_marker(name), self.domains.mirror(name)
        kept = keep and marker.exists() and mirror.exists()
        if kept:
            mirror.replace(self.domains.standby(name))
            await self.db.write("UPDATE standbys SET snapshots = '[]', taken = ? WHERE name = ?", (time.time(), name))
            log.info("host: the mirror of %s is now its standby copy", name)
        mirror.unlink(missing_ok=True)
        marker.unlink(missing_ok=True)
        return kept

    def _ready_marker(self, name: str) -> Path:
        return self.domains.mirror(name).with_suffix(".ready")

    def mirror_state(self, name: str) -> str | None:
        """`ready` or `syncing` while VM `name`'s mirror is received here, else None (`host.standbys` shows it)."""
        if self.exports.get(name) is None:
            return None
        return "ready" if self._ready_marker(name).exists() else "syncing"

    # -- the VM's host ------------------------------------------------------------------------------------

    async def _on_mirrors(self, caller: Caller, request: NoArgs) -> list[MirrorStatus]:
        return self.mirror_status()

    async def begin_mirror(self, name: str, addr: str, bandwidth: int, sync: bool) -> bool:
        """Mirror VM `name`'s disk to its standby copy's node at `addr`, if the VM is here, running or paused,
        and not held; whether the job started. RpcError (the standby's node) or HypervisorError if a step failed;
        a job begun is then undone."""
        async with self.gate.enter(), self.vm_locks.hold(name):
            if name not in self.ledger.allocated or name in self.held or self.domains.disk(name) is None:
                return False
            if (await self.hypervisor.info(name)).state not in ("running", "paused"):
                return False
            if await self.hypervisor.mirror_job(name) is not None:
                await self.hypervisor.mirror_end(name)  # left by an earlier run of the agent
            export = await self.transport.ask(addr, HOST_MIRROR_OPEN, MirrorOpen(name, bandwidth),
                                              timeout=MIRROR_CALL_TIMEOUT)
            try:
                await self.hypervisor.mirror_begin(name, export.host, export.port, export.export, sync)
            except HypervisorError:
                await self._close_remote(name, addr, keep=False)
                raise
            return True

    async def mirror_job(self, name: str) -> CopyJob | None:
        """VM `name`'s mirror job as libvirt shows it now (None: none runs)."""
        return await self.hypervisor.mirror_job(name)

    async def limit_writes(self, name: str, rate: int) -> None:
        """Cap VM `name`'s disk writes at `rate` bytes/s (0: lift the cap): its mirror is too far behind."""
        await self.hypervisor.mirror_limit_writes(name, rate)

    async def announce_ready(self, name: str, addr: str) -> bool:
        """Tell the standby's node at `addr` that VM `name`'s mirror caught up; whether it took it."""
        taken: bool = await self.transport.ask(addr, HOST_MIRROR_READY, VmName(name), timeout=MIRROR_CALL_TIMEOUT)
        return taken

    async def end_mirror(self, name: str, addr: str, was_ready: bool) -> None:
        """End VM `name`'s mirror job if it still runs, then tell the standby's node at `addr` to keep the file
        (it was ready: ending it leaves a consistent copy) or drop it."""
        try:
            await self.hypervisor.mirror_end(name)
        except HypervisorError as err:
            log.warning("host: ending the mirror of %s: %s", name, err)
            was_ready = False  # its end is not known to be clean
        await self._close_remote(name, addr, was_ready)

    async def _close_remote(self, name: str, addr: str, keep: bool) -> None:
        await self.transport.ask(addr, HOST_MIRROR_CLOSE, MirrorClose(name, keep), timeout=MIRROR_CALL_TIMEOUT)
