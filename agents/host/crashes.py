"""The host's side of restarting a crashed guest where it ran: what its own intent says, under the VM's lock.

A stop is a crash to restart only if libvirt says so (the event's detail, `agents.hypervisor.events`, and the
domain's shut-off reason, read again here) *and* the host still means the VM to run: it is still here, its
persisted desired state is running, and it is not held off since the node's start (the directory may have
placed it elsewhere meanwhile: `agents.host.service.HostService.start`). Every stop on purpose is a `host.*`
verb that holds the VM's lock and persists the state it reached (stop, destroy, a managed save for shipping,
a migration leaving, a fencing pass's destroy: `agents.host.lifecycle`, `agents.host.moves`), so once this
side holds the lock, the intent it reads is the last word. A stop made behind the host's back that libvirt
would report as a crash (a kill -9 by some fencing agent) must change the intent first: `host.vm.destroy`
does both.

When the restart budget is spent (`agents.host.restart_budget`), `mark_crashed` persists the desired state
CRASHED: the VM stays down across agent restarts, and `host.vm.info`, `host.info` and the metrics show it
"crashed" (`HostBase.shown`) for the HA layer to recover elsewhere, until a verb sets another state
(`ve start` restarts it here). The shell that drives both steps is `agents.host.restarts`.
"""

from __future__ import annotations

import logging

from agents.host.base import CRASHED, HostBase

log = logging.getLogger(__name__)


class Crashes(HostBase):
    """`restart_crashed` and `mark_crashed`: the two steps of `agents.host.restarts.CrashedVms`."""

    async def restart_crashed(self, name: str) -> bool:
        """Start VM `name` again if it crashed and this host still means it to run; whether it was started.
        HypervisorError if the start failed (the VM is then down still)."""
        async with self.gate.enter(), self.vm_locks.hold(name):
            if not await self._meant_to_run(name) or not self.may_run(name):
                return False
            await self.hypervisor.start(name)
            self.guest_restarts += 1
            log.warning("host: %s crashed; started again", name)
            return True

    async def mark_crashed(self, name: str) -> bool:
        """Leave crashed VM `name` down, marked crashed, if this host still means it to run (else its intent
        changed: nothing to mark); whether it was marked."""
        async with self.gate.enter(), self.vm_locks.hold(name):
            if not await self._meant_to_run(name):
                return False
            await self._set_desired(name, CRASHED)
            log.error("host: %s keeps crashing; left down, marked crashed", name)
            return True

    async def crashed_now(self) -> list[str]:
        """The domains libvirt holds shut off by a crash now (some perhaps not meant to run: each step checks)."""
        async with self.gate.enter():
            return await self.hypervisor.crashed()

    async def _meant_to_run(self, name: str) -> bool:
        """VM `name` is here, should run, is not held, and libvirt has it shut off by a crash (its lock held)."""
        await self._reconcile(name)
        if name not in self.ledger.allocated or name in self.held:
            return False
        row = await self.db.one("SELECT desired FROM domains WHERE name = ?", (name,))
        return row is not None and row[0] == "running" and name in await self.hypervisor.crashed()
