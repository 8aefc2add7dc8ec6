"""Failover as a transaction (discovery.ve.failovers), on the in-memory world (discovery.ve.world): the recovery's
whole table (where the coordinator stopped × forced or not × who answers), the coordinator failing at each
step, then properties over random runs: crashes, several recoverers interleaved, reachability flapping."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from discovery.ve.failovers import VM_STATE, Failover, FailoverRecovery, Step
from discovery.ve.records import FailoverIntent, Slot, Standby, VERecord, VEState, VMState
from discovery.ve.transaction import Action, Done, Refuse
from discovery.ve.world import DIRECTORY, Host, World, coordinate_then_interleave, label, record_of, run

VE, VM, DOMAIN = "fo", "x", "fo:x"
OLD, NEW = "old", "new"
STANDBY = Standby(NEW, "new:1", "lyon", 1.0)


def record(ve_state: VEState = "running", intent: FailoverIntent | None = None) -> VERecord:
    slot = Slot(OLD, "old:1", "rennes", 1.0, "created", failing_over=intent)
    return record_of(VE, {VM: slot}, ve_state, standbys={VM: (STANDBY,)})


def intent(forced: bool, state: VMState = "running") -> FailoverIntent:
    why = f"forced while {OLD} was alive" if forced else f"{OLD} does not answer"
    return FailoverIntent(NEW, "new:1", "lyon", OLD, why, state, "n3", 0.0)


def world(value: VERecord, old: str | None, promoted: bool, forced: bool) -> World:
    """The old host holds the VM in state `old` (None: not at all); the new node its standby, or (promoted) the
    domain, running. A failover that is not forced happens because the old host is down."""
    hosts = {OLD: Host({DOMAIN: old} if old else {}), NEW: Host({DOMAIN: "running"} if promoted else {},
                                                               standbys=set() if promoted else {DOMAIN})}
    w = World(hosts, value)
    if not forced:
        w.crash(OLD)
    return w


def failover(value: VERecord, forced: bool) -> Failover:
    return Failover(value, VM, DOMAIN, STANDBY, None if forced else f"{OLD} does not answer", "n3", 3.0)


def recovery(w: World) -> FailoverRecovery | None:
    assert w.record is not None
    return FailoverRecovery(w.record, VM, DOMAIN, 3.0) if w.record.placement[VM].failing_over else None


def ending(end: Action) -> str:
    if isinstance(end, Done):
        return "forward" if end.result else "undone"
    assert isinstance(end, Refuse)
    return f"stopped: {end.reason}"


def settled(w: World) -> str:
    """After everything: the record names one node, with no intent; that node holds the domain, and no
    other node runs it."""
    assert w.record is not None
    slot = w.record.placement[VM]
    assert slot.failing_over is None and slot.node in w.holders(DOMAIN), (slot, w.holders(DOMAIN))
    assert set(w.running(DOMAIN)) <= {slot.node}
    return slot.node


# --------------------------------------------------------------------------------------------------------
# Recovery: the whole table. Where the coordinator stopped: after writing the intent, after switching the
# old copy off (forced only), after the promotion. Who answers: the old host (O), the new node (N), the
# directory (D). The old host's answer never changes the decision: it is tidied at best.

STAGES = {  # stage: (the old copy's state if forced, whether the standby was promoted)
    "intent": ("running", False), "switched off": ("shutoff", False), "promoted": ("shutoff", True)}
TABLE = {
    # (promoted, N answers, D answers): (actions, end)
    (False, False, False): ("probe new", "stopped: new cannot be reached"),
    (False, False, True): ("probe new", "stopped: new cannot be reached"),
    (True, False, False): ("probe new", "stopped: new cannot be reached"),
    (True, False, True): ("probe new", "stopped: new cannot be reached"),
    (False, True, False): ("probe new, vm settle old, read", "stopped: no replica answered"),
    (False, True, True): ("probe new, vm settle old, read, write", "undone"),
    (True, True, False): ("probe new, promote new, vm undefine old, read", "stopped: no replica answered"),
    (True, True, True): ("probe new, promote new, vm undefine old, read, write", "forward"),
}
CASES = [(stage, forced, "".join(answers)) for stage in STAGES for forced in (True, False)
         for n in range(4) for answers in itertools.combinations("OND", n) if forced or stage != "switched off"]


@pytest.mark.parametrize("stage, forced, answers", CASES)
def test_recovery_table(stage: str, forced: bool, answers: str) -> None:
    old_state, promoted = STAGES[stage]
    w = world(record(intent=intent(forced)), old_state, promoted, forced)
    w.down = {n for letter, n in zip("OND", (OLD, NEW, DIRECTORY), strict=True) if letter not in answers}
    actions, end = TABLE[promoted, "N" in answers, "D" in answers]
    outcome = FailoverRecovery(w.record, VM, DOMAIN, 3.0)
    result = run(outcome, w)
    assert ", ".join(w.trace) == actions
    kind, _, why = end.partition(": ")
    assert ending(result).startswith(kind) and why in ending(result)
    assert w.violations == []
    # the rule: forward iff the new node holds the domain; the old copy removed only then; a new node that
    # does not answer stops recovery before anything changes
    assert ("vm undefine old" in w.trace) == (promoted and "N" in answers)
    if "N" not in answers:
        assert w.trace == ["probe new"]
    if kind in ("forward", "undone"):
        node = settled(w)
        assert node == (NEW if promoted else OLD)
        if promoted:
            assert w.holders(DOMAIN) == ({NEW: "running"} if "O" in answers else {OLD: "shutoff", NEW: "running"})
            assert w.record.standbys == {}  # its only copy became the VM
        else:
            assert w.holders(DOMAIN)[OLD] == ("running" if "O" in answers else old_state if forced else "shutoff")
            assert w.hosts[NEW].standbys == {DOMAIN} and w.record.standbys[VM] == (STANDBY,)
    else:  # stopped: the next attempt, everyone answering, ends as the table says
        w.down.clear()
        assert ending(run(FailoverRecovery(w.record, VM, DOMAIN, 3.0), w)) == (
            "forward" if promoted else "undone")
        assert settled(w) == (NEW if promoted else OLD) and w.violations == []


# --------------------------------------------------------------------------------------------------------
# The coordinator


@pytest.mark.parametrize("forced, actions", [
    (False, "write, pause failover, promote new, vm undefine old, read, write"),
    (True, "write, vm destroy old, pause failover, promote new, vm undefine old, read, write"),
])
@pytest.mark.parametrize("ve_state", list(VM_STATE))
def test_a_failover_step_by_step(forced: bool, actions: str, ve_state: str) -> None:
    w = world(record(ve_state), "running", False, forced)
    core = failover(w.record, forced)
    assert run(core, w) == Done(True)
    assert ", ".join(w.trace) == actions and w.violations == []
    assert settled(w) == NEW and w.hosts[NEW].domains == {DOMAIN: VM_STATE[ve_state]}
    assert w.record.placement[VM] == Slot(NEW, "new:1", "lyon", 3.0, f"failed over from old ({intent(forced).why})")
    assert w.record.standbys == {} and core.value == w.record and core.step is Step.OVER
    if forced:
        assert w.holders(DOMAIN) == {NEW: VM_STATE[ve_state]}  # the old copy undefined
    else:
        assert w.hosts[OLD].domains == {DOMAIN: "shutoff"}  # down: its Fencing removes it once back


UNDONE = "undone, it stays on old"


@pytest.mark.parametrize("forced, failing, fault, end", [
    (False, "write", "unreachable", "write reached 0 of 3 replicas"),
    (True, "vm destroy old", "unreachable", UNDONE),
    (True, "vm destroy old", "lost", UNDONE),  # switched off, then back on
    (False, "promote new", "unreachable", UNDONE),
    (True, "promote new", "unreachable", UNDONE),
    (False, "promote new", "lost", "done"),  # promoted after all
    (True, "promote new", "lost", "done"),
    (False, "probe new", "unreachable", "is left unfinished"),
    (True, "vm undefine old", "unreachable", "done"),  # tidying is best effort
    (False, "read", "unreachable", "no replica answered"),
    (False, "write #2", "unreachable", "write reached 0 of 3 replicas"),
])
def test_a_failover_that_fails_at_each_step(forced: bool, failing: str, fault: str, end: str) -> None:
    w = world(record(), "running", False, forced)
    faults = {failing: fault}
    if failing == "probe new":
        faults = {"promote new": "unreachable", "probe new": "unreachable"}
    outcome = run(failover(w.record, forced), w, faults)
    assert w.violations == [] and failing.split(" #")[0] in w.trace
    if end == "done":
        assert outcome == Done(True) and settled(w) == NEW
    else:
        assert isinstance(outcome, Refuse) and end in outcome.reason, outcome.reason
        if end == UNDONE:
            assert settled(w) == OLD and w.hosts[NEW].standbys == {DOMAIN}
            assert w.holders(DOMAIN)[OLD] == ("running" if forced else "shutoff")
    if (core := recovery(w)) is not None:  # the next attempt, everyone answering
        w.down.clear()
        assert isinstance(run(core, w), Done)
    settled(w)
    assert w.violations == []


# --------------------------------------------------------------------------------------------------------
# Properties over random runs

FAULTS = st.sampled_from([None] * 24 + ["unreachable", "lost"])


@st.composite
def schedules(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "forced": draw(st.booleans()),
        "ve_state": draw(st.sampled_from(list(VM_STATE))),
        "faults": draw(st.lists(FAULTS, max_size=8)),
        "crash": draw(st.sampled_from([None, None, "crash"]).flatmap(
            lambda c: st.none() if c is None else st.tuples(st.integers(0, 6), st.booleans()))),
        "recoverers": draw(st.integers(0, 3)),
        "steps": draw(st.lists(st.tuples(st.integers(0, 3), st.sampled_from([None] * 16 + [OLD, NEW, DIRECTORY]),
                                         FAULTS), min_size=10, max_size=60)),
        "conditional": draw(st.booleans()),  # the directory's writes: compare-and-set, or the last one wins
        "deaths": draw(st.lists(st.integers(0, 8), min_size=3, max_size=3)),
    }


@settings(max_examples=600, deadline=None)
@given(schedules())
def test_failovers_crashes_and_recoverers_in_any_interleaving(s: dict[str, Any]) -> None:
    """A coordinator whose calls fail at random and which may die at any step, then recoverers interleaved
    at random (the coordinator too, once it has promoted or failed) while nodes and the directory come and
    go, then the next command with everyone answering: the VM never runs at two places, is never held by
    none of the nodes its record names, and ends where its record says, with no intent left; where the
    coordinator reported a failover, it runs on the new node (in its VE's state); where it reported it
    undone, the standby is still a standby."""
    state = VM_STATE[s["ve_state"]]
    w = world(record(s["ve_state"]), state, False, s["forced"])
    w.conditional, w.seen[0] = s["conditional"], w.version
    coordinator = failover(w.record, s["forced"])
    action: Action = coordinator.start(0.0)

    def working(c) -> bool:  # the coordinator's own steps
        return bool(c.step in (Step.INTENT, Step.SWITCH_OFF, Step.PAUSE, Step.PROMOTE))

    outcome, crashed, ended = coordinate_then_interleave(w, coordinator, action, working, s["crash"], s["faults"],
                                                         s["recoverers"], s["steps"], s["deaths"], recovery)
    if crashed:
        event("coordinator: crashed")
    else:
        undone = isinstance(outcome, Refuse) and UNDONE in outcome.reason
        event(f"coordinator: {'undone' if undone else ending(outcome).split(':')[0]}")
    w.down.clear()
    if (core := recovery(w)) is not None:
        event("left for the next command")
        assert isinstance(run(core, w), Done), w.trace
    assert w.violations == []
    node = settled(w)
    if node == NEW:
        assert w.holders(DOMAIN)[NEW] == state and DOMAIN not in w.hosts[NEW].standbys
        assert w.holders(DOMAIN).get(OLD, "shutoff") == "shutoff"  # gone, or held off until fenced
    else:
        assert DOMAIN in w.hosts[NEW].standbys and DOMAIN not in w.hosts[NEW].domains
    if not crashed and outcome == Done(True):
        assert node == NEW
    if not crashed and isinstance(outcome, Refuse) and UNDONE in outcome.reason:
        assert node == OLD


def test_the_labels_of_a_failover() -> None:
    core = failover(record(), True)
    assert label(core.start(0.0)) == "write"
