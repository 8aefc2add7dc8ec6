"""Creating a VE, as a sans-IO transaction: `Create` (its coordinator's side) and `CreateRecovery` (anyone
finishing or undoing a create whose coordinator is gone). `discovery.ve.service` drives them
(`discovery.ve.driver`).

Why a state machine: a create claims a name, reserves room on several hosts, writes the record, has every
host define and start its VM and writes the record again; a failure or a crash may stop it after any of
those. Here its logic is fed observations and returns actions (`discovery.ve.transaction`), so every
combination of where it stopped, which host refuses, fails or does not answer, and whether the directory
does, is tested without a process (tests/unit/test_ve_creating.py). It must never touch a socket, a clock
or trio. Where VMs go is `discovery.ve.placement.plan`'s (pure, called here).

**The log is the record.** The record is written `creating` first (the claim), holds the placement before
any host is asked to start a VM, and turns `running` once every VM runs. Reservations are not logged:
their tokens live in the coordinator only, and a reservation not confirmed within RESERVATION_TTL
(`agents.host.args`) lapses by itself.

States of a `Create`::

    CLAIM the record {creating, no VM placed} ── the name is live ──► refused, "already exists"
       │ another writer won: CLAIM again (CLAIM_ATTEMPTS in all) ──► refused, "kept changing"
       │ the directory fails ──► refused (if the claim landed, recovery deletes it)
    INDEX: start adding the VE's entry, beside the steps below (nothing in them reads it)
    SEARCH this node and the nearest nodes with room ──────────────── fails ──► UNDO
    PLAN (`placement.plan`) ── no plan: SEARCH every member, once; no plan again ──► UNDO, "cannot place"
    RESERVE each VM on its node, in turn ── a node refuses ──► RELEASE the others (at once) ─► PLAN without
       it; after 1 + MAX_REPLANS plans ──► UNDO, "nodes kept refusing reservations"
    PREFETCH each VM's image onto its node if the node lacks it (at once; each host keeps the reservation
       alive meanwhile, so that the start waits for no byte) ── one fails ──► UNDO
    PLACE: write the placement ─────────────────────────────────── fails ──► UNDO
    PLACED (test pause) ─► CONFIRM every VM at once (its host defines and starts it) ── one fails ──► UNDO
    CONFIRMED (test pause) ─► JOIN the index entry's add ── it failed ──► UNDO
    RUNNING: write state running ─► done
       the write fails ──► refused (the record stays `creating`, every VM runs: recovery finishes it)
    UNDO: first JOIN the index entry's add if it still runs (its removal must follow it), then RELEASE
       the tokens not sent, UNDEFINE every VM if any confirm was sent (at once), then as a
       `CreateRecovery` that undoes: ─► refused with the cause, "rolled back"; or, an undefine or the
       delete failing, refused with the roll-back left unfinished (the record stays, for recovery)

States of a `CreateRecovery`::

    ASK the host of each placed VM whether it holds it (a probe, in turn) ── unknown ──► stopped
       ├─ the placement is written and every host holds its VM: READ ─► INDEX the VE again (its add ran beside
       │     the create, which may have stopped before knowing it failed) ─► WRITE state running ─► done (True)
       └─ else: UNDEFINE every placed VM (at once) ── one fails ──► stopped
                READ ─► DELETE the record ─► UNINDEX (best effort) ─► done (False)
    READ ── gone, or another incarnation ──► done (False); no longer `creating` ──► done (True): another
       agent settled it

**The rule** (tested over the table and interleavings): recovery decides from the hosts, not from how far
the coordinator got: forward iff the record holds the placement and every host holds its VM; otherwise
every placed VM is undefined before the record goes, and a host that cannot be asked, or cannot undefine,
stops recovery with the record kept. Only `host.confirm` defines a VM of a new VE, with a token only its
coordinator held, so once the coordinator is gone no VM appears any more: two recoverers decide alike (the
hosts' answers change only by recovery's undefines, which follow a "not every VM held"), and after
recovery the VE either runs with every VM defined where its record says, or has no record and no VM
defined anywhere, and its index entry is gone (or, if removing it failed, is pruned by the next `ve list`,
which shows no entry without a live record). "Gone" is the driver's to ensure, as for intents
(`VEService._check_abandoned`: the coordinator holds the VE's lock while it creates, so it answers busy).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import replace

from discovery.ve import placement as planner
from discovery.ve.records import Slot, VERecord, domain_name
from discovery.ve.spec import DEFAULT_IMAGE, NO_CONSTRAINTS
from discovery.ve.transaction import (
    Action,
    AddToIndex,
    Begun,
    Beside,
    CallHost,
    CallHosts,
    Candidate,
    CandidatesFound,
    ClaimLost,
    ClaimRecord,
    Continued,
    DeleteRecord,
    DirectoryFailed,
    Done,
    FindCandidates,
    HostAnswered,
    HostFailed,
    HostsAnswered,
    Indexed,
    Join,
    Observation,
    PauseForTest,
    Probed,
    ReadRecord,
    RecordRead,
    RecordWritten,
    Refuse,
    RemoveFromIndex,
    SearchFailed,
    UnexpectedObservation,
    WriteRecord,
    probe,
    vm_action,
)

CLAIM_ATTEMPTS = 3
"""Claims of a new VE's name before giving up (each loss means someone wrote it)."""
MAX_REPLANS = 3
PREFETCH_TIMEOUT = 3600.0
"""A prefetch moves a whole image: its host keeps the reservation alive meanwhile."""
RESERVE_TIMEOUT = 10.0
"""A reservation is a ledger entry: its host answers at once, or is taken for refusing."""


