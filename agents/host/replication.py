"""Continuous replication: the shell that keeps each wanted VM's disk mirrored to its standby copy's node.

The HA layer says which VMs of this node to mirror, and where (`want`: the first standby copy of each VM of a
`standby` VE with replication on, `discovery.ha.service`); this actor makes it so, one task per VM: open the
mirror (`agents.host.mirrors`), poll its job every POLL seconds (the lag, `agents.host.mirror_lag`), tell the
standby's node once it is ready, and end it when it is no longer wanted. A job that ends on its own (an
operation that cannot run beside it ended it: a snapshot, a managed save, a migration; the guest stopped; the
destination failed) is settled with the standby's node and started again RESTART seconds later, or later after
each failure in a row (up to BACKOFF_LIMIT). A start waits on the VM's lock, so it never races an operation
on the VM. A ready mirror further behind than the policy's `max_lag` holds the guest's disk writes back below
what it copies until it has caught up half-way (`agents.host.mirror_lag.hold_back`): the lag is bounded, at
the guest's expense, as DRBD's congestion policy "block" does. `host.mirrors` answers `status`.

One job per disk is what QEMU allows, so a VM with several copies has one mirrored; the others are as fresh as
their last export (`ve replicate`).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio

from agents.host.mirror_lag import MirrorLag, hold_back
from agents.hypervisor.actor import HypervisorError
from agents.hypervisor.mirror import CopyJob
from agents.messages import MirrorStatus
from agents.runtime import Actor
from overlay.wire.rpc import RpcError

log = logging.getLogger(__name__)
POLL = 0.5
"""Seconds between two looks at a mirror job: the lag's resolution."""
RESTART = 1.0
"""Seconds before a mirror that ended on its own is started again."""
BACKOFF_LIMIT = 60.0
"""Longest pause between two attempts at a mirror that keeps failing."""
SETTLE_LIMIT = 60.0
"""Seconds ending a mirror may take (the job's end, the standby node's answer)."""


@dataclass(frozen=True)
class MirrorWant:
    """Mirror a VM's disk to node `node` at `addr`; `sync`: writes wait for the copy; `bandwidth`: bytes/s, 0 none;
    `max_lag`: seconds behind beyond which the guest's writes are held back (`agents.host.mirror_lag.hold_back`)."""

    node: str
    addr: str
    sync: bool = False
    bandwidth: int = 0
    max_lag: float = math.inf


class MirroringHost(Protocol):
    """What the shell needs of the host (`agents.host.mirrors.Mirrors`)."""

    mirror_status: Callable[[], list[MirrorStatus]]

    async def begin_mirror(self, name: str, addr: str, bandwidth: int, sync: bool) -> bool: ...

    async def mirror_job(self, name: str) -> CopyJob | None: ...

    async def announce_ready(self, name: str, addr: str) -> bool: ...

    async def limit_writes(self, name: str, rate: int) -> None: ...

    async def end_mirror(self, name: str, addr: str, was_ready: bool) -> None: ...


@dataclass
class _Mirror:
    want: MirrorWant
    lag: MirrorLag
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    state: str = "starting"
    held: int = 0
    """The cap on the guest's disk writes set now (bytes/s; 0: none)."""


