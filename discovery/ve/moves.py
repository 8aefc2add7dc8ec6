"""Relocating one VM, as a sans-IO transaction: `Move` (its coordinator's side) and `MoveRecovery` (anyone
finishing or undoing a move left unfinished). `discovery.ve.relocation` drives them over RPC.

Why a state machine: a move interleaves RPCs to two hosts with writes to the VE record, and a crash or a
failure may stop it after any of them. Here its logic is fed observations and returns actions
(`discovery.ve.transaction`), so every combination of where it stopped, who holds the domain and who
answers is tested without a process (tests/unit/test_ve_moves.py). It must never touch a socket, a clock or
trio.

**The log is the record.** Before any host is touched the VM's slot gets `moving_to`, a
`discovery.ve.records.MoveIntent` (target node, addr, site, rtt_ms, why, phase, the VM's state: running,
paused or shutoff, coordinator, since).

States of a `Move`::

    INSPECT ── source's info ── bad method, or not settled ──► refused (nothing written)
       │ fine
    INTENT: write moving_to {phase prepare} ──── directory fails ──► refused (nothing else changed)
       │ written; from here every step up to STARTED runs within `limit` seconds
    RESERVE (target host.reserve) ──► two ways, chosen by the answers of both ends and `method`:
       ├─ live:        INCOMING (target) ─► PREPARED (test pause) ─► MIGRATE (source) ─► SETTLE (target) ─┐
       └─ carry, ship: EXPORT + freeze (source) ─► PREPARED (test pause) ─► CONFIRM (target) ─────────────┤
    any of those fails or outlasts the limit ──► RELEASE the reservation (best effort) ─► RECOVERING      │
       (a `MoveRecovery`): went forward ─► done; undone ─► refused, "rolled back";                        │
       stopped ─► refused, "left unfinished" (the intent stays)                                           │
    STARTED: write moving_to {phase started} ◄────────────────────────────────────────────────────────────┘
       ─► STARTED (test pause) ─► UNDEFINE (source's frozen copy) ── fails ──► refused, "retry to finish"
       ─► ARRIVED: write the slot = the target (+ how and how long) ─► done

States of a `MoveRecovery`, from the intent in the record (its phase does not matter)::

    ASK_TARGET ── unknown ──► stopped (nothing changed)
       │ holds / does not hold
    ASK_SOURCE ── unknown ──► stopped (nothing changed)
       ├─ the target holds: SETTLE the target to the recorded state ─► UNDEFINE the source's copy ─┐
       ├─ only the source holds: UNDEFINE the target's late copy ─► SETTLE the source ────────────┤
       └─ neither holds ──► stopped                                                                 │
    READ the record ◄─────────────────────────────────────────────────────────────────────────────────┘
       ── gone ──► refused (not found); its intent changed ──► done (another agent settled it)
       ── else WRITE: the slot = the target (forward) or the source without the intent (undone) ─► done

**The rule** (a property of `MoveRecovery`, tested over its whole table and over interleavings): recovery
decides from the hosts, not from the phase. Forward iff the target holds the domain (persisted there before
`host.confirm` answers; adopted after a live migration); the source's copy is removed only once the target
holds it, the target's only while the source holds it; and a host that cannot be asked stops recovery
before it changes anything, the intent left for the next attempt. Since the source's copy is frozen (a
running VM paused by `host.export`, or moved away by libvirt's migration) before the target can hold
the domain, and the target's is undefined before the source is brought back, at most one copy runs
meanwhile, and after recovery the VM is at exactly one place: the one the record names.

Two recoverers of one move decide alike and take the same idempotent steps: once no coordinator imports
the VM any more, whether the target holds it changes only by recovery, and recovery removes the target's
copy only when the target did not hold it. That "once" is the driver's to ensure: an intent is recovered
by its coordinator, or by another agent once that coordinator is abandoned (`VEService._check_abandoned`).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from discovery.ve.records import How, MoveIntent, Slot, Transfer, VERecord, steady
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
    TimedOut,
    UnexpectedObservation,
    WriteRecord,
    probe,
    vm_action,
)


class Step(enum.Enum):
    INSPECT = "inspect"
    INTENT = "intent"
    RESERVE = "reserve"
    INCOMING = "incoming"
    EXPORT = "export"
    PREPARED = "prepared"
    MIGRATE = "migrate"
    SETTLE = "settle"
    CONFIRM = "confirm"
    RELEASE = "release"
    RECOVERING = "recovering"
    STARTED = "started"
    STARTED_PAUSE = "started pause"
    UNDEFINE = "undefine"
    ARRIVED = "arrived"
    OVER = "over"


PREPARE_STEPS = frozenset({Step.RESERVE, Step.INCOMING, Step.EXPORT, Step.PREPARED, Step.MIGRATE, Step.SETTLE,
                           Step.CONFIRM})
"""The steps that run within the move's limit."""


