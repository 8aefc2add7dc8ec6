"""Taking a snapshot of a VE, as a sans-IO transaction: `Snapshot` (its coordinator's side) and
`SnapshotFinish` (running again the VMs a snapshot paused, by its coordinator or by anyone finding its marker
left behind); and restoring or deleting one, `OnEveryHost` (idempotent: no marker). `discovery.ve.snapshots` drives them
(`discovery.ve.driver`).

Why a state machine: a snapshot pauses the running VMs of a VE across hosts, has each host store its VM's
state, then runs them again; a crash or a failure between those steps must never leave a VM paused for
good, nor list a snapshot that some host lacks. Here that logic is fed observations and returns actions
(`discovery.ve.transaction`) and is tested whole (tests/unit/test_ve_snapshotting.py). It must never touch
a socket, a clock or trio.

**The log is the record.** Before any VM is paused the record gets `snapshotting`, a
`discovery.ve.records.SnapshotMarker` (tag, `paused`: the VMs that were running, coordinator, since).

States of a `Snapshot`::

    CHECK ── the tag exists ──► refused (conflict; nothing changed)
    INSPECT each VM's state (host.vm.info) ── a host fails ──► refused (nothing changed)
    MARK: write snapshotting {tag, paused: the running VMs} ── directory fails ──► refused
    SUSPEND each running VM ─► SNAPSHOT (test pause) ─► STORE each VM's state (host.snapshot)
       a suspend or a store fails ──► FINISHING without the entry ─► refused ("snapshot failed")
    FINISHING with the entry (a `SnapshotFinish`) ─► done, the entry listed; refused if another agent
       dropped the marker first (the coordinator taken for gone): the entry is not listed, so not "done"

States of a `SnapshotFinish`::

    RESUME each VM of `paused` (host.vm.settle running) ── a host fails ──► stopped (the marker stays)
    READ ── gone ──► refused (not found); the marker changed ──► done, not dropped (another agent did)
         ── else WRITE: the marker dropped, the entry listed if there is one ─► done

**The rule** (tested over the table and interleavings): the marker is dropped only once every VM it paused
runs again, so whoever reads it next (`VEService._settle`) resumes what is left; a snapshot is listed only
if every VM's host stored it, and reported taken only if listed; and resuming is idempotent, so two agents
finishing one snapshot agree.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from discovery.ve.records import SnapshotEntry, SnapshotMarker, SnapshotVM, VERecord
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
    ReadRecord,
    RecordRead,
    RecordWritten,
    Refuse,
    UnexpectedObservation,
    WriteRecord,
    vm_action,
)


class Step(enum.Enum):
    INSPECT = "inspect"
    MARK = "mark"
    SUSPEND = "suspend"
    PAUSE = "pause"
    STORE = "store"
    FINISHING = "finishing"
    OVER = "over"


class Snapshot:
    """Snapshot `tag` of every VM of the VE whose record is `value`, coordinated by `coordinator`; `domains`:
    each VM's domain. Ends with `Done(entry)` (the snapshot as the record lists it) or `Refuse`."""

    def __init__(self, value: VERecord, tag: str, domains: Mapping[str, str], coordinator: str) -> None:
        self.value, self.tag, self.domains, self.coordinator = value, tag, domains, coordinator
        self.name = value.name
        self.vms = sorted(value.placement)
        self.states: dict[str, str] = {}
        self.step = Step.INSPECT
        self.todo: list[str] = []
        self.failure = ""
        self.entry: SnapshotEntry | None = None
        self.finish: SnapshotFinish | None = None
        self._pending = value

    def start(self, now: float) -> Action:
        if any(s.tag == self.tag for s in self.value.snapshots):
            return self._over(Refuse(f"VE {self.name!r} already has a snapshot {self.tag!r}", "conflict"))
        self.todo = list(self.vms)
        return self._on_vm("host.vm.info")

    def on(self, observation: Observation, now: float) -> Action:
        if self.step is Step.FINISHING:
            assert self.finish is not None
            return self._from_finish(self.finish.on(observation, now))
        match self.step, observation:
            case Step.INSPECT, HostAnswered(answer=info):
                self.states[self.todo.pop(0)] = info["state"]
                if self.todo:
                    return self._on_vm("host.vm.info")
                paused = tuple(vm for vm in self.vms if self.states[vm] == "running")
                self._pending = replace(self.value, snapshotting=SnapshotMarker(self.tag, paused, self.coordinator,
                                                                                now))
                self.step = Step.MARK
                return WriteRecord(self._pending)
            case Step.INSPECT, HostFailed(reason=reason):
                return self._over(Refuse(reason))
            case Step.MARK, RecordWritten():
                self.value = self._pending
                assert self.value.snapshotting is not None, "the marker was just written"
                self.step, self.todo = Step.SUSPEND, list(self.value.snapshotting.paused)
                return self._suspend_next()
            case Step.MARK, DirectoryFailed(reason=reason, kind=kind):
                return self._over(Refuse(reason, kind))
            case Step.SUSPEND, HostAnswered():
                self.todo.pop(0)
                return self._suspend_next()
            case Step.PAUSE, Continued():
                self.step, self.todo = Step.STORE, list(self.vms)
                return self._store_next(now)
            case Step.STORE, HostAnswered():
                self.todo.pop(0)
                return self._store_next(now)
            case Step.SUSPEND | Step.STORE, HostFailed(reason=reason):
                self.failure = reason
                return self._finish(None, now)
        raise UnexpectedObservation(self, self.step, observation)

    def _on_vm(self, method: str, **extra: Any) -> Action:
        vm = self.todo[0]
        return vm_action(self.value.placement[vm], self.domains[vm], method, **extra)

    def _suspend_next(self) -> Action:
        if self.todo:
            return self._on_vm("host.vm.suspend")
        self.step = Step.PAUSE
        return PauseForTest("snapshot")

    def _store_next(self, now: float) -> Action:
        if self.todo:
            vm = self.todo[0]
            slot = self.value.placement[vm]
            return CallHost(slot.node, slot.addr, "host.snapshot",
                            {"name": self.domains[vm], "tag": self.tag, "state": self.states[vm]})
        return self._finish(self._entry(now), now)

    def _entry(self, now: float) -> SnapshotEntry:
        return SnapshotEntry(self.tag, now, self.value.state,
                             {vm: SnapshotVM(self.value.placement[vm].node, self.states[vm]) for vm in self.vms})

    def _finish(self, entry: SnapshotEntry | None, now: float) -> Action:
        self.entry = entry
        self.step = Step.FINISHING
        self.finish = SnapshotFinish(self.value, self.domains, entry)
        return self._from_finish(self.finish.start(now))

    def _from_finish(self, action: Action) -> Action:
        assert self.finish is not None
        self.value = self.finish.value
        if isinstance(action, Refuse):
            return self._over(action)
        if isinstance(action, Done):
            if self.failure:
                return self._over(Refuse(f"snapshot {self.tag} of {self.name} failed: {self.failure}"))
            if not action.result:  # another agent, taking this one for gone, resumed the VMs and dropped the marker
                return self._over(Refuse(f"snapshot {self.tag} of {self.name} was not recorded: another agent "
                                         "finished it first (this one was taken for gone); take it again"))
            return self._over(Done(self.entry))
        return action

    def _over(self, action: Done | Refuse) -> Action:
        self.step = Step.OVER
        return action