class Replication(Actor):
    """Keeps the wanted mirrors running (module docstring)."""

    name = "replication"
    tick_interval = POLL

    def __init__(self, host: MirroringHost) -> None:
        super().__init__()
        self.host = host
        self.wanted: dict[str, MirrorWant] = {}
        self._running: dict[str, _Mirror] = {}
        self._retry_at: dict[str, float] = {}
        self._failures: Counter[str] = Counter()
        self._why: dict[str, str] = {}
        self.sent: Counter[str] = Counter()
        """Bytes each VM's ended mirror jobs copied (a running job's own count is added by `status`)."""
        self._tasks: trio.Nursery | None = None
        host.mirror_status = self.status

    def want(self, wanted: dict[str, MirrorWant]) -> None:
        """The mirrors to keep from now on (VM -> where); the others end at the next tick."""
        self.wanted = dict(wanted)

    async def run(self) -> None:
        async with trio.open_nursery() as tasks:
            self._tasks = tasks
            await super().run()

    async def tick(self) -> None:
        assert self._tasks is not None, "run() opens the tasks' nursery"
        now = trio.current_time()
        for name, mirror in self._running.items():
            if self.wanted.get(name) != mirror.want:
                mirror.scope.cancel()
        for name, want in self.wanted.items():
            if name not in self._running and now >= self._retry_at.get(name, -math.inf):
                self._running[name] = _Mirror(want, MirrorLag(now))
                self._tasks.start_soon(self._keep, name, self._running[name])
        for name in set(self._retry_at) - set(self.wanted):
            del self._retry_at[name]
            self._failures.pop(name, None)
            self._why.pop(name, None)

    def status(self) -> list[MirrorStatus]:
        """Each wanted mirror: its state, lag, bytes behind and bytes sent (`host.mirrors`)."""
        now, shown = trio.current_time(), []
        for name, want in sorted(self.wanted.items()):
            mirror = self._running.get(name)
            if mirror is not None and mirror.state in ("syncing", "ready"):
                lag = mirror.lag
                shown.append(MirrorStatus(name, want.node, mirror.state, lag.lag(now), lag.behind,
                                          self.sent[name] + lag.cur, want.sync, mirror.held))
            else:
                shown.append(MirrorStatus(name, want.node, f"waiting: {self._why.get(name, 'starting')}", 0.0, 0,
                                          self.sent[name], want.sync))
        return shown

    async def _keep(self, name: str, mirror: _Mirror) -> None:
        """Run one mirror job of VM `name` until it ends or is no longer wanted, then settle it."""
        started: bool | None = None  # None: the start was cut short, and may have begun the job
        try:
            with mirror.scope:
                try:
                    started = await self.host.begin_mirror(name, mirror.want.addr, mirror.want.bandwidth,
                                                           mirror.want.sync)
                except (RpcError, HypervisorError):
                    started = False  # nothing left running: `begin_mirror` undoes a half start
                    raise
                if not started:
                    self._why[name] = "the VM does not run here"
                    return
                mirror.state = "syncing"
                await self._watch(name, mirror)
                self._why[name] = "the job ended (an operation on the VM, or the VM stopped)"
        except (RpcError, HypervisorError) as err:
            self._why[name] = str(err)
            log.warning("replication: mirror of %s to %s: %s", name, mirror.want.node, err)
        finally:
            self.sent[name] += mirror.lag.cur
            if mirror.held:  # the guest is not held back beyond its mirror
                with trio.CancelScope(shield=True), trio.move_on_after(SETTLE_LIMIT):
                    try:
                        await self.host.limit_writes(name, 0)
                    except HypervisorError as err:  # the VM left, say: nothing to lift
                        log.info("replication: lifting the cap on %s's writes: %s", name, err)
            if started is not False:
                with trio.CancelScope(shield=True), trio.move_on_after(SETTLE_LIMIT):
                    try:
                        await self.host.end_mirror(name, mirror.want.addr, mirror.state == "ready")
                    except (RpcError, HypervisorError) as err:
                        log.warning("replication: ending the mirror of %s: %s", name, err)
            self._failures[name] = 0 if mirror.state == "ready" else self._failures[name] + 1
            pause = min(RESTART * 2 ** self._failures[name], BACKOFF_LIMIT)
            self._retry_at[name] = trio.current_time() + pause
            del self._running[name]

    async def _watch(self, name: str, mirror: _Mirror) -> None:
        """Sample the job every POLL seconds until it ends; announce it ready once; hold the guest back while the
        mirror is too far behind."""
        while (job := await self.host.mirror_job(name)) is not None:
            now = trio.current_time()
            mirror.lag.sample(now, job.cur, job.end)
            if job.ready and mirror.state != "ready":
                if not await self.host.announce_ready(name, mirror.want.addr):
                    return  # the standby's node no longer exports it (it restarted): start over
                mirror.state = "ready"
                log.info("replication: %s is mirrored to %s", name, mirror.want.node)
            cap = hold_back(mirror.lag.lag(now), mirror.want.max_lag, mirror.lag.copy_rate(), mirror.held)
            if mirror.state == "ready" and cap is not None:
                await self.host.limit_writes(name, cap)
                mirror.held = cap
                log.info("replication: %s's mirror is %.1f s behind; its writes %s", name, mirror.lag.lag(now),
                         f"held to {cap >> 20} MiB/s" if cap else "no longer held")
            await trio.sleep(POLL)