class Move:
    """One VM's move to `target` (the VM's slot there, with why it goes there), coordinated by `coordinator`,
    from the record `value`. `need`: the VM's {vcpus, memory_mb, disk_gb}. `method`: auto, live or ship.
    `limit`: the seconds the preparation may take before the move is given up and undone.

    Ends with `Done(transfer)` (a `Transfer`; None if it went forward through recovery) or `Refuse`.
    `value` is the record as last read or written."""

    def __init__(self, value: VERecord, vm: str, domain: str, target: Slot, method: str, need: Mapping[str, int],
                 coordinator: str, limit: float) -> None:
        self.value = value
        self.vm, self.domain, self.target, self.method = vm, domain, target, method
        self.need, self.coordinator, self.limit = need, coordinator, limit
        self.name = value.name
        self.slot = value.placement[vm]
        self.step = Step.INSPECT
        self.intent: MoveIntent | None = None
        self.source: Mapping[str, Any] = {}
        self.reserved: Mapping[str, Any] = {}
        self.carried: Mapping[str, Any] = {}
        self.token: str | None = None
        self.how: How | None = None
        self.deadline = 0.0
        self.started = 0.0
        self.transfer: Transfer | None = None
        self.cause = ""
        self.recovery: MoveRecovery | None = None
        self._pending = value

    def start(self, now: float) -> Action:
        return vm_action(self.slot, self.domain, "host.vm.info")

    def on(self, observation: Observation, now: float) -> Action:
        if self.step is Step.RECOVERING:
            assert self.recovery is not None
            return self._from_recovery(self.recovery.on(observation, now))
        if self.step in PREPARE_STEPS and isinstance(observation, (HostFailed, TimedOut)):
            return self._fail(observation, now)
        match self.step, observation:
            case Step.INSPECT, HostAnswered(answer=info):
                return self._inspected(info, now)
            case Step.INSPECT, HostFailed(reason=reason):
                return self._over(Refuse(reason))
            case Step.INTENT, RecordWritten():
                self.value = self._pending
                self.deadline = now + self.limit
                self.step = Step.RESERVE
                return self._timed(CallHost(self.target.node, self.target.addr, "host.reserve", {
                    "name": self.domain, **self.need}), now)
            case Step.RESERVE, HostAnswered(answer=reserved):
                return self._reserved(reserved, now)
            case Step.INCOMING | Step.EXPORT, HostAnswered(answer=answer):
                self.carried = answer if self.step is Step.EXPORT else {}
                self.step = Step.PREPARED
                return self._timed(PauseForTest("prepared"), now)
            case Step.PREPARED, Continued():
                return self._timed(self._finish_transfer(), now)
            case Step.MIGRATE, HostAnswered():
                self.step = Step.SETTLE
                settle = vm_action(self.target, self.domain, "host.vm.settle", state=self._intent().state)
                return self._timed(settle, now)
            case Step.SETTLE | Step.CONFIRM, HostAnswered():
                assert self.how is not None, "chosen once the target has reserved"
                self.transfer = Transfer(self.how, round(now - self.started, 3))
                self.step = Step.STARTED
                started = replace(self._intent(), phase="started", since=now)
                return self._write(replace(self.slot, moving_to=started))
            case Step.RELEASE, HostAnswered() | HostFailed():
                return self._recover(now)
            case Step.INTENT | Step.STARTED | Step.ARRIVED, DirectoryFailed(reason=reason, kind=kind):
                return self._over(Refuse(reason, kind))
            case Step.STARTED, RecordWritten():
                self.value = self._pending
                self.step = Step.STARTED_PAUSE
                return PauseForTest("started")
            case Step.STARTED_PAUSE, Continued():
                self.step = Step.UNDEFINE
                return vm_action(self.slot, self.domain, "host.vm.undefine")
            case Step.UNDEFINE, HostAnswered():
                self.step = Step.ARRIVED
                return self._write(replace(arrived(self._intent()), transfer=self.transfer))
            case Step.UNDEFINE, HostFailed(reason=reason):
                return self._over(Refuse(f"{self.name}/{self.vm} runs on {self.target.node}, but its old copy "
                                         f"could not be removed yet ({reason}); retry to finish"))
            case Step.ARRIVED, RecordWritten():
                self.value = self._pending
                return self._over(Done(self.transfer))
        raise UnexpectedObservation(self, self.step, observation)

    def _inspected(self, info: Mapping[str, Any], now: float) -> Action:
        """Refuse, before anything changes, a move that cannot work; else write the intent."""
        self.source = info
        refusal, state = method_refusal(self.method, info), steady(info["state"])
        if refusal is not None or state is None:
            return self._over(Refuse(refusal or f"cannot relocate {self.name}/{self.vm}: it is {info['state']} on "
                                                f"{self.slot.node}"))
        t = self.target
        self.intent = MoveIntent(t.node, t.addr, t.site, t.rtt_ms, t.why, "prepare", state, self.coordinator, now)
        self.step = Step.INTENT
        return self._write(replace(self.slot, moving_to=self.intent))

    def _intent(self) -> MoveIntent:
        assert self.intent is not None, "the intent is written before any step that reads it"
        return self.intent

    def _reserved(self, reserved: Mapping[str, Any], now: float) -> Action:
        """The target holds the room: get the VM there, one of three ways.

        - live: both nodes run real guests on their own libvirtd, the VM is active and has no internal
          snapshots (an NBD disk copy would drop them): the target prepares an empty overlay, the source's
          daemon migrates the VM peer to peer, with the disk's own layer copied incrementally; the VM runs
          throughout but for the final switch-over, and libvirt guarantees it runs at one place only;
        - ship: real guests otherwise (stopped, with snapshots, or the embedded driver): the source stops
          the VM into a memory image, the target pulls the image and the qcow2 disk (snapshots inside)
          and restores it (save → ship → restore);
        - carry: the test driver, whose VM is its XML: the source freezes (pauses) it, the target defines
          it from the carried XML.
        `method` "auto" picks the first that works; "live" or "ship" insists (an operator measuring one,
        or avoiding a live migration's load), and a target that cannot do it fails the move (undone)."""
        self.token, self.reserved, self.started = reserved["token"], reserved, now
        backend = self.source.get("backend", "test")
        if backend != reserved.get("backend", "test"):
            return self._fail(f"cannot move a {backend} VM to a {reserved.get('backend')} node", now)
        live = bool(self.source.get("live") and reserved.get("migration_uri") and self._intent().state != "shutoff")
        if self.method == "live" and not live:
            return self._fail(f"cannot migrate it live: {self.target.node} has no libvirtd of its own", now)
        if live and self.method in ("auto", "live"):
            self.how, self.step = "live", Step.INCOMING
            return self._timed(CallHost(self.target.node, self.target.addr, "host.incoming", {
                "name": self.domain, "image": self.source.get("image"), **self.value.nic_args(self.vm)}), now)
        self.how, self.step = ("ship" if backend != "test" else "carry"), Step.EXPORT
        return self._timed(CallHost(self.slot.node, self.slot.addr, "host.export", {
            "name": self.domain, "freeze": True, "ship": self.how == "ship"}), now)

    def _finish_transfer(self) -> Action:
        """After the test pause: the source migrates the VM, or the target defines it from what was carried."""
        if self.how == "live":
            self.step = Step.MIGRATE
            return CallHost(self.slot.node, self.slot.addr, "host.migrate", {
                "name": self.domain, "uri": self.reserved["migration_uri"]})
        self.step = Step.CONFIRM
        ship = ({"ship": {"from": self.slot.addr, "image": self.carried["ship"]["image"]}}
                if self.how == "ship" else {})
        return CallHost(self.target.node, self.target.addr, "host.confirm", {
            "token": self.token, "xml": self.carried["xml"], "state": self._intent().state,
            "snapshots": self.carried["snapshots"], **ship})

    def _timed(self, action: Action, now: float) -> Action:
        """`action` within what is left of the limit; past it, the move fails."""
        if now >= self.deadline:
            return self._fail(TimedOut(), now)
        assert isinstance(action, (CallHost, PauseForTest))
        return replace(action, within=self.deadline - now)

    def _fail(self, cause: HostFailed | TimedOut | str, now: float) -> Action:
        """A preparation step failed: release the reservation, then finish or undo from the hosts."""
        if isinstance(cause, HostFailed):
            cause = cause.reason
        elif isinstance(cause, TimedOut):
            cause = f"not done within {self.limit:g} s"
        self.cause = cause
        if self.token is None:
            return self._recover(now)  # nothing reserved
        self.step = Step.RELEASE
        return CallHost(self.target.node, self.target.addr, "host.release", {"token": self.token},
                        best_effort=True)

    def _recover(self, now: float) -> Action:
        self.step = Step.RECOVERING
        self.recovery = MoveRecovery(self.value, self.vm, self.domain)
        return self._from_recovery(self.recovery.start(now))

    def _from_recovery(self, action: Action) -> Action:
        assert self.recovery is not None
        self.value = self.recovery.value
        doing = f"relocating {self.name}/{self.vm} to {self.target.node}"
        if isinstance(action, Refuse):
            return self._over(Refuse(f"{doing} failed ({self.cause}) and is left unfinished ({action.reason}); "
                                     "retry to finish or undo it"))
        if isinstance(action, Done):
            if action.result:  # the target had taken it after all
                return self._over(Done(None))
            return self._over(Refuse(f"cannot relocate {self.name}/{self.vm} to {self.target.node}: "
                                     f"{self.cause}; rolled back, it stays on {self.slot.node}"))
        return action

    def _write(self, slot: Slot) -> WriteRecord:
        self._pending = self.value.with_slot(self.vm, slot)
        return WriteRecord(self._pending)

    def _over(self, action: Done | Refuse) -> Action:
        self.step = Step.OVER
        return action


