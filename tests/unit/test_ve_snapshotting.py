"""Snapshots as a transaction (discovery.ve.snapshotting), on the in-memory world (discovery.ve.world): the
finish's whole table (where the coordinator stopped × who answers), the coordinator failing at each step,
then properties over random runs: crashes, several finishers interleaved, reachability flapping; and the
restore's table (who answers × a host missing the snapshot) and retries."""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from discovery.ve.records import Slot, SnapshotEntry, SnapshotMarker, SnapshotVM, VERecord
from discovery.ve.snapshotting import Snapshot, SnapshotFinish, Step, delete_snapshot, restore
from discovery.ve.transaction import Action, Done, Refuse
from discovery.ve.world import DIRECTORY, Host, World, coordinate_then_interleave, label, record_of, run

VE = "snap"
STATES = {"a": "running", "b": "running", "c": "shutoff", "d": "paused"}  # a, c on h1; b, d on h2
HOST_OF = {"a": "h1", "b": "h2", "c": "h1", "d": "h2"}
DOMAINS = {vm: f"{VE}:{vm}" for vm in STATES}


def record(**extra: Any) -> VERecord:
    placement = {vm: Slot(node, f"{node}:1", "rennes", 1.0, "created") for vm, node in HOST_OF.items()}
    return record_of(VE, placement, **extra)


def world(value: VERecord, states: dict[str, str] | None = None) -> World:
    states = states or STATES
    hosts = {h: Host({DOMAINS[vm]: states[vm] for vm, node in HOST_OF.items() if node == h}) for h in ("h1", "h2")}
    return World(hosts, value)


def snapshot(value: VERecord, tag: str = "t1") -> Snapshot:
    return Snapshot(value, tag, DOMAINS, "n3")


def finisher(w: World) -> SnapshotFinish | None:
    assert w.record is not None
    return SnapshotFinish(w.record, DOMAINS) if w.record.snapshotting is not None else None


def states(w: World) -> dict[str, str]:
    return {vm: w.holders(DOMAINS[vm])[HOST_OF[vm]] for vm in STATES}


def stored(w: World, tag: str = "t1") -> set[str]:
    return {vm for vm in STATES if tag in w.hosts[HOST_OF[vm]].snapshots.get(DOMAINS[vm], {})}


MARKER = SnapshotMarker("t1", ("a", "b"), "n3", 0.0)


# --------------------------------------------------------------------------------------------------------
# The finish: the whole table. Where the coordinator stopped: after the marker, after pausing a, after
# pausing both, after storing every VM's snapshot. Who answers: h1, h2, the directory (1, 2, D).

STAGES = {"marked": ({}, set()), "a paused": ({"a": "paused"}, set()),
          "paused": ({"a": "paused", "b": "paused"}, set()), "stored": ({"a": "paused", "b": "paused"}, set(STATES))}
TABLE = [
    # answers (1 2 D, * either)   actions                                        how it ends
    ("0**", "vm settle h1",                                 "stopped: h1: unreachable"),
    ("10*", "vm settle h1, vm settle h2",                   "stopped: h2: unreachable"),
    ("110", "vm settle h1, vm settle h2, read",             "stopped: no replica answered"),
    ("111", "vm settle h1, vm settle h2, read, write",      "done"),
]


@pytest.mark.parametrize("answers", ["".join(c) for n in range(4) for c in itertools.combinations("12D", n)])
@pytest.mark.parametrize("stage", list(STAGES))
def test_finish_table(stage: str, answers: str) -> None:
    rows = [r for r in TABLE if all(w == "*" or (w == "1") == (who in answers)
                                    for who, w in zip("12D", r[0], strict=True))]
    assert len(rows) == 1
    _, actions, end = rows[0]
    changed, tags = STAGES[stage]
    w = world(record(snapshotting=MARKER), {**STATES, **changed})
    for vm in tags:
        w.hosts[HOST_OF[vm]].snapshots[DOMAINS[vm]] = {"t1": "running"}
    w.down = {n for letter, n in zip("12D", ("h1", "h2", DIRECTORY), strict=True) if letter not in answers}
    outcome = run(SnapshotFinish(w.record, DOMAINS), w)
    assert ", ".join(w.trace) == actions and w.violations == []
    if end == "done":
        assert outcome == Done(True) and w.record.snapshotting is None and states(w) == STATES
        assert w.record.snapshots == ()  # a finish found behind never lists the snapshot
    else:
        assert isinstance(outcome, Refuse) and end.removeprefix("stopped: ") in outcome.reason
        assert w.record.snapshotting == MARKER  # the marker stays until every paused VM runs again
        w.down.clear()  # the next attempt
        assert run(SnapshotFinish(w.record, DOMAINS), w) == Done(True) and states(w) == STATES
    # the VMs the snapshot did not pause are never touched
    assert all(not a.startswith("vm settle") or a in ("vm settle h1", "vm settle h2") for a in w.trace)
    assert states(w)["c"] == "shutoff" and states(w)["d"] == "paused"


