"""The recovery a failover (`discovery.ve.failovers`) and a rebuild (`discovery.ve.rebuilding`) share: both bring a
VM whose host is down up on another node, which the VM's slot names in an intent written first, and both are
finished or undone, when left unfinished, from that node alone. `TakeoverRecovery` is that recovery; each kind
says how the node brings the VM to its state again (a standby promoted, a rebuilt domain settled) and what the
record becomes.

States of a `TakeoverRecovery` (and of the ending of a failover or a rebuild, which starts at TIDY)::

    ASK the intent's node ── unknown ──► stopped (nothing changed)
       ├─ holds ──► BRING it to the state again (idempotent) ── fails ──► stopped
       │              └─► TIDY, forward: undefine the old copy (best effort: a host that is down keeps it,
       │                  and its `Fencing` removes it once it reads the record)
       └─ does not hold ──► TIDY, undone: bring the old copy back to the state (best effort)
    TIDY ─► READ ── gone ──► refused (not found); its intent changed ──► done (another agent settled it)
          ── else WRITE: the kind's outcome (forward: the VM on that node; undone: the slot without the
             intent) ─► done

**The rule** (tested over each kind's table and interleavings): forward iff that node holds the domain; the old
copy is removed only then; a node that cannot be asked stops recovery before it changes anything. Sans-IO, as
the cores that use it: it must never touch a socket, a clock or trio.
"""

from __future__ import annotations

import enum

from discovery.ve.records import FailoverIntent, RebuildIntent, VERecord
from discovery.ve.transaction import (
    Action,
    CallHost,
    DirectoryFailed,
    Done,
    HostAnswered,
    HostFailed,
    Observation,
    Probed,
    ReadRecord,
    RecordRead,
    RecordWritten,
    Refuse,
    UnexpectedObservation,
    WriteRecord,
    probe,
)

TIDY_TIMEOUT = 10.0
"""How long the old host is given to tidy its copy (it is likely down)."""


class RecoveryStep(enum.Enum):
    ASK = "ask"
    BRING = "bring"
    TIDY = "tidy"
    READ = "read"
    WRITE = "write"
    OVER = "over"


class TakeoverRecovery:
    """Finish or undo the operation on `vm` whose `intent` the record `value` holds (the module's rule); with
    `forward` given, the VM is known to be brought up there and this only ends it (from TIDY). Ends with
    `Done(forward)`, or `Refuse` with the intent left in place. A kind says `_bring` and `_outcome`."""

    def __init__(self, value: VERecord, vm: str, domain: str, intent: FailoverIntent | RebuildIntent,
                 forward: bool | None) -> None:
        self.value, self.vm, self.domain, self.intent = value, vm, domain, intent
        self.name = value.name
        self.slot = value.placement[vm]
        self.forward = bool(forward)
        self.step = RecoveryStep.ASK if forward is None else RecoveryStep.TIDY
        self._pending = value

    def start(self, now: float) -> Action:
        return probe(self.intent, self.domain) if self.step is RecoveryStep.ASK else self._tidy()

    def on(self, observation: Observation, now: float) -> Action:
        S = RecoveryStep
        match self.step, observation:
            case S.ASK, Probed(holds=None, reason=reason):
                return self._over(Refuse(reason))
            case S.ASK, Probed(holds=True):
                self.forward = True
                self.step = S.BRING
                return self._bring()
            case (S.ASK, Probed(holds=False)) | (S.BRING, HostAnswered()):
                return self._tidy()
            case S.BRING, HostFailed(reason=reason):
                return self._over(Refuse(reason))
            case S.TIDY, HostAnswered() | HostFailed():  # best effort: a host that is down keeps its copy off
                self.step = S.READ
                return ReadRecord()
            case S.READ, RecordRead(value=None):
                return self._over(Refuse(f"VE {self.name!r} was destroyed meanwhile", "not_found"))
            case S.READ, RecordRead(value=VERecord() as fresh):
                self.value = fresh
                slot = fresh.placement.get(self.vm)
                if slot is None or self.intent not in slot.intents():
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

    def _bring(self) -> CallHost:
        """Have the intent's node, which holds the domain, bring it to the intent's state (idempotent)."""
        raise NotImplementedError

    def _outcome(self, fresh: VERecord) -> VERecord:
        """The record `fresh` once the operation is over, forward or undone (`self.forward`)."""
        raise NotImplementedError

    def _tidy(self) -> Action:
        """The old host's copy: undefined if the operation went forward, else brought back to the state."""
        self.step = RecoveryStep.TIDY
        method, old = ("host.vm.undefine", {}) if self.forward else ("host.vm.settle", {"state": self.intent.state})
        return CallHost(self.slot.node, self.slot.addr, method, {"name": self.domain, **old},
                        timeout=TIDY_TIMEOUT, best_effort=True)

    def _over(self, action: Done | Refuse) -> Action:
        self.step = RecoveryStep.OVER
        return action


def told(action: Done | Refuse, what: str, attempt: str, cause: str, stays: str) -> Done | Refuse:
    """What a coordinator answers once the recovery it ran after `what` failed for `cause` ended with `action`:
    done (it went forward after all); refused, the intent left for the next attempt; or refused, undone (the
    `attempt` could not be made, the VM stays on `stays`)."""
    if isinstance(action, Refuse):
        return Refuse(f"{what} failed ({cause}) and is left unfinished ({action.reason}); retry to finish or undo it")
    if action.result:
        return Done(True)
    return Refuse(f"cannot {attempt}: {cause}; undone, it stays on {stays}")