class RecoveryStep(enum.Enum):
    ASK_TARGET = "ask target"
    ASK_SOURCE = "ask source"
    SETTLE_TARGET = "settle target"
    UNDEFINE_SOURCE = "undefine source"
    UNDEFINE_TARGET = "undefine target"
    SETTLE_SOURCE = "settle source"
    READ = "read"
    WRITE = "write"
    OVER = "over"


class MoveRecovery:
    """Finish or undo the move of `vm` that the record `value` holds the intent of (see the module's rule).
    Ends with `Done(forward)` (whether the move went forward), or `Refuse` with the intent left in place
    (`not_found` if the VE was destroyed meanwhile). `value` is the record as last read or written."""

    def __init__(self, value: VERecord, vm: str, domain: str) -> None:
        self.value, self.vm, self.domain = value, vm, domain
        self.name = value.name
        self.slot = value.placement[vm]
        assert self.slot.moving_to is not None, "a recovery is made for a move left in the record"
        self.intent = self.slot.moving_to
        self.step = RecoveryStep.ASK_TARGET
        self.forward = False
        self._pending = value

    def start(self, now: float) -> Action:
        return probe(self.intent, self.domain)

    def on(self, observation: Observation, now: float) -> Action:
        S = RecoveryStep
        match self.step, observation:
            case S.ASK_TARGET | S.ASK_SOURCE, Probed(holds=None, reason=reason):
                return self._over(Refuse(reason))  # nothing changed yet
            case S.ASK_TARGET, Probed(holds=holds):
                self.forward = bool(holds)
                self.step = S.ASK_SOURCE
                return probe(self.slot, self.domain)
            case S.ASK_SOURCE, Probed() if self.forward:
                self.step = S.SETTLE_TARGET
                return vm_action(self.intent, self.domain, "host.vm.settle", state=self.intent.state)
            case S.ASK_SOURCE, Probed(holds=False):
                return self._over(Refuse(f"{self.name}/{self.vm} is held by neither {self.slot.node} nor "
                                         f"{self.intent.node}"))
            case S.ASK_SOURCE, Probed(holds=True):
                self.step = S.UNDEFINE_TARGET
                return vm_action(self.intent, self.domain, "host.vm.undefine")
            case S.SETTLE_TARGET, HostAnswered():
                self.step = S.UNDEFINE_SOURCE
                return vm_action(self.slot, self.domain, "host.vm.undefine")
            case S.UNDEFINE_TARGET, HostAnswered():
                self.step = S.SETTLE_SOURCE
                return vm_action(self.slot, self.domain, "host.vm.settle", state=self.intent.state)
            case S.UNDEFINE_SOURCE | S.SETTLE_SOURCE, HostAnswered():
                self.step = S.READ
                return ReadRecord()
            case S.SETTLE_TARGET | S.UNDEFINE_SOURCE | S.UNDEFINE_TARGET | S.SETTLE_SOURCE, HostFailed(reason=r):
                return self._over(Refuse(r))
            case S.READ, RecordRead(value=None):
                return self._over(Refuse(f"VE {self.name!r} was destroyed meanwhile", "not_found"))
            case S.READ, RecordRead(value=VERecord() as fresh):
                self.value = fresh
                slot = fresh.placement.get(self.vm)
                if slot is None or slot.moving_to != self.intent:
                    return self._over(Done(self.forward))  # another agent settled it meanwhile
                after = arrived(self.intent) if self.forward else replace(self.slot, moving_to=None)
                self._pending = fresh.with_slot(self.vm, after)
                self.step = S.WRITE
                return WriteRecord(self._pending)
            case S.WRITE, RecordWritten():
                self.value = self._pending
                return self._over(Done(self.forward))
            case S.READ | S.WRITE, DirectoryFailed(reason=reason, kind=kind):
                return self._over(Refuse(reason, kind))
        raise UnexpectedObservation(self, self.step, observation)

    def _over(self, action: Done | Refuse) -> Action:
        self.step = RecoveryStep.OVER
        return action


def method_refusal(method: str, source: Mapping[str, Any]) -> str | None:
    """Why a `method` the VM's own host says cannot work is refused, before anything changes (the target's
    side is known only once it has reserved); None if it may work."""
    if method == "live" and not source.get("live"):
        return ("cannot migrate it live: that needs real guests on per-node daemons at both ends, an active VM, "
                "and no internal snapshots")
    if method == "live" and source["state"] == "shutoff":
        return "cannot migrate it live: it is shut off"
    if method == "ship" and source.get("backend", "test") == "test":
        return "cannot ship it: a test-driver VM has no disk or memory; use --method auto"
    return None


def arrived(intent: MoveIntent) -> Slot:
    """The slot of a VM whose move to the intent's node is complete."""
    return Slot(intent.node, intent.addr, intent.site, intent.rtt_ms, intent.why)