def test_a_finish_leaves_a_marker_another_agent_changed_alone() -> None:
    w = world(record(snapshotting=MARKER))
    core = SnapshotFinish(w.record, DOMAINS)
    action = core.start(0.0)
    while label(action) != "read":
        action = core.on(w.perform(action), 0.0)
    w.record = record(snapshots=(SnapshotEntry("t1", 1.0, "running", {}),))  # finished by someone else
    assert core.on(w.perform(action), 1.0) == Done(False) and core.value == w.record


# --------------------------------------------------------------------------------------------------------
# The coordinator


def test_a_snapshot_step_by_step() -> None:
    w = world(record())
    core = snapshot(w.record)
    outcome = run(core, w)
    assert ", ".join(w.trace) == (
        "vm info h1, vm info h2, vm info h1, vm info h2, write, vm suspend h1, vm suspend h2, pause snapshot, "
        "snapshot h1, snapshot h2, snapshot h1, snapshot h2, vm settle h1, vm settle h2, read, write")
    entry = SnapshotEntry("t1", 12.0, "running",  # when the last store answered
                          {vm: SnapshotVM(HOST_OF[vm], state) for vm, state in STATES.items()})
    assert outcome == Done(entry) and w.record == record(snapshots=(entry,)) and core.value == w.record
    assert states(w) == STATES and stored(w) == set(STATES) and w.violations == []
    assert isinstance(run(snapshot(w.record), w), Refuse)  # the tag is taken now
    again = snapshot(record(snapshots=(entry,)))
    assert again.start(0.0) == Refuse("VE 'snap' already has a snapshot 't1'", "conflict") and again.step is Step.OVER


@pytest.mark.parametrize("failing, fault, end", [
    ("vm info h2", "unreachable", "h2: unreachable"),  # nothing changed
    ("write", "unreachable", "write reached 0 of 3 replicas"),
    ("write", "lost", "write reached 1 of 3 replicas"),  # the marker landed: the next command finishes
    ("vm suspend h2", "unreachable", "snapshot t1 of snap failed: h2: unreachable"),
    ("vm suspend h2", "lost", "snapshot t1 of snap failed: h2: connection lost"),
    ("snapshot h1 #2", "unreachable", "snapshot t1 of snap failed: h1: unreachable"),
    ("snapshot h2 #2", "lost", "snapshot t1 of snap failed"),  # stored, but not known to be: not listed
    ("vm settle h2", "unreachable", "h2: unreachable"),  # the marker stays: the next command resumes b
    ("read", "unreachable", "no replica answered"),
    ("write #2", "unreachable", "write reached 0 of 3 replicas"),
])
def test_a_snapshot_that_fails_at_each_step(failing: str, fault: str, end: str) -> None:
    w = world(record())
    outcome = run(snapshot(w.record), w, {failing: fault})
    assert isinstance(outcome, Refuse) and end in outcome.reason, outcome.reason
    assert failing.split(" #")[0] in w.trace and w.violations == []
    if (core := finisher(w)) is not None:  # the next command
        assert run(core, w) == Done(True)
    assert states(w) == STATES and w.record.snapshotting is None
    assert w.record.snapshots == ()


