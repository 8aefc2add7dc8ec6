"""Failing one VM over onto its standby copy, as a sans-IO transaction: `Failover` (its coordinator's side) and
`FailoverRecovery` (anyone finishing or undoing a failover left unfinished). `discovery.ve.replicas` chooses
which VMs fail over and onto which copy, then drives these (`discovery.ve.driver`).

Why a state machine: as a move, a failover interleaves RPCs with writes to the VE record and may stop after
any of them; here its logic is fed observations and returns actions (`discovery.ve.transaction`), so its
whole table and its interleavings are tested without processes (tests/unit/test_ve_failovers.py). It must
never touch a socket, a clock or trio.

**The log is the record.** Before any host is touched the VM's slot gets `failing_over`, a
`discovery.ve.records.FailoverIntent` (the standby's node, addr, site, `from`: the old host, why, the
state to bring the VM to, coordinator, since).

States of a `Failover`::

    INTENT: write failing_over ──── directory fails ──► refused (nothing else changed)
       │ written
       ├─ forced (the old host alive): SWITCH_OFF the old copy (host.vm.destroy: persisted off) ─┐
       └─ its host down ─────────────────────────────────────────────────────────────────────────┤
    FAILOVER (test pause) ◄──────────────────────────────────────────────────────────────────────┘
       ─► PROMOTE (the standby's node: host.promote, defined and brought to the state) ─► ENDING, forward
    SWITCH_OFF or PROMOTE fails ──► RECOVERING (a `FailoverRecovery`): went forward ─► done;
       undone ─► refused, "undone, it stays on <old host>"; stopped ─► refused, "left unfinished"

States of a `FailoverRecovery` (and of the ENDING of a `Failover`): those of a
`discovery.ve.takeover.TakeoverRecovery` (shared with a rebuild), asking the standby's node; it brings the VM
to its state by promoting again (idempotent), and writes the slot = the standby's node and the copy out of
`replicas` (forward), or the slot without the intent (undone).

**The rule** (tested over the table and interleavings): recovery decides from the standby's node, never
from how far the coordinator got: forward iff that node holds the domain; the old copy is removed only
then; a standby's node that cannot be asked stops recovery before it changes anything. The old host is
down, or (forced) its copy was switched off before the promotion, so the VM runs at one place while this
happens. Known limit: a host taken for down that is only cut off keeps running its copy until it reads
the directory again (there is no STONITH).
"""

from __future__ import annotations

import enum
from dataclasses import replace

from discovery.ve.records import FailoverIntent, Slot, Standby, VERecord, VEState, VMState
from discovery.ve.takeover import TakeoverRecovery, told
from discovery.ve.transaction import (
    Action,
    CallHost,
    Continued,
    DirectoryFailed,
    Done,
    HostAnswered,
    HostFailed,
    Observation,
    PauseForTest,
    RecordWritten,
    Refuse,
    UnexpectedObservation,
    WriteRecord,
    vm_action,
)

VM_STATE: dict[VEState, VMState] = {"running": "running", "stopped": "shutoff", "suspended": "paused"}
"""The state a promoted (or rebuilt) VM is brought to, by the state of its VE."""


class Step(enum.Enum):
    INTENT = "intent"
    SWITCH_OFF = "switch off"
    PAUSE = "pause"
    PROMOTE = "promote"
    RECOVERING = "recovering"
    ENDING = "ending"
    OVER = "over"


