"""Crashed guests started again on their own host: libvirt's lifecycle events, through the restart budget.

The shell around `agents.host.restart_budget.RestartBudget`: an actor of the agent (real guests only) that
watches libvirt's lifecycle events (`agents.hypervisor.events`), feeds the budget each stop that libvirt
reports as a crash ("failed": QEMU died; "crashed": a guest panic), and carries out the decisions it hands
out: a restart, or giving up, each through the host's own check of its intent under the VM's lock
(`agents.host.crashes`). Each decision runs in a task of its own, so a VM whose lock is busy (a 30 s graceful
stop) holds back no other VM's restart.

Events missed are found again: whenever the watch (re)opens (at start, and after the daemon closed the
connection) the host's crashed domains are fed to the budget as crashes, and the host's check skips those
it does not mean to run (held since the node's start, stopped on purpose, already left down). The budget
lives as long as the agent: a restart of this actor (after a bug) keeps the counts.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from agents.host.restart_budget import Decision, GiveUp, RestartBudget
from agents.hypervisor.actor import HypervisorError
from agents.hypervisor.events import CRASHES, Deliver, Stopped, WatchLost
from agents.runtime import Actor

log = logging.getLogger(__name__)
REOPEN_PAUSE = (1.0, 30.0)
"""First and longest pause before opening the events' connection again after it closed or failed to open."""


class CrashedVms(Protocol):
    """What the restarts need of the host (`agents.host.crashes.Crashes`)."""

    async def restart_crashed(self, name: str) -> bool: ...

    async def mark_crashed(self, name: str) -> bool: ...

    async def crashed_now(self) -> list[str]: ...


class Watch(Protocol):
    """An open watch of libvirt's lifecycle events (`agents.hypervisor.events.GuestEvents`)."""

    def close(self) -> None: ...


OpenWatch = Callable[[Deliver], Awaitable[Watch]]


class GuestRestarts(Actor):
    """Restarts this node's crashed guests in place, within their budget; see the module's docstring."""

    name = "restarts"
    tick_interval = 0.25

    def __init__(self, host: CrashedVms, open_watch: OpenWatch, budget: RestartBudget | None = None) -> None:
        super().__init__()
        self.host, self._open_watch = host, open_watch
        self.budget = budget or RestartBudget()
        self._watch: Watch | None = None
        self._reopen_at = -math.inf
        self._pause = REOPEN_PAUSE[0]
        self._tasks: trio.Nursery | None = None

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as tasks:
                self._tasks = tasks
                await super().run()
        finally:
            self._unwatch()

    async def start(self) -> None:
        self._unwatch()
        await self._rewatch()

    async def handle(self, message: object) -> None:
        match message:
            case Stopped(name=name, why=why) if why in CRASHES:
                log.warning("restarts: %s stopped (%s)", name, why)
                self.budget.crashed(name, trio.current_time())
            case WatchLost(reason=reason):
                log.warning("restarts: libvirt closed the events' connection (reason %d); reopening", reason)
                self._unwatch()
                self._reopen_at = trio.current_time()

    async def tick(self) -> None:
        now = trio.current_time()
        if self._watch is None and now >= self._reopen_at:
            await self._rewatch()
        assert self._tasks is not None, "run() opens the tasks' nursery"
        for decision in self.budget.due(now):
            self._tasks.start_soon(self._carry_out, decision)

    async def _carry_out(self, decision: Decision) -> None:
        name = decision.name
        if isinstance(decision, GiveUp):
            if await self.host.mark_crashed(name):
                log.error("restarts: %s crashed %d times in %g s; left down", name,
                          self.budget.restarts(name, trio.current_time()) + 1, self.budget.window)
            return
        try:
            restarted = await self.host.restart_crashed(name)
        except HypervisorError as err:
            log.warning("restarts: cannot start %s again: %s", name, err)
            self.budget.failed(name, trio.current_time())
            return
        except BaseException:  # cancelled, or a bug: the VM must not stay "restarting" in a budget that lives on
            self.budget.skipped(name, trio.current_time())
            raise
        (self.budget.restarted if restarted else self.budget.skipped)(name, trio.current_time())

    async def _rewatch(self) -> None:
        """Open the events' watch, then feed the crashes it may have missed; on failure, try again later."""
        token = trio.lowlevel.current_trio_token()

        def deliver(event: Stopped | WatchLost) -> None:  # in libvirt's event thread: hand over, never block
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self.tell_nowait, event)

        try:
            self._watch = await self._open_watch(deliver)
        except HypervisorError as err:
            log.warning("restarts: %s; trying again in %g s", err, self._pause)
            self._reopen_at = trio.current_time() + self._pause
            self._pause = min(2 * self._pause, REOPEN_PAUSE[1])
            return
        self._pause = REOPEN_PAUSE[0]
        try:
            missed = await self.host.crashed_now()
        except HypervisorError as err:
            log.warning("restarts: cannot list the crashed domains: %s", err)
            return
        now = trio.current_time()
        for name in missed:
            self.budget.crashed(name, now)

    def _unwatch(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.close()
