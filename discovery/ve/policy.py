"""A VE's HA policy (`ha:` in its spec, `ve ha` later): setting it, and keeping the standby copies it asks for.

The policy lives in the record's spec (`discovery.ve.spec.HaPolicy`). Mode `standby` keeps `copies` standby
copies of each VM through the machinery of `ve replicate` (`Replicas._keep_copies`); setting `restart` or
`none` drops them. What recovers a VM when its host dies reads the policy; this module only records it and
keeps the copies.

**`ve ha`** is all or nothing where it can be: the new policy is written in the same write that lists the
copies, and copies that cannot be placed (no live node with room) refuse the change before the record
changes. Only a copy whose node fails after its room was reserved leaves the policy set with that copy
missing: the record's `shortfall` says why, `ve show` reports the VM degraded, and the refusal says so.

**`ve create`** of a VE with a `standby` policy never fails for its copies. As in Nomad (a job is registered
and runs what fits; what cannot be placed is a blocked evaluation that its status reports) and Proxmox HA (a
VM joins HA whatever the spare room; `ha-manager status` tells how it fares), the VE is created and runs;
copies that cannot be made leave the record's `shortfall`, and `ve show` reports the VM degraded with that
reason until `ve ha` (or the watchers restoring protection) make them. vSphere's strict admission control
refuses the power-on instead; refusing here would undo a running VE for want of spare room elsewhere, while
the user asked first of all for the VE. The create's answer carries the shortfall, so the user knows.
The copies are made after the create transaction, not in it: a coordinator that dies in between leaves a
running VE with fewer copies than asked, which `ve show` reports as degraded too.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

from discovery.ve.directory import Stored
from discovery.ve.messages import RecordView, SetHa
from discovery.ve.records import Shortfall
from discovery.ve.replicas import Replicas
from discovery.ve.spec import HaPolicy, SpecError
from overlay.wire.rpc import Caller, RequestError, RpcError

log = logging.getLogger(__name__)


class Policies(Replicas):
    """`ve.ha`, and the copies a new VE's policy asks for."""

    async def _on_ha(self, caller: Caller, request: SetHa) -> RecordView:
        """Set the VE's HA policy and keep the standby copies it asks for (none unless `standby`); answers as
        `ve replicate` does (the record, the copies added and dropped)."""
        try:
            policy = HaPolicy.from_dict(request.ha)
        except SpecError as err:
            raise RequestError(str(err)) from None
        async with self._locked(caller, request.name) as record:
            ve = replace(record.ve, spec=replace(record.ve.spec, ha=policy))
            kept = await self._keep_copies(replace(record, ve=ve), policy.copies)
        if kept.failures:
            raise RequestError(f"the HA policy of {ve.name} is set, but some standby copies could not be made "
                               f"({kept.failures}); ve show reports them degraded, ve ha again retries")
        log.info("VE %s: HA policy %s (by %s)", ve.name, policy, caller.cn)
        return kept.answer()

    async def restore_protection(self, name: str) -> None:
        """Make the standby copies VE `name`'s policy asks for again (an HA watcher, after a failover used one
        up or a rebuild left the VM's copies behind); a shortfall is recorded, as for a new VE."""
        caller = Caller(f"ha@{self.node}", "operator", self.node, self.membership.me.site)
        try:
            async with self._locked(caller, name) as record:
                await self._protect(record)
        except (RequestError, RpcError) as err:
            log.warning("VE %s: its protection could not be restored: %s", name, err)

    async def _protect(self, record: Stored) -> Stored:
        """Make the standby copies a VE asks for, if any (just created, or recovered); a shortfall is recorded,
        never raised (module docstring)."""
        copies = record.ve.spec.ha.copies
        if not copies:
            return record
        try:
            kept = await self._keep_copies(record, copies)
        except (RequestError, RpcError) as err:
            log.warning("VE %s runs unprotected: %s", record.ve.name, err)
            short = replace(record.ve, shortfall=Shortfall(str(err), time.time()))
            try:
                return await self.directory.put(short, after=record)
            except (RequestError, RpcError) as failed:  # `ve show` still counts the copies it lacks
                log.warning("VE %s: its shortfall could not be recorded: %s", record.ve.name, failed)
                return record
        return kept.record