class Failover:
    """Promote the standby copy `standby` into `vm`, whose host is down for `why` (None: alive, and the
    failover forced), from the record `value`. `rtt_ms`: the RTT to the standby's node, for the slot. Ends
    with `Done(True)` or `Refuse`; `value` is the record as last read or written."""

    def __init__(self, value: VERecord, vm: str, domain: str, standby: Standby, why: str | None,
                 coordinator: str, rtt_ms: float | None) -> None:
        self.value, self.vm, self.domain, self.why, self.rtt_ms = value, vm, domain, why, rtt_ms
        self.name = value.name
        self.slot = value.placement[vm]
        self.coordinator = coordinator
        self.standby = standby
        self.step = Step.INTENT
        self.intent: FailoverIntent | None = None
        self.cause = ""
        self.inner: FailoverRecovery | None = None
        self._pending = value

    def start(self, now: float) -> Action:
        s = self.standby
        self.intent = FailoverIntent(s.node, s.addr, s.site, self.slot.node,
                                     self.why or f"forced while {self.slot.node} was alive",
                                     VM_STATE.get(self.value.state, "running"), self.coordinator, now)
        self._pending = self.value.with_slot(self.vm, replace(self.slot, failing_over=self.intent))
        return WriteRecord(self._pending)

    def on(self, observation: Observation, now: float) -> Action:
        if self.step in (Step.RECOVERING, Step.ENDING):
            assert self.inner is not None
            return self._from_inner(self.inner.on(observation, now))
        match self.step, observation:
            case Step.INTENT, RecordWritten():
                self.value = self._pending
                if self.why is None:
                    self.step = Step.SWITCH_OFF
                    return vm_action(self.slot, self.domain, "host.vm.destroy")
                return self._pause()
            case Step.INTENT, DirectoryFailed(reason=reason, kind=kind):
                return self._over(Refuse(reason, kind))
            case Step.SWITCH_OFF, HostAnswered():
                return self._pause()
            case Step.PAUSE, Continued():
                self.step = Step.PROMOTE
                assert self.intent is not None, "written at the start"
                return promote(self.intent, self.domain)
            case Step.PROMOTE, HostAnswered():
                self.step = Step.ENDING
                self.inner = FailoverRecovery(self.value, self.vm, self.domain, self.rtt_ms, forward=True)
                return self._from_inner(self.inner.start(now))
            case Step.SWITCH_OFF | Step.PROMOTE, HostFailed(reason=reason):
                self.cause = reason
                self.step = Step.RECOVERING
                self.inner = FailoverRecovery(self.value, self.vm, self.domain, self.rtt_ms)
                return self._from_inner(self.inner.start(now))
        raise UnexpectedObservation(self, self.step, observation)

    def _pause(self) -> Action:
        self.step = Step.PAUSE
        return PauseForTest("failover")

    def _from_inner(self, action: Action) -> Action:
        assert self.inner is not None
        self.value = self.inner.value
        if not isinstance(action, (Done, Refuse)):
            return action
        if self.step is Step.ENDING:
            return self._over(action)
        where = f"{self.name}/{self.vm} to {self.standby.node}"
        return self._over(told(action, f"failover of {where}", f"fail over {where}", self.cause, self.slot.node))

    def _over(self, action: Done | Refuse) -> Action:
        self.step = Step.OVER
        return action


class FailoverRecovery(TakeoverRecovery):
    """Finish or undo the failover of `vm` that the record `value` holds the intent of (the module's rule, a
    `discovery.ve.takeover.TakeoverRecovery`'s); with `forward` given, the promotion is known to be done and
    this only ends it (from TIDY). `rtt_ms`: the RTT to the standby's node. Ends with `Done(forward)`, or
    `Refuse` with the intent left in place."""

    def __init__(self, value: VERecord, vm: str, domain: str, rtt_ms: float | None,
                 forward: bool | None = None) -> None:
        intent = value.placement[vm].failing_over
        assert intent is not None, "a recovery is made for a failover left in the record"
        super().__init__(value, vm, domain, intent, forward)
        self.failing_over, self.rtt_ms = intent, rtt_ms

    def _bring(self) -> CallHost:
        return promote(self.failing_over, self.domain)

    def _outcome(self, fresh: VERecord) -> VERecord:
        """The record once the failover is over: the VM on the standby's node, which no longer counts as a
        copy (forward), or where it was, without the intent (undone)."""
        if not self.forward:
            return fresh.with_slot(self.vm, replace(self.slot, failing_over=None))
        i = self.failing_over
        slot = Slot(i.node, i.addr, i.site, self.rtt_ms, f"failed over from {i.source} ({i.why})")
        copies = [e for e in fresh.standbys_of(self.vm) if e.node != i.node]
        return fresh.with_slot(self.vm, slot).with_standbys(self.vm, copies)


def promote(intent: FailoverIntent, domain: str) -> CallHost:
    """Make the standby copy on the intent's node the VM, brought to the intent's state (idempotent)."""
    return CallHost(intent.node, intent.addr, "host.promote", {"name": domain, "state": intent.state})
