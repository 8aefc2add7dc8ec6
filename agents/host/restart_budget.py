"""When a crashed guest is started again on its own host, and when the host gives up on it (sans-IO).

A guest whose QEMU dies (killed, crashed, a panic that `on_crash` turns into a stop) is restarted where it
was, after a backoff, at most `limit` times in any `window` seconds; one crash more and the host gives up:
the VM stays down, marked crashed, for the HA layer to recover elsewhere. Without a budget a guest that
crashes at boot would be restarted forever, burning the CPU its neighbours need (systemd's
`StartLimitBurst`/`StartLimitIntervalSec` and Kubernetes' CrashLoopBackOff solve the same problem).

States of one VM (the shell's observations on the arrows, `due` hands out the decisions)::

    idle ── crashed, < limit restarts in the window ──► WAITING (due at now + backoff)
    idle ── crashed, limit restarts in the window ──► GIVING_UP (due at once)
    WAITING ── due ──► RESTARTING ── restarted ──► idle (counted); crashed again if a crash came meanwhile
                                  ├─ failed ──► idle (counted), then crashed again
                                  └─ skipped (its host no longer means it to run) ──► idle (not counted)
    GIVING_UP ── due ──► idle
    a crash seen while WAITING or GIVING_UP: ignored (the same death, seen twice: an event and a sweep)

A crash seen while RESTARTING is kept for the outcome: the new QEMU may die before its restart is reported.
It may also be the old death seen twice; then the next restart finds the VM running, and the shell skips it
(the host checks libvirt's state before each restart), at no cost to the budget.

The backoff doubles with each restart still in the window: FIRST_BACKOFF, then twice, four times... A
restart is counted when it is made (`restarted` or `failed` at time t), so the invariant is about those
times: for every VM, any `window` seconds hold at most `limit` of them. This module never reads a clock,
calls libvirt or decides whether a stop was a crash: the shell (`agents.host.restarts`) does, and feeds it.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

RESTART_LIMIT = 3
"""Restarts of one VM allowed within RESTART_WINDOW; the next crash in the window leaves it down."""
RESTART_WINDOW = 600.0
"""Seconds over which restarts are counted (a guest that ran that long since its oldest restart earns one back)."""
FIRST_BACKOFF = 1.0
"""Seconds from a crash to its restart when the window holds no restart; each restart in it doubles it."""


@dataclass(frozen=True)
class Restart:
    """Start VM `name` again, if its host still means it to run (the shell checks, then reports how it went)."""

    name: str


@dataclass(frozen=True)
class GiveUp:
    """Leave VM `name` down and mark it crashed: its budget is spent."""

    name: str


Decision = Restart | GiveUp


class Phase(enum.Enum):
    WAITING = "waiting"
    RESTARTING = "restarting"
    GIVING_UP = "giving_up"


@dataclass
class _Vm:
    restarts: deque[float] = field(default_factory=deque)
    """When its recent restarts were made, oldest first (only those within the window are kept)."""
    phase: Phase | None = None
    due: float = 0.0
    again: bool = False
    """A crash was seen while its restart was under way."""


class RestartBudget:
    """The restart budget of every VM of a host: fed crashes and outcomes with the time, hands out decisions."""

    def __init__(self, limit: int = RESTART_LIMIT, window: float = RESTART_WINDOW,
                 first_backoff: float = FIRST_BACKOFF) -> None:
        if limit < 0 or window <= 0 or first_backoff < 0:
            raise ValueError("a restart budget needs limit >= 0, window > 0 and first_backoff >= 0")
        self.limit, self.window, self.first_backoff = limit, window, first_backoff
        self._vms: dict[str, _Vm] = {}

    def crashed(self, name: str, now: float) -> None:
        """VM `name`'s guest stopped by crashing at `now` (or the restart made for it failed)."""
        vm = self._vms.setdefault(name, _Vm())
        if vm.phase is Phase.RESTARTING:
            vm.again = True
        if vm.phase is not None:
            return
        recent = self._recent(vm, now)
        if recent >= self.limit:
            vm.phase, vm.due = Phase.GIVING_UP, now
        else:
            vm.phase, vm.due = Phase.WAITING, now + self.first_backoff * 2 ** recent

    def due(self, now: float) -> list[Decision]:
        """The decisions whose time has come, earliest first; each is handed out once."""
        ready = sorted((vm.due, name) for name, vm in self._vms.items()
                       if vm.phase in (Phase.WAITING, Phase.GIVING_UP) and vm.due <= now)
        decisions: list[Decision] = []
        for _, name in ready:
            vm = self._vms[name]
            if vm.phase is Phase.WAITING:
                vm.phase = Phase.RESTARTING
                decisions.append(Restart(name))
            else:
                vm.phase = None
                decisions.append(GiveUp(name))
        for name in list(self._vms):
            self._tidy(name, now)
        return decisions

    def next_due(self) -> float | None:
        """When the next decision falls due; None: none is waiting."""
        return min((vm.due for vm in self._vms.values() if vm.phase in (Phase.WAITING, Phase.GIVING_UP)),
                   default=None)

    def restarted(self, name: str, now: float) -> None:
        """The restart of `name` was made at `now`: counted (and a crash seen meanwhile is taken now)."""
        vm = self._restarting(name)
        vm.restarts.append(now)
        vm.phase, again, vm.again = None, vm.again, False
        if again:
            self.crashed(name, now)

    def failed(self, name: str, now: float) -> None:
        """The restart of `name` was tried at `now` and failed: counted, and the VM is down again (a crash)."""
        self.restarted(name, now)
        self.crashed(name, now)

    def skipped(self, name: str, now: float) -> None:
        """The restart of `name` was not made (its host stopped it on purpose meanwhile, or it left): not counted."""
        vm = self._restarting(name)
        vm.phase, vm.again = None, False
        self._tidy(name, now)

    def phase(self, name: str) -> Phase | None:
        """Where VM `name` stands (None: nothing pending)."""
        vm = self._vms.get(name)
        return None if vm is None else vm.phase

    def restarts(self, name: str, now: float) -> int:
        """Restarts of `name` counted in the window that ends at `now`."""
        vm = self._vms.get(name)
        return 0 if vm is None else self._recent(vm, now)

    def _restarting(self, name: str) -> _Vm:
        vm = self._vms.get(name)
        if vm is None or vm.phase is not Phase.RESTARTING:
            raise ValueError(f"no restart of {name} is under way")
        return vm

    def _recent(self, vm: _Vm, now: float) -> int:
        while vm.restarts and vm.restarts[0] <= now - self.window:
            vm.restarts.popleft()
        return len(vm.restarts)

    def _tidy(self, name: str, now: float) -> None:
        """Forget a VM with nothing pending and no restart in the window (memory follows recent crashes only)."""
        vm = self._vms[name]
        if vm.phase is None and not self._recent(vm, now):
            del self._vms[name]