def test_a_snapshot_whose_vms_another_agent_resumed_first_is_not_reported_taken() -> None:
    """Found by the property below: an agent that took the coordinator for gone finishes its marker (without
    the entry, which it cannot know) while the coordinator finishes too; the coordinator then finds the
    marker gone, and must not report a snapshot the record does not list."""
    w = world(record())
    core = snapshot(w.record)
    action = core.start(0.0)
    while core.step is not Step.FINISHING:
        action = core.on(w.perform(action), 1.0)
    other = finisher(w)
    assert other is not None and run(other, w) == Done(True)
    while not isinstance(action, (Done, Refuse)):
        action = core.on(w.perform(action), 2.0)
    assert isinstance(action, Refuse) and "was not recorded: another agent finished it first" in action.reason
    assert w.record.snapshots == () and states(w) == STATES


# --------------------------------------------------------------------------------------------------------
# Properties over random runs

FAULTS = st.sampled_from([None] * 24 + ["unreachable", "lost"])


@st.composite
def schedules(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "states": {vm: draw(st.sampled_from(["running", "paused", "shutoff"])) for vm in STATES},
        "faults": draw(st.lists(FAULTS, max_size=16)),
        "crash": draw(st.sampled_from([None, None, "crash"]).flatmap(
            lambda c: st.none() if c is None else st.tuples(st.integers(0, 16), st.booleans()))),
        "finishers": draw(st.integers(0, 3)),
        "steps": draw(st.lists(st.tuples(st.integers(0, 3), st.sampled_from([None] * 16 + ["h1", "h2", DIRECTORY]),
                                         FAULTS), min_size=10, max_size=60)),
        "conditional": draw(st.booleans()),  # the directory's writes: compare-and-set, or the last one wins
        "deaths": draw(st.lists(st.integers(0, 8), min_size=3, max_size=3)),
    }


@settings(max_examples=400, deadline=None)
@given(schedules())
def test_snapshots_crashes_and_finishers_in_any_interleaving(s: dict[str, Any]) -> None:
    """A coordinator whose calls fail at random and which may die at any step, then agents finishing what its
    marker says (and the coordinator, once it is finishing) interleaved while hosts and the directory come
    and go, then the next command: every VM ends in the state it had, no marker is left, and a listed
    snapshot is stored by every VM's host. What the coordinator reported done is listed if the directory's
    writes are conditional; with Kademlia's (the last write wins), a finisher that took a live coordinator for
    gone may overwrite its entry, a lost update that conditional writes close."""
    w = world(record(), s["states"])
    w.conditional, w.seen[0] = s["conditional"], w.version
    coordinator = snapshot(w.record)
    action: Action = coordinator.start(0.0)

    def working(c) -> bool:  # the coordinator's own steps
        return bool(c.step is not Step.FINISHING)

    outcome, crashed, ended = coordinate_then_interleave(w, coordinator, action, working, s["crash"], s["faults"],
                                                         s["finishers"], s["steps"], s["deaths"], finisher)
    event(f"coordinator: {'crashed' if crashed else 'done' if isinstance(outcome, Done) else 'refused'}")
    w.down.clear()
    if (core := finisher(w)) is not None:
        event("left for the next command")
        assert run(core, w) == Done(True)
    assert w.violations == [] and w.record.snapshotting is None
    assert states(w) == s["states"]
    listed = w.record.snapshots
    assert len(listed) <= 1 and (not listed or stored(w) == set(STATES))
    if not crashed and isinstance(outcome, Done) and s["conditional"]:
        assert [e.tag for e in listed] == ["t1"]
    if not crashed and isinstance(outcome, Refuse) and "failed" in outcome.reason:
        assert listed == ()


# --------------------------------------------------------------------------------------------------------
# Restore and snapshot delete: every host tried in VM order (a, c on h1; b, d on h2), the record changed only
# once every host has done its part.

ALL_DOWN = "restoring snap to t1 failed for " + "; ".join(f"{vm}: {HOST_OF[vm]}: unreachable" for vm in "abcd")
RESTORE_TABLE = [
    # answers (1 2 D, * either)   how it ends
    ("00*", "refused: " + ALL_DOWN),
    ("01*", "refused: restoring snap to t1 failed for a: h1: unreachable; c: h1: unreachable"),
    ("10*", "refused: restoring snap to t1 failed for b: h2: unreachable; d: h2: unreachable"),
    ("110", "refused: write reached 0 of 3 replicas"),
    ("111", "done"),
]
TAKEN = SnapshotEntry("t1", 1.0, "running", {})