class FinishStep(enum.Enum):
    RESUME = "resume"
    READ = "read"
    WRITE = "write"
    OVER = "over"


class SnapshotFinish:
    """Run again the VMs the snapshot whose marker the record `value` holds paused, and drop the marker,
    listing `entry` if the snapshot succeeded. Ends with `Done(dropped)` (False if another agent had dropped
    the marker already, so the entry is not listed) or `Refuse`, the marker left in place."""

    def __init__(self, value: VERecord, domains: Mapping[str, str], entry: SnapshotEntry | None = None) -> None:
        self.value, self.domains, self.entry = value, domains, entry
        self.name = value.name
        assert value.snapshotting is not None, "a finish is made for a marker left in the record"
        self.marker = value.snapshotting
        self.todo = list(self.marker.paused)
        self.step = FinishStep.RESUME
        self._pending = value

    def start(self, now: float) -> Action:
        return self._resume_next()

    def on(self, observation: Observation, now: float) -> Action:
        S = FinishStep
        match self.step, observation:
            case S.RESUME, HostAnswered():
                self.todo.pop(0)
                return self._resume_next()
            case S.RESUME, HostFailed(reason=reason):
                return self._over(Refuse(reason))
            case S.READ, RecordRead(value=None):
                return self._over(Refuse(f"VE {self.name!r} was destroyed meanwhile", "not_found"))
            case S.READ, RecordRead(value=VERecord() as fresh):
                self.value = fresh
                if fresh.snapshotting != self.marker:
                    return self._over(Done(False))  # another agent finished it meanwhile
                listed = fresh.snapshots + ((self.entry,) if self.entry is not None else ())
                self._pending = replace(fresh, snapshotting=None, snapshots=listed)
                self.step = S.WRITE
                return WriteRecord(self._pending)
            case S.WRITE, RecordWritten():
                self.value = self._pending
                return self._over(Done(True))
            case S.READ | S.WRITE, DirectoryFailed(reason=reason, kind=kind):
                return self._over(Refuse(reason, kind))
        raise UnexpectedObservation(self, self.step, observation)

    def _resume_next(self) -> Action:
        if self.todo:
            vm = self.todo[0]
            return vm_action(self.value.placement[vm], self.domains[vm], "host.vm.settle", state="running")
        self.step = FinishStep.READ
        return ReadRecord()

    def _over(self, action: Done | Refuse) -> Action:
        self.step = FinishStep.OVER
        return action