class Step(enum.Enum):
    CLAIM = "claim"
    INDEX = "index"
    SEARCH = "search"
    RESERVE = "reserve"
    PREFETCH = "prefetch"
    RELEASE = "release"
    PLACE = "place"
    PLACED = "placed"
    CONFIRM = "confirm"
    CONFIRMED = "confirmed"
    JOIN = "join"
    RUNNING = "running"
    JOIN_TO_UNDO = "join to undo"
    UNDO = "undo"
    OVER = "over"


class Create:
    """Create the VE whose first record is `value` (state creating, no VM placed; its owner, coordinator,
    creation time and uid set), on nodes the driver finds. Ends with `Done(record)` (running) or `Refuse`.
    `value` is the record as last written; `notes`: what went wrong without stopping the create (a node that
    refused a reservation, an index entry not removed), for the driver's caller to log."""

    def __init__(self, value: VERecord) -> None:
        self.value = value
        self.name, self.spec = value.name, value.spec
        self.vms = {vm.name: vm for vm in value.spec.vms}
        self.step = Step.CLAIM
        self.claims = 0
        self.candidates: tuple[Candidate, ...] = ()
        self.widened = False
        self.plans = 0
        self.excluded: list[str] = []
        self.todo: list[tuple[str, str]] = []
        """(VM, node) of the plan still to reserve."""
        self.placement: dict[str, Slot] = {}
        self.tokens: dict[str, str] = {}
        """The reservations not sent to be confirmed yet, by VM."""
        self.confirming = False
        self.indexing = False
        """Whether the index entry's add runs beside the steps, not joined yet."""
        self.cause = Refuse("")
        self.wrapped = False
        """Whether the cause is told as "creating <name> failed": it came with or after the placement's write."""
        self.undo: CreateRecovery | None = None
        self.notes: list[str] = []
        self._pending = value

    def start(self, now: float) -> Action:
        return self._claim()

    def on(self, observation: Observation, now: float) -> Action:
        if self.step is Step.UNDO:
            assert self.undo is not None
            return self._from_undo(self.undo.on(observation, now))
        match self.step, observation:
            case Step.CLAIM, RecordWritten():
                self.step, self.indexing = Step.INDEX, True
                return Beside(AddToIndex(self.name, self.value.owner, self.value.uid))
            case Step.CLAIM, RecordRead():
                return self._over(Refuse(f"a VE named {self.name!r} already exists", "conflict"))
            case Step.CLAIM, ClaimLost():
                if self.claims < CLAIM_ATTEMPTS:
                    return self._claim()
                return self._over(Refuse(f"VE {self.name!r} kept changing while being created (or a replica is "
                                         "still checking copies it held before a long absence); try again in a "
                                         "few seconds", "conflict"))
            case Step.CLAIM, DirectoryFailed(reason=reason, kind=kind):
                return self._over(Refuse(reason, kind))
            case Step.INDEX, Begun():
                return self._search(everyone=False)
            case Step.SEARCH, SearchFailed(reason=reason, kind=kind):
                return self._undo(Refuse(reason, kind), now)
            case Step.SEARCH, CandidatesFound(candidates=found):
                self.candidates = found
                return self._plan(now)
            case Step.RESERVE, HostAnswered(answer=reserved):
                self._reserved(reserved["token"])
                return self._reserve_next()
            case Step.RESERVE, HostFailed(node=node, reason=reason):
                self.notes.append(f"reservation of {self.todo[0][0]} on {node} refused: {reason}; planning again "
                                  "without it")
                self.excluded.append(node)
                if not self.tokens:
                    return self._plan(now)
                self.step = Step.RELEASE
                return CallHosts(self._releases())
            case Step.PREFETCH, HostsAnswered(answers=answers):
                failures = [a.reason for a in answers if isinstance(a, HostFailed)]
                if failures:
                    return self._undo(Refuse("cannot bring the image: " + "; ".join(sorted(failures))), now)
                return self._place()
            case Step.RELEASE, HostsAnswered():
                self.placement, self.tokens = {}, {}
                return self._plan(now)
            case Step.PLACE, RecordWritten():
                self.value = self._pending
                self.step = Step.PLACED
                return PauseForTest("placed")
            case Step.PLACE, DirectoryFailed(reason=reason):
                self.wrapped = True
                return self._undo(Refuse(reason), now)
            case Step.PLACED, Continued():
                self.step, self.confirming = Step.CONFIRM, True
                return CallHosts(tuple(CallHost(slot.node, slot.addr, "host.confirm", {
                    "token": self.tokens.pop(vm), **self.value.nic_args(vm),
                    **({} if self.vms[vm].image == DEFAULT_IMAGE else {"image": self.vms[vm].image})})
                    for vm, slot in self.placement.items()))
            case Step.CONFIRM, HostsAnswered(answers=answers):
                failures = [f"{vm} on {a.reason}" for vm, a in zip(self.placement, answers, strict=True)
                            if isinstance(a, HostFailed)]
                if failures:
                    self.wrapped = True
                    return self._undo(Refuse("; ".join(sorted(failures))), now)
                self.step = Step.CONFIRMED
                return PauseForTest("confirmed")
            case Step.CONFIRMED, Continued():
                self.step, self.indexing = Step.JOIN, False
                return Join()
            case Step.JOIN, Indexed():
                self.step = Step.RUNNING
                return self._write(replace(self.value, state="running"))
            case Step.JOIN, DirectoryFailed(reason=reason, kind=kind):
                self.wrapped = True
                return self._undo(Refuse(reason, kind), now)
            case Step.JOIN_TO_UNDO, Indexed() | DirectoryFailed():
                return self._roll_back(now)
            case Step.RUNNING, RecordWritten():
                self.value = self._pending
                return self._over(Done(self.value))
            case Step.RUNNING, DirectoryFailed(reason=reason, kind=kind):
                return self._over(Refuse(reason, kind))
        raise UnexpectedObservation(self, self.step, observation)

    def _claim(self) -> Action:
        self.claims += 1
        return ClaimRecord(self.value)

    def _search(self, everyone: bool) -> Action:
        self.step = Step.SEARCH
        return FindCandidates(self.spec, everyone)

    def _plan(self, now: float) -> Action:
        """Plan every VM on the candidates with known room, less the nodes that refused; with no plan, ask
        every member once before giving up."""
        if self.plans > MAX_REPLANS:
            return self._undo(Refuse(f"cannot place {self.name}: nodes kept refusing reservations "
                                     f"({', '.join(self.excluded)})"), now)
        self.plans += 1
        offers = [c.offer(rank) for rank, c in enumerate(self.candidates) if c.free]
        result = planner.plan(self.spec, offers, exclude=self.excluded)
        if isinstance(result, planner.Refusal):
            if self.widened:
                return self._undo(Refuse(f"cannot place {self.name}: {result}"), now)
            self.widened = True
            return self._search(everyone=True)
        self.step, self.todo = Step.RESERVE, list(result.assignment.items())
        return self._reserve_next()

    def _reserve_next(self) -> Action:
        if not self.todo:
            fetches = self._prefetches()
            if fetches:
                self.step = Step.PREFETCH
                return CallHosts(fetches)
            return self._place()
        vm_name, node = self.todo[0]
        vm = self.vms[vm_name]
        return CallHost(node, self._candidate(node).addr, "host.reserve", {
            "name": domain_name(self.name, vm.name), "vcpus": vm.vcpus, "memory_mb": vm.memory_mb,
            "disk_gb": vm.disk_gb}, timeout=RESERVE_TIMEOUT)

    def _place(self) -> Action:
        self.step = Step.PLACE
        return self._write(replace(self.value, placement=dict(self.placement)))

    def _prefetches(self) -> tuple[CallHost, ...]:
        """A prefetch of each VM's image on its node, where the node lacks it."""
        return tuple(CallHost(slot.node, slot.addr, "host.prefetch",
                              {"token": self.tokens[vm], "image": self.vms[vm].image}, timeout=PREFETCH_TIMEOUT)
                     for vm, slot in self.placement.items()
                     if self.vms[vm].image != DEFAULT_IMAGE and not self._candidate(slot.node).holds_image)

    def _reserved(self, token: str) -> None:
        vm_name, node = self.todo.pop(0)
        candidate = self._candidate(node)
        self.placement[vm_name] = Slot(node, candidate.addr, candidate.site, candidate.rtt_ms,
                                       self._why(candidate, self.vms[vm_name].image != DEFAULT_IMAGE))
        self.tokens[vm_name] = token

    def _candidate(self, node: str) -> Candidate:
        return next(c for c in self.candidates if c.node == node)

    def _why(self, candidate: Candidate, image: bool) -> str:
        """Why the VM went to `candidate`, as `ve show` prints it."""
        nearer = [c.node for c in self.candidates].index(candidate.node)
        why = f"nearest with room ({candidate.describe(self.value.coordinator, image)}"
        if nearer:
            constrained = self.spec.constraints != NO_CONSTRAINTS
            why += f"; {nearer} nearer full" + (" or ruled out by constraints" if constrained else "")
        why += ")"
        return f"in site {self.spec.site}, {why}" if self.spec.site else why

    def _releases(self) -> tuple[CallHost, ...]:
        return tuple(CallHost(self.placement[vm].node, self.placement[vm].addr, "host.release", {"token": token},
                              best_effort=True) for vm, token in self.tokens.items())

    def _write(self, value: VERecord) -> Action:
        self._pending = value
        return WriteRecord(value)

    def _undo(self, cause: Refuse, now: float) -> Action:
        """Roll back: the reservations not confirmed released (else they lapse), every VM a host may have
        started undefined, then the record and its index entry removed (once the entry's add is over)."""
        self.cause = cause
        if self.indexing:
            self.step, self.indexing = Step.JOIN_TO_UNDO, False
            return Join()
        return self._roll_back(now)

    def _roll_back(self, now: float) -> Action:
        self.step = Step.UNDO
        undefine = undefines(self.value.name, self.placement) if self.confirming else ()
        self.undo = CreateRecovery(self.value, undo=self._releases() + undefine)
        self.tokens = {}
        return self._from_undo(self.undo.start(now))

    def _from_undo(self, action: Action) -> Action:
        assert self.undo is not None
        if not isinstance(action, (Done, Refuse)):
            return action
        self.notes += self.undo.notes
        told = f"creating {self.name} failed" if self.wrapped else ""
        if isinstance(action, Refuse):
            cause = f"{told} ({self.cause.reason})" if told else self.cause.reason
            return self._over(Refuse(f"{cause}; rolling it back is unfinished ({action.reason}): the next command "
                                     f"on {self.name} finishes it", self.cause.kind))
        if action.result:  # another agent finished it meanwhile: the VE runs
            return self._over(Done(self.undo.value))
        return self._over(Refuse(f"{told} and was rolled back: {self.cause.reason}" if told else self.cause.reason,
                                 self.cause.kind))

    def _over(self, action: Done | Refuse) -> Action:
        self.step = Step.OVER
        return action


