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

States of a `FailoverRecovery` (and of the ENDING of a `Failover`, which starts at TIDY)::

    ASK_STANDBY ── unknown ──► stopped (nothing changed)
       ├─ holds ──► PROMOTE again (idempotent: brought to the state) ── fails ──► stopped
       │              └─► TIDY, forward: undefine the old copy (best effort: a host that is down keeps it,
       │                  and its `Fencing` removes it once it reads the record)
       └─ does not hold ──► TIDY, undone: bring the old copy back to the state (best effort)
    TIDY ─► READ ── gone ──► refused (not found); its intent changed ──► done (another agent settled it)
          ── else WRITE: the slot = the standby's node and the copy out of `replicas` (forward), or the
             slot without the intent (undone) ─► done

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
    Probed,
    ReadRecord,
    RecordRead,
    RecordWritten,
    Refuse,
    UnexpectedObservation,
    WriteRecord,
    probe,
    vm_action,
)

VM_STATE: dict[VEState, VMState] = {"running": "running", "stopped": "shutoff", "suspended": "paused"}
"""The state a promoted VM is brought to, by the state of its VE."""
TIDY_TIMEOUT = 10.0
"""How long the old host is given to tidy its copy (it is likely down)."""


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
        doing = f"failover of {self.name}/{self.vm} to {self.standby.node}"
        if isinstance(action, Refuse):
            return self._over(Refuse(f"{doing} failed ({self.cause}) and is left unfinished ({action.reason}); "
                                     "retry to finish or undo it"))
        if action.result:
            return self._over(Done(True))
        return self._over(Refuse(f"cannot fail over {self.name}/{self.vm} to {self.standby.node}: {self.cause}; "
                                 f"undone, it stays on {self.slot.node}"))

    def _over(self, action: Done | Refuse) -> Action:
        self.step = Step.OVER
        return action


class RecoveryStep(enum.Enum):
    ASK_STANDBY = "ask standby"
    PROMOTE = "promote"
    TIDY = "tidy"
    READ = "read"
    WRITE = "write"
    OVER = "over"


class FailoverRecovery:
    """Finish or undo the failover of `vm` that the record `value` holds the intent of (see the module's rule);
    with `forward` given, the promotion is known to be done and this only ends it (from TIDY). `rtt_ms`: the
    RTT to the standby's node. Ends with `Done(forward)`, or `Refuse` with the intent left in place."""

    def __init__(self, value: VERecord, vm: str, domain: str, rtt_ms: float | None,
                 forward: bool | None = None) -> None:
        self.value, self.vm, self.domain, self.rtt_ms = value, vm, domain, rtt_ms
        self.name = value.name
        self.slot = value.placement[vm]
        assert self.slot.failing_over is not None, "a recovery is made for a failover left in the record"
        self.intent = self.slot.failing_over
        self.forward = bool(forward)
        self.step = RecoveryStep.ASK_STANDBY if forward is None else RecoveryStep.TIDY
        self._pending = value

    def start(self, now: float) -> Action:
        return probe(self.intent, self.domain) if self.step is RecoveryStep.ASK_STANDBY else self._tidy()

    def on(self, observation: Observation, now: float) -> Action:
        S = RecoveryStep
        match self.step, observation:
            case S.ASK_STANDBY, Probed(holds=None, reason=reason):
                return self._over(Refuse(reason))
            case S.ASK_STANDBY, Probed(holds=True):
                self.forward = True
                self.step = S.PROMOTE
                return promote(self.intent, self.domain)
            case (S.ASK_STANDBY, Probed(holds=False)) | (S.PROMOTE, HostAnswered()):
                return self._tidy()
            case S.PROMOTE, HostFailed(reason=reason):
                return self._over(Refuse(reason))
            case S.TIDY, HostAnswered() | HostFailed():  # best effort: a host that is down keeps its copy off
                self.step = S.READ
                return ReadRecord()
            case S.READ, RecordRead(value=None):
                return self._over(Refuse(f"VE {self.name!r} was destroyed meanwhile", "not_found"))
            case S.READ, RecordRead(value=VERecord() as fresh):
                self.value = fresh
                slot = fresh.placement.get(self.vm)
                if slot is None or slot.failing_over != self.intent:
                    return self._over(Done(self.forward))  # another agent settled it meanwhile
                self._pending = self._outcome(fresh)
                self.step = S.WRITE
                return WriteRecord(self._pending)
            case S.WRITE, RecordWritten():
                self.value = self._pending
                return self._over(Done(self.forward))
            case S.READ | S.WRITE, DirectoryFailed(reason=reason, kind=kind):
                return self._over(Refuse(reason, kind))
        raise UnexpectedObservation(self, self.step, observation)

    def _tidy(self) -> Action:
        """The old host's copy: undefined if the failover went forward, else brought back to the state."""
        self.step = RecoveryStep.TIDY
        method, old = ("host.vm.undefine", {}) if self.forward else ("host.vm.settle", {"state": self.intent.state})
        return CallHost(self.slot.node, self.slot.addr, method, {"name": self.domain, **old},
                        timeout=TIDY_TIMEOUT, best_effort=True)

    def _outcome(self, fresh: VERecord) -> VERecord:
        """The record once the failover is over: the VM on the standby's node, which no longer counts as a
        copy (forward), or where it was, without the intent (undone)."""
        if not self.forward:
            return fresh.with_slot(self.vm, replace(self.slot, failing_over=None))
        i = self.intent
        slot = Slot(i.node, i.addr, i.site, self.rtt_ms, f"failed over from {i.source} ({i.why})")
        copies = [e for e in fresh.standbys_of(self.vm) if e.node != i.node]
        return fresh.with_slot(self.vm, slot).with_standbys(self.vm, copies)

    def _over(self, action: Done | Refuse) -> Action:
        self.step = RecoveryStep.OVER
        return action


def promote(intent: FailoverIntent, domain: str) -> CallHost:
    """Make the standby copy on the intent's node the VM, brought to the intent's state (idempotent)."""
    return CallHost(intent.node, intent.addr, "host.promote", {"name": domain, "state": intent.state})
