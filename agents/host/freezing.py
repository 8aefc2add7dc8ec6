"""Freezing this node's VMs when the HA layer says its lease lapsed, thawing them when it holds again, and
switching them off when it was revoked.

A frozen VM is paused and *held* (`HostBase.held`) with the state it should have, its persisted state left
as it was: `release` (a thaw, or the VE layer's word after a restart) brings it back, and `may_run` decides
whether it may. A freeze does not wait for the VM's lock: it must be done within the lease's term, and an
operation on the VM may hold the lock for tens of seconds (a graceful stop, a migration). What such an
operation does next goes through `may_run` where it would run the VM (and `_copy_disk` leaves a held VM
paused).

A fenced VM (its lease was revoked: watchers run it elsewhere) is forced off and held the same way, not
undefined: the VE layer's fencing pass removes it once the directory places it on the node that now holds
it; `may_run` (the HA layer) never lets it run here again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from agents.host.base import HostBase
from agents.hypervisor.actor import SETTLED, HypervisorError
from overlay.wire.rpc import RequestError

log = logging.getLogger(__name__)


class Freezing(HostBase):
    """`freeze` and `thaw`, which the HA layer calls in-process."""

    async def freeze(self, names: Iterable[str]) -> list[str]:
        """Pause and hold each VM of `names` that runs here; the names paused."""
        frozen = []
        for name in names:
            if name not in self.ledger.allocated or name in self.held:
                continue
            try:
                if (await self.hypervisor.info(name)).state != "running":
                    continue
                await self.hypervisor.suspend(name)
            except HypervisorError as err:
                log.error("host: cannot freeze %s: %s", name, err)
                continue
            self.held[name] = "running"
            frozen.append(name)
        return frozen

    async def thaw(self, names: Iterable[str]) -> list[str]:
        """Release each VM of `names` still held (`may_run` permitting); the names running again."""
        thawed = []
        for name in names:
            async with self.gate.enter(), self.vm_locks.hold(name):
                if name not in self.held:
                    continue
                try:
                    await self._release(name)
                except (HypervisorError, RequestError) as err:
                    log.warning("host: cannot thaw %s: %s", name, err)
                    continue
            thawed.append(name)
        return thawed

    async def fence(self, names: Iterable[str]) -> list[str]:
        """Force off and hold each VM of `names` that is here, whatever its state; the names fenced."""
        fenced = []
        for name in names:
            if name not in self.ledger.allocated:
                continue
            try:
                if (await self.hypervisor.info(name)).state != "shutoff":
                    await self.hypervisor.destroy(name)
            except HypervisorError as err:
                log.error("host: cannot switch off %s, fenced: %s", name, err)
                continue
            if name not in self.held:
                row = await self.db.one("SELECT desired FROM domains WHERE name = ?", (name,))
                self.held[name] = row[0] if row is not None and row[0] in SETTLED else "running"
            fenced.append(name)
        return fenced