def stopped_with_snapshot() -> World:
    """The VE stopped (every VM off) after snapshot t1 was taken with its VMs in STATES."""
    w = world(record(state="stopped", snapshots=(TAKEN,)), dict.fromkeys(STATES, "shutoff"))
    for vm, state in STATES.items():
        w.hosts[HOST_OF[vm]].snapshots[DOMAINS[vm]] = {"t1": state}
    return w


@pytest.mark.parametrize("answers", ["".join(c) for n in range(4) for c in itertools.combinations("12D", n)])
def test_restore_table(answers: str) -> None:
    rows = [r for r in RESTORE_TABLE if all(w == "*" or (w == "1") == (who in answers)
                                            for who, w in zip("12D", r[0], strict=True))]
    assert len(rows) == 1
    end = rows[0][1]
    w = stopped_with_snapshot()
    before = w.record
    w.down = {n for letter, n in zip("12D", ("h1", "h2", DIRECTORY), strict=True) if letter not in answers}
    outcome = run(restore(before, "t1", DOMAINS), w)
    restores = "restore h1, restore h2, restore h1, restore h2"
    assert ", ".join(w.trace) == restores + ("" if end.startswith("refused: restoring") else ", write")
    if end == "done":
        assert outcome == Done(w.record) and w.record == replace(before, state="running") and states(w) == STATES
        return
    assert outcome == Refuse(end.removeprefix("refused: ")) and w.record == before  # the record as it was
    w.down.clear()  # the next attempt finishes the job
    assert run(restore(before, "t1", DOMAINS), w) == Done(w.record) and states(w) == STATES
    assert w.record.state == "running"


def test_a_restore_to_an_unknown_tag_touches_nothing() -> None:
    w = stopped_with_snapshot()
    outcome = run(restore(w.record, "t9", DOMAINS), w)
    assert outcome == Refuse("VE 'snap' has no snapshot 't9' (snapshots: t1)", "not_found") and w.trace == []


def test_a_host_without_the_snapshot_fails_the_restore_and_the_record_waits() -> None:
    w = stopped_with_snapshot()
    del w.hosts["h2"].snapshots[DOMAINS["d"]]
    before = w.record
    outcome = run(restore(before, "t1", DOMAINS), w)
    assert isinstance(outcome, Refuse) and outcome.reason.endswith("d: h2: no snapshot t1 of snap:d on this node")
    assert w.record == before and "write" not in w.trace


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sets(st.sampled_from(["h1", "h2", DIRECTORY])), min_size=1, max_size=5))
def test_restores_retried_under_any_reachability_end_restored_and_never_claim_it_early(downs: list[set[str]]) -> None:
    w = stopped_with_snapshot()
    for down in [*downs, set()]:
        w.down, before = down, w.record
        outcome = run(restore(before, "t1", DOMAINS), w)
        if isinstance(outcome, Done):
            assert states(w) == STATES and w.record == replace(before, state="running")
        else:
            assert w.record == before  # the record says restored only once every VM is
    assert isinstance(outcome, Done)


def test_a_snapshot_delete_forgets_the_tag_on_every_host_before_the_record_does() -> None:
    w = stopped_with_snapshot()
    before = w.record
    w.down = {"h2"}
    outcome = run(delete_snapshot(before, "t1", DOMAINS), w)
    assert outcome == Refuse("deleting snapshot t1 of snap failed for b: h2: unreachable; d: h2: unreachable")
    assert w.record == before and stored(w) == {"b", "d"}  # still listed: the retry finishes the job
    w.down.clear()
    assert run(delete_snapshot(before, "t1", DOMAINS), w) == Done(w.record)  # a, c: nothing left, fine
    assert w.record == replace(before, snapshots=()) and stored(w) == set()
    assert run(delete_snapshot(w.record, "t1", DOMAINS), w) == Refuse(
        "VE 'snap' has no snapshot 't1' (it has none)", "not_found")