class RecoveryStep(enum.Enum):
    ASK = "ask"
    UNDEFINE = "undefine"
    READ = "read"
    INDEX = "index"
    WRITE = "write"
    DELETE = "delete"
    UNINDEX = "unindex"
    OVER = "over"


class CreateRecovery:
    """Finish or undo the create that left the record `value` `creating` (the module's rule). With `undo`
    (its coordinator rolling it back), the hosts are not asked: those calls are made (releases, undefines;
    only the undefines must succeed), then the record is removed. Ends with `Done(True)` (the VE runs),
    `Done(False)` (it is gone) or `Refuse`, the record left in place. `value`: the record as last read or
    written; `notes`: an index entry not removed, for the caller to log."""

    def __init__(self, value: VERecord, undo: tuple[CallHost, ...] | None = None) -> None:
        assert value.state == "creating", "a recovery is made for a create left unfinished"
        self.value = value
        self.name = value.name
        self.undoing = undo is not None
        self.calls = undo if undo is not None else undefines(self.name, value.placement)
        self.todo = [] if self.undoing else sorted(value.placement)
        self.forward = False
        self.step = RecoveryStep.ASK
        self.notes: list[str] = []
        self._pending = value

    def start(self, now: float) -> Action:
        return self._ask_next()

    def on(self, observation: Observation, now: float) -> Action:
        S = RecoveryStep
        match self.step, observation:
            case S.ASK, Probed(holds=None, reason=reason):
                return self._over(Refuse(reason))
            case S.ASK, Probed(holds=True):
                self.todo.pop(0)
                return self._ask_next()
            case S.ASK, Probed(holds=False):
                return self._undefine()
            case S.UNDEFINE, HostsAnswered(answers=answers):
                failed = [f"{call.args['name']} on {a.reason}" for call, a in zip(self.calls, answers, strict=True)
                          if isinstance(a, HostFailed) and call.method == "host.vm.undefine"]
                if failed:
                    return self._over(Refuse(f"cannot undefine {'; '.join(failed)}"))
                return self._read()
            case S.READ, RecordRead(value=None):
                return self._over(Done(False))  # removed meanwhile
            case S.READ, RecordRead(value=VERecord() as fresh):
                return self._read_again(fresh)
            case S.INDEX, Indexed():
                self.step = S.WRITE
                return WriteRecord(self._pending)
            case S.WRITE, RecordWritten():
                self.value = self._pending
                return self._over(Done(True))
            case S.DELETE, RecordWritten():
                self.step = S.UNINDEX
                return RemoveFromIndex(self.name, self.value.uid)
            case S.UNINDEX, Indexed() | DirectoryFailed():
                if isinstance(observation, DirectoryFailed):
                    self.notes.append(f"could not remove VE {self.name} from the index yet: {observation.reason}")
                return self._over(Done(False))
            case S.READ | S.INDEX | S.WRITE | S.DELETE, DirectoryFailed(reason=reason, kind=kind):
                return self._over(Refuse(reason, kind))
        raise UnexpectedObservation(self, self.step, observation)

    def _ask_next(self) -> Action:
        if self.todo:
            vm = self.todo[0]
            return probe(self.value.placement[vm], domain_name(self.name, vm))
        if not self.undoing and placed(self.value):
            self.forward = True  # every VM is held where the record says
            return self._read()
        return self._undefine()

    def _undefine(self) -> Action:
        if not self.calls:
            return self._read()
        self.step = RecoveryStep.UNDEFINE
        return CallHosts(self.calls)

    def _read(self) -> Action:
        self.step = RecoveryStep.READ
        return ReadRecord()

    def _read_again(self, fresh: VERecord) -> Action:
        """Finish or remove the record, if it is still this create's."""
        if fresh.uid != self.value.uid:
            return self._over(Done(False))  # removed, and the name created again
        self.value = fresh
        if fresh.state != "creating":
            return self._over(Done(True))  # another agent finished it
        if self.forward:
            self.step = RecoveryStep.INDEX
            self._pending = replace(fresh, state="running")
            return AddToIndex(self.name, fresh.owner, fresh.uid)
        self.step = RecoveryStep.DELETE
        return DeleteRecord()

    def _over(self, action: Done | Refuse) -> Action:
        self.step = RecoveryStep.OVER
        return action


def placed(value: VERecord) -> bool:
    """Whether the record holds the placement: a slot for every VM of its spec."""
    return set(value.placement) == {vm.name for vm in value.spec.vms}


def undefines(name: str, placement: Mapping[str, Slot]) -> tuple[CallHost, ...]:
    """Undefine every VM of `placement` on its host (best effort: the caller reads the answers)."""
    return tuple(replace(vm_action(slot, domain_name(name, vm), "host.vm.undefine"), best_effort=True)
                 for vm, slot in sorted(placement.items()))