class EveryHostStep(enum.Enum):
    CALL = "call"
    WRITE = "write"
    OVER = "over"


class OnEveryHost:
    """`method` for snapshot `tag` on the host of every VM of the VE whose record is `value`, then the record
    as `after` makes it from the snapshot's entry: `ve restore` (`restore`) and `ve snapshot-delete`
    (`delete_snapshot`). `domains`: each VM's domain; `doing`: how a failure is worded. Ends with
    `Done(record)` or `Refuse`.

    Both are idempotent, so they need no intent in the record: every host is tried, in VM order, even after
    one fails; the record changes only once every host has done its part (a failure leaves it as it was,
    the failures reported together), and running the operation again finishes the job."""

    def __init__(self, value: VERecord, tag: str, domains: Mapping[str, str], method: str, doing: str,
                 after: Callable[[VERecord, SnapshotEntry], VERecord]) -> None:
        self.value, self.tag, self.domains = value, tag, domains
        self.method, self.doing, self.after = method, doing, after
        self.todo = sorted(value.placement)
        self.failures: list[str] = []
        self.step = EveryHostStep.CALL

    def start(self, now: float) -> Action:
        if self.value.snapshot(self.tag) is None:
            return self._over(Refuse(self.value.no_snapshot(self.tag), "not_found"))
        return self._call_next()

    def on(self, observation: Observation, now: float) -> Action:
        match self.step, observation:
            case EveryHostStep.CALL, HostAnswered():
                self.todo.pop(0)
                return self._call_next()
            case EveryHostStep.CALL, HostFailed(reason=reason):
                self.failures.append(f"{self.todo.pop(0)}: {reason}")
                return self._call_next()
            case EveryHostStep.WRITE, RecordWritten():
                return self._over(Done(self.value))
            case EveryHostStep.WRITE, DirectoryFailed(reason=reason, kind=kind):
                return self._over(Refuse(reason, kind))
        raise UnexpectedObservation(self, self.step, observation)

    def _call_next(self) -> Action:
        if self.todo:
            vm = self.todo[0]
            slot = self.value.placement[vm]
            return CallHost(slot.node, slot.addr, self.method, {"name": self.domains[vm], "tag": self.tag})
        if self.failures:
            return self._over(Refuse(f"{self.doing} failed for " + "; ".join(self.failures)))
        entry = self.value.snapshot(self.tag)
        assert entry is not None, "checked at the start"
        self.value = self.after(self.value, entry)
        self.step = EveryHostStep.WRITE
        return WriteRecord(self.value)

    def _over(self, action: Done | Refuse) -> Action:
        self.step = EveryHostStep.OVER
        return action


def restore(value: VERecord, tag: str, domains: Mapping[str, str]) -> OnEveryHost:
    """Every VM back to snapshot `tag` (`host.restore`: each host re-creates its domain from what it stored),
    then the VE in the state it had then."""
    return OnEveryHost(value, tag, domains, "host.restore", f"restoring {value.name} to {tag}",
                       lambda ve, entry: replace(ve, state=entry.state))


def delete_snapshot(value: VERecord, tag: str, domains: Mapping[str, str]) -> OnEveryHost:
    """Snapshot `tag` forgotten by each VM's current host (`host.snapshot_delete`; a VM relocated since
    carried it along), then by the record. Hosts first, so that after a partial failure the tag is still
    listed and a retry finishes the job (a host with nothing left to delete answers so, which is fine)."""
    return OnEveryHost(value, tag, domains, "host.snapshot_delete", f"deleting snapshot {tag} of {value.name}",
                       lambda ve, entry: replace(ve, snapshots=tuple(s for s in ve.snapshots if s.tag != entry.tag)))
