"""Rebuilding VMs whose host is down (`ve rebuild`): made again on another node, in their VE's state, booting
their newest shipped snapshot (`discovery.ve.shipping`), else the image their spec names: the `restart` of the
HA policy (a VM with standby copies fails over instead, `ve failover`).

This module chooses which VMs are rebuilt and drives, one VM at a time, the sans-IO transaction
`discovery.ve.rebuilding.Rebuild` (where a VM goes, the intent in its slot, and why an interrupted rebuild is
finished or undone without the VM running at two places), and `RebuildRecovery` for a rebuild left unfinished
(`VEService._settle`). A VM's host is down as for a failover (`VEBase._down`); one that is alive and answers is
left alone unless forced, and then its copy is switched off first. The old host, when it comes back, holds
its copy off and its `Fencing` undefines it once it reads that the record places the VM on a node that holds
it (`discovery.ve.replicas`).

`rebuild` is what the HA watchers call, in-process: (VE, VMs, reason), the reason kept in each rebuilt VM's
slot.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from discovery.ve.base import VEBase, domain_name
from discovery.ve.directory import Stored
from discovery.ve.driver import drive
from discovery.ve.messages import RebuildRequest, RecordView
from discovery.ve.rebuilding import Rebuild, RebuildRecovery
from discovery.ve.records import VERecord, view
from discovery.ve.shipped import restore_point
from discovery.ve.spec import DEFAULT_IMAGE
from overlay.wire.rpc import Caller, RequestError, RpcError

log = logging.getLogger(__name__)


class Rebuilds(VEBase):
    """`ve.rebuild`, and the recovery of a rebuild left unfinished."""

    async def _on_rebuild(self, caller: Caller, request: RebuildRequest) -> RecordView:
        ve, rebuilt = await self.rebuild(request.name, None if request.vm is None else [request.vm], None,
                                         force=request.force, caller=caller)
        return {**view(ve), "rebuilt": rebuilt}

    async def rebuild(self, name: str, vms: Sequence[str] | None, reason: str | None, *, host: str | None = None,
                      force: bool = False, caller: Caller | None = None) -> tuple[VERecord, dict[str, str]]:
        """Rebuild on other nodes the VMs `vms` of VE `name` (None: every VM) whose host is down; returns the VE
        as it is after and where each rebuilt VM runs now. `reason`: why, as the caller words it (a watcher:
        "node1's lease revoked by node3"), kept in each VM's slot beside why its host counts as down. `host`:
        only the VMs still placed there (a watcher recovering one host: those already moved are skipped, so a
        second call rebuilds nothing). A VM whose host is alive and answers is skipped (Conflict if no VM asked
        is down), unless `force`: then its copy is switched off first. `caller`: who asks (None: this agent,
        as an operator).

        One VM at a time, each its own transaction; those still to come do not bind where the earlier ones
        go (a VM kept with another by affinity goes first, the other then joins it). A failure stops there:
        the VMs rebuilt so far stay rebuilt, and a retry goes on with the others."""
        caller = caller or Caller(f"ha@{self.node}", "operator", self.node, self.membership.me.site)
        async with self._locked(caller, name) as record:
            down = await self._asked_down(record.ve, vms, host, force, "rebuild", "rebuilds")
            for vm, why in sorted(down.items()):
                cause = "; ".join(w for w in (reason, why) if w) or None
                record = await self._rebuild(record, vm, cause, [v for v in down if v > vm])
        return record.ve, {vm: record.ve.placement[vm].node for vm in sorted(down)}

    async def _rebuild(self, record: Stored, vm: str, why: str | None, pending: list[str]) -> Stored:
        """Rebuild `vm` (its host down for `why`; None: alive, and forced), booting `_boot_image`; `pending`: the
        VMs rebuilt after it. The steps are `discovery.ve.rebuilding.Rebuild`; this only drives it."""
        ve = record.ve
        core = Rebuild(ve, vm, domain_name(ve.name, vm), await self._boot_image(ve, vm), why, self.node, pending)
        try:
            record, _ = await drive(core, record, self.transport, self.directory, self._candidates)
        finally:
            for note in core.notes:
                log.info("VE %s: %s", ve.name, note)
        log.info("rebuild of %s/%s on %s finished", ve.name, vm, record.ve.placement[vm].node)
        self.events.note("vm_rebuilt", f"{ve.name}/{vm}", f"-> {record.ve.placement[vm].node}"
                         + (f" ({why})" if why else ""))
        await self._moved(record.ve)
        return record

    async def _boot_image(self, ve: VERecord, vm: str) -> str | None:
        """What VM `vm` boots once rebuilt: its newest shipped snapshot (`discovery.ve.shipped.restore_point`: its
        disk as it was then), else the image its spec names (None: none). A shipped-snapshot log that cannot be
        read refuses the rebuild, to be retried, rather than boot the spec's image and lose what was shipped."""
        try:
            return restore_point(await self.shipped.get(ve), ve.name, vm).image
        except LookupError:
            image = next(v.image for v in ve.spec.vms if v.name == vm)
            return None if image == DEFAULT_IMAGE else image
        except RpcError as err:
            raise RequestError(f"cannot rebuild {ve.name}/{vm}: its shipped snapshots cannot be read: {err}") from None

    async def _recover_rebuild(self, record: Stored, vm: str) -> tuple[Stored, bool]:
        """Finish or undo the interrupted rebuild of `vm` (`discovery.ve.rebuilding.RebuildRecovery`); returns the
        record and whether it went forward. Raises RequestError, leaving the intent, if the node it names cannot
        be asked."""
        recovery = RebuildRecovery(record.ve, vm, domain_name(record.ve.name, vm))
        record, forward = await drive(recovery, record, self.transport, self.directory)
        log.info("rebuild of %s/%s on %s %s", recovery.name, vm, recovery.intent.node,
                 "finished" if forward else "undone")
        return record, forward
