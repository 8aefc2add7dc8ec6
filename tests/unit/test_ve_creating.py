"""Creating a VE as a transaction (discovery.ve.creating), on the in-memory world (discovery.ve.world): the
coordinator's table (each step failing each way, which host refuses or does not answer, the directory
failing), the recovery's whole table (where the coordinator stopped × who answers), then properties over
random runs: a coordinator dying at any step, several recoverers interleaved, reachability flapping.

Afterwards, always: either the VE runs, every VM defined exactly where its record says and its index entry
in place, or there is no record, no VM of it defined anywhere, and no index entry (reservations lapse)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from discovery.ve.creating import CLAIM_ATTEMPTS, Create, CreateRecovery, Step
from discovery.ve.records import Slot, VERecord
from discovery.ve.spec import Constraints, VESpec, VMSpec
from discovery.ve.transaction import (
    Action,
    AddToIndex,
    Beside,
    ClaimLost,
    ClaimRecord,
    Done,
    PauseForTest,
    ReadRecord,
    RecordRead,
    RecordWritten,
    Refuse,
)
from discovery.ve.world import DIRECTORY, Host, World, coordinate_then_interleave, label, run

VE, UID = "web", "uid1"
SPEC = VESpec(VE, (VMSpec("a", 1, 256), VMSpec("b", 1, 256)), constraints=Constraints(anti_affinity=(("a", "b"),)))
NEW = VERecord(VE, SPEC, "alice", "creating", {}, "n1", 0.0, UID)
"""The record a create claims: coordinated by n1, which is also the nearest candidate."""
DOMAINS = {"a": "web:a", "b": "web:b"}
ROLLED_BACK = "creating web failed and was rolled back: "
UNFINISHED = "rolling it back is unfinished"


def world(value: VERecord | None = None, **held: str) -> World:
    """n1, n2 (rennes) and n3 (lyon) are near (the spiral finds them), n4 (nancy) only when every member is
    asked; `held`: which VM each node holds, running."""
    hosts = {"n1": Host(), "n2": Host(), "n3": Host(site="lyon"), "n4": Host(site="nancy", near=False)}
    for node, vm in held.items():
        hosts[node].domains[DOMAINS[vm]] = "running"
    w = World(hosts, value)
    if value is not None:
        w.index[VE] = value.uid
    return w


def slot(node: str) -> Slot:
    return Slot(node, f"{node}:1", "rennes", 1.0, "nearest with room")


PLACED = replace(NEW, placement={"a": slot("n1"), "b": slot("n2")})


def outcome(w: World) -> str:
    """What the world holds of the VE, which must be one of two things: `running at <nodes>` (every VM defined
    at its slot's node only, the record running, its entry indexed) or `gone` (no record, no VM, no entry)."""
    defined = {vm: list(w.holders(domain)) for vm, domain in DOMAINS.items()}
    if w.record is None:
        assert defined == {"a": [], "b": []} and VE not in w.index, (defined, w.index)
        return "gone"
    ve = w.record
    assert ve.state == "running" and w.index.get(VE) == ve.uid, (ve.state, w.index)
    assert defined == {vm: [s.node] for vm, s in ve.placement.items()}, (defined, ve.placement)
    return "running at " + " ".join(ve.placement[vm].node for vm in sorted(ve.placement))


def recover(w: World) -> Action:
    assert w.record is not None
    return run(CreateRecovery(w.record), w)


def recoverer(w: World) -> CreateRecovery | None:
    return CreateRecovery(w.record) if w.record is not None and w.record.state == "creating" else None


# --------------------------------------------------------------------------------------------------------
# The coordinator


def test_a_create_step_by_step() -> None:
    w = world()
    end = run(Create(NEW), w)
    assert ", ".join(w.trace) == ("claim, index, search, reserve n1, reserve n2, write, pause placed, "
                                  "confirm n1 + confirm n2, pause confirmed, join, write")
    assert isinstance(end, Done) and end.result == w.record and outcome(w) == "running at n1 n2"
    assert {vm: s.why for vm, s in w.record.placement.items()} == {
        "a": "nearest with room (this node)",
        "b": "nearest with room (1.0 ms, found by spiral; 1 nearer full or ruled out by constraints)"}
    assert all(not h.reserved for h in w.hosts.values()) and w.violations == []


def test_the_placement_is_written_before_any_host_starts_a_vm_and_running_after_all_have() -> None:
    w, core = world(), Create(NEW)
    action = core.start(0.0)
    while not isinstance(action, PauseForTest):
        action = core.on(w.perform(action), 1.0)
    assert w.record == replace(PLACED, placement=core.placement) and not any(h.domains for h in w.hosts.values())
    action = core.on(w.perform(action), 1.0)
    assert label(action) == "confirm n1 + confirm n2" and core.tokens == {}  # every token sent, all at once
    core.on(w.perform(action), 2.0)
    assert w.record.state == "creating" and outcome_of_hosts(w) == {"a": ["n1"], "b": ["n2"]}


def outcome_of_hosts(w: World) -> dict[str, list[str]]:
    return {vm: list(w.holders(domain)) for vm, domain in DOMAINS.items()}


@pytest.mark.parametrize("faults, end, after", [
    # the claim: nothing else happens
    ({"claim": "unreachable"}, "no replica answered", "gone"),
    ({"claim": "lost"}, "write reached 1 of 3 replicas", "creating"),  # it landed: recovery deletes it
    # before the placement is written: undone, told as the cause
    ({"search": "unreachable"}, "the spiral search failed", "gone"),
    ({"search": "unreachable", "index": "unreachable"}, "the spiral search failed", "gone"),
    # the index entry's add, beside the steps, failed: known at the join, every VM running: all undone
    ({"index": "unreachable"}, ROLLED_BACK + "index bucket 've-index/03' could not be read", "gone"),
    ({"index": "lost"}, ROLLED_BACK + "index bucket 've-index/03' write reached 1 of 3 replicas", "gone"),
    # a node refuses a reservation: released, planned again without it
    ({"reserve n2": "unreachable"}, "created", "running at n1 n3"),
    ({"reserve n1": "unreachable"}, "created", "running at n2 n3"),
    ({"reserve n2": "lost"}, "created", "running at n1 n3"),  # its reservation lapses
    ({f"reserve n{i}": "unreachable" for i in range(1, 5)},
     "cannot place web: nodes kept refusing reservations (n1, n2, n3)", "gone"),
    # the placement written, or not: released, never started
    ({"write": "unreachable"}, ROLLED_BACK + "write reached 0 of 3 replicas", "gone"),
    ({"write": "lost"}, ROLLED_BACK + "write reached 1 of 3 replicas", "gone"),
    # a confirm fails: every VM undefined
    ({"confirm n2": "unreachable"}, ROLLED_BACK + "b on n2: unreachable", "gone"),
    ({"confirm n2": "lost"}, ROLLED_BACK + "b on n2: connection lost", "gone"),
    ({"confirm n1": "unreachable", "confirm n2": "unreachable"},
     ROLLED_BACK + "a on n1: unreachable; b on n2: unreachable", "gone"),
    # the roll-back cannot finish: the record stays for the next command
    ({"confirm n2": "unreachable", "vm undefine n1": "unreachable"},
     f"creating web failed (b on n2: unreachable); {UNFINISHED} (cannot undefine web:a on n1: unreachable)",
     "creating"),
    ({"confirm n2": "unreachable", "delete": "unreachable"},
     f"creating web failed (b on n2: unreachable); {UNFINISHED} (write reached 0 of 3 replicas)", "creating"),
    ({"confirm n2": "unreachable", "read": "unreachable"},
     f"creating web failed (b on n2: unreachable); {UNFINISHED} (no replica answered)", "creating"),
    ({"index": "unreachable", "delete": "unreachable"},
     f"creating web failed (index bucket 've-index/03' could not be read); {UNFINISHED} (write reached 0 of 3 "
     "replicas)", "creating"),
    # every VM runs, but the record cannot say so: the next command finishes it
    ({"write #2": "unreachable"}, "write reached 0 of 3 replicas", "creating"),
])
def test_a_create_that_fails_at_each_step(faults: dict[str, str], end: str, after: str) -> None:
    w = world()
    result = run(Create(NEW), w, faults)
    assert w.violations == []
    if end == "created":
        assert isinstance(result, Done)
    else:
        assert isinstance(result, Refuse) and result.reason.startswith(end), result.reason
        assert result.kind == "bad_request"
    if after == "creating":
        assert w.record is not None and w.record.state == "creating"
        # the next command (everyone answering) finishes it, or undoes it: never leaves it half-made
        finished = isinstance(recover(w), Done) and w.record is not None
        assert outcome(w) == ("running at n1 n2" if finished else "gone")
        assert finished == (faults == {"write #2": "unreachable"})
    else:
        assert outcome(w) == after


def test_an_index_entry_not_removed_is_noted_and_hidden_by_its_gone_record() -> None:
    w, core = world(), Create(NEW)
    result = run(core, w, {"confirm n2": "unreachable", "unindex": "unreachable"})
    assert isinstance(result, Refuse) and result.reason == ROLLED_BACK + "b on n2: unreachable"
    assert w.record is None and w.index == {VE: UID} and not outcome_of_hosts(w)["a"]
    assert core.notes == ["could not remove VE web from the index yet: index bucket 've-index/03' could not be read"]


def test_an_undo_waits_for_the_index_entry_then_removes_it() -> None:
    """The entry's add runs beside the search; a create undone meanwhile joins it before the removal is sent,
    or a late add would list a VE that is gone."""
    w = world()
    result = run(Create(NEW), w, {"search": "unreachable"})
    assert isinstance(result, Refuse) and w.index == {}
    assert w.trace[:3] == ["claim", "index", "search"] and w.trace.index("join") < w.trace.index("unindex")


def test_a_reservation_that_lapsed_while_paused_is_named() -> None:
    w, core = world(), Create(NEW)
    action = core.start(0.0)
    while label(action) != "pause placed":
        action = core.on(w.perform(action), 1.0)
    w.lapse()
    while not isinstance(action, (Done, Refuse)):
        action = core.on(w.perform(action), 2.0)
    assert action == Refuse(ROLLED_BACK + "a on n1: reservation token-n1-web:a is unknown or expired; "
                            "b on n2: reservation token-n2-web:b is unknown or expired")
    assert "vm undefine n1 + vm undefine n2" in w.trace and outcome(w) == "gone"


def test_a_refused_reservation_is_noted_and_the_others_released() -> None:
    w, core = world(), Create(NEW)
    assert isinstance(run(core, w, {"reserve n2": "unreachable"}), Done)
    assert "release n1" in w.trace and w.trace.index("release n1") < w.trace.index("reserve n3")
    assert core.notes == ["reservation of b on n2 refused: n2: unreachable; planning again without it"]
    assert all(not h.reserved for h in w.hosts.values())


def test_no_plan_among_the_near_asks_every_member_once() -> None:
    w = world()
    w.hosts["n2"].free = w.hosts["n3"].free = {"vcpus": 0, "memory_mb": 0, "disk_gb": 0}
    assert isinstance(run(Create(NEW), w), Done)
    assert "search, search all" in ", ".join(w.trace) and outcome(w) == "running at n1 n4"
    why = w.record.placement["b"].why
    assert why == "nearest with room (3.0 ms, found by spiral; 3 nearer full or ruled out by constraints)"
    w = world()
    for host in ("n2", "n3", "n4"):
        w.hosts[host].free = {"vcpus": 0, "memory_mb": 0, "disk_gb": 0}
    refused = run(Create(NEW), w)
    assert isinstance(refused, Refuse) and refused.reason.startswith("cannot place web: anti-affinity [a, b]")
    assert w.trace.count("search all") == 1 and outcome(w) == "gone"


def test_a_taken_name_is_refused_before_anything_changes() -> None:
    w = world(replace(PLACED, state="running", uid="other"), n1="a", n2="b")
    refused = run(Create(NEW), w)
    assert refused == Refuse("a VE named 'web' already exists", "conflict") and w.trace == ["claim"]
    assert w.record.uid == "other" and w.index == {VE: "other"}


def test_a_claim_that_keeps_losing_is_refused_and_one_that_wins_goes_on() -> None:
    core = Create(NEW)
    assert core.start(0.0) == ClaimRecord(NEW)
    for _ in range(CLAIM_ATTEMPTS - 1):
        assert core.on(ClaimLost("'ve/web' changed meanwhile"), 1.0) == ClaimRecord(NEW)
    refused = core.on(ClaimLost("'ve/web' changed meanwhile"), 1.0)
    assert isinstance(refused, Refuse) and refused.kind == "conflict" and "kept changing" in refused.reason
    core = Create(NEW)
    core.start(0.0)
    core.on(ClaimLost("'ve/web' changed meanwhile"), 1.0)
    assert core.on(RecordWritten(), 2.0) == Beside(AddToIndex(VE, "alice", UID)) and core.step is Step.INDEX


def test_a_name_rolled_back_may_be_created_again() -> None:
    w = world()
    run(Create(NEW), w, {"confirm n2": "unreachable"})
    again = replace(NEW, uid="uid2")
    assert isinstance(run(Create(again), w), Done) and w.record.uid == "uid2" and outcome(w) == "running at n1 n2"


def test_why_recovery_waits_for_the_coordinator_to_be_abandoned() -> None:
    """A recoverer racing a coordinator that still holds its reservations undoes a create that then goes on:
    its confirms start VMs that no record lists. So a `creating` record is recovered only once its
    coordinator is abandoned (VEService._check_abandoned; the coordinator holds the VE's lock throughout)."""
    w, core = world(), Create(NEW)
    action = core.start(0.0)
    while label(action) != "confirm n1 + confirm n2":
        action = core.on(w.perform(action), 1.0)
    assert recover(w) == Done(False) and w.record is None
    w.perform(action)
    assert outcome_of_hosts(w) == {"a": ["n1"], "b": ["n2"]}  # orphans: what the rule prevents


# --------------------------------------------------------------------------------------------------------
# Recovery: the whole table. Where the coordinator stopped: after the claim, after writing the placement
# (no VM started), with a started and not b, with both started. Answers: n1, n2, the directory (1, 2, D).

STAGES: dict[str, tuple[VERecord, dict[str, str]]] = {
    "claimed": (NEW, {}), "placed": (PLACED, {}), "half": (PLACED, {"n1": "a"}),
    "confirmed": (PLACED, {"n1": "a", "n2": "b"})}
UNDEFINE = "vm undefine n1 + vm undefine n2"


@dataclass(frozen=True)
class Row:
    stages: str  # '|'-separated
    answers: str  # per letter of 1, 2, D: 1 answers, 0 does not, * either
    actions: str
    end: str  # finished, undone, or stopped: why

    def matches(self, stage: str, answers: str) -> bool:
        return stage in self.stages.split("|") and all(
            want == "*" or (want == "1") == (who in answers) for who, want in zip("12D", self.answers, strict=True))


RECOVERY = [
    # stages                   1 2 D   the actions, in order                                 how it ends
    Row("claimed",             "**0", "read",                                          "stopped: no replica answered"),
    Row("claimed",             "**1", "read, delete, unindex",                         "undone"),
    Row("placed|half|confirmed", "0**", "probe n1",                                    "stopped: n1 cannot be reached"),
    Row("placed",              "10*", f"probe n1, {UNDEFINE}",
        "stopped: cannot undefine web:b on n2: unreachable"),
    Row("placed",              "110", f"probe n1, {UNDEFINE}, read",                   "stopped: no replica answered"),
    Row("placed",              "111", f"probe n1, {UNDEFINE}, read, delete, unindex",  "undone"),
    Row("half|confirmed",      "10*", "probe n1, probe n2",                            "stopped: n2 cannot be reached"),
    Row("half",                "110", f"probe n1, probe n2, {UNDEFINE}, read",         "stopped: no replica answered"),
    Row("half",                "111", f"probe n1, probe n2, {UNDEFINE}, read, delete, unindex", "undone"),
    Row("confirmed",           "110", "probe n1, probe n2, read",                      "stopped: no replica answered"),
    Row("confirmed",           "111", "probe n1, probe n2, read, index, write",        "finished"),
]


def ending(end: Action) -> str:
    if isinstance(end, Done):
        return "finished" if end.result else "undone"
    assert isinstance(end, Refuse)
    return f"stopped: {end.reason}"


@pytest.mark.parametrize("answers", ["".join(c) for n in range(4) for c in itertools.combinations("12D", n)])
@pytest.mark.parametrize("stage", list(STAGES))
def test_recovery_table(stage: str, answers: str) -> None:
    rows = [r for r in RECOVERY if r.matches(stage, answers)]
    assert len(rows) == 1, f"{stage} {answers}: {rows}"  # the table covers every case, once
    row = rows[0]
    value, held = STAGES[stage]
    w = world(value, **held)
    w.down = {n for letter, n in zip("12D", ("n1", "n2", DIRECTORY), strict=True) if letter not in answers}
    end = recover(w)
    assert ", ".join(w.trace) == row.actions and ending(end) == row.end
    assert w.violations == []
    # the rule: a VM is undefined only once a host said it lacks its VM; the record is finished only once every
    # host said it holds its VM, and deleted only once every VM placed is undefined
    assert not any(a.startswith("vm undefine") for a in w.trace) or stage in ("placed", "half")
    assert ("write" in w.trace) <= (stage == "confirmed" and answers == "12D")
    assert ("delete" in w.trace) <= (stage == "claimed" or {"1", "2"} <= set(answers))
    if row.end.startswith("stopped"):
        assert w.record == value  # left for the next attempt, which (everyone answering) ends as the table says
        w.down.clear()
        assert ending(recover(w)) == ("finished" if stage == "confirmed" else "undone")
    assert outcome(w) == ("running at n1 n2" if stage == "confirmed" else "gone")


def test_a_recovery_finds_the_create_settled_by_another() -> None:
    settled = [(None, False), (replace(PLACED, uid="uid2"), False), (replace(PLACED, state="running"), True)]
    for fresh, result in settled:
        core = CreateRecovery(PLACED)
        action = core.start(0.0)
        while not isinstance(action, ReadRecord):
            action = core.on(world(PLACED, n1="a", n2="b").perform(action), 1.0)
        assert core.on(RecordRead(fresh), 2.0) == Done(result)


# --------------------------------------------------------------------------------------------------------
# Properties over random runs

FAULTS = st.sampled_from([None] * 24 + ["unreachable", "lost", "timeout", "late"])
NODES = ["n1", "n2", "n3", "n4"]
SOME_CALLS = st.dictionaries(st.sampled_from([f"{verb} {n}" for verb in ("confirm", "vm undefine")
                                              for n in NODES[:3]]), st.sampled_from(["unreachable", "lost"]),
                             min_size=1, max_size=2)
"""Faults of some calls only (of those made at once: a confirm lost, another not)."""


@st.composite
def schedules(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "faults": draw(st.lists(st.one_of(FAULTS, FAULTS, FAULTS, SOME_CALLS), max_size=16)),  # its i-th action
        "crash": draw(st.sampled_from([None, None, "crash"]).flatmap(  # dies at its i-th action, done or not
            lambda c: st.none() if c is None else st.tuples(st.integers(0, 14), st.booleans()))),
        "recoverers": draw(st.integers(0, 3)),
        "steps": draw(st.lists(st.tuples(st.integers(0, 3), st.sampled_from([None] * 12 + [*NODES, DIRECTORY]),
                                         FAULTS), min_size=10, max_size=60)),
        "conditional": draw(st.booleans()),  # the directory's writes: compare-and-set, or the last one wins
        "deaths": draw(st.lists(st.integers(0, 10), min_size=3, max_size=3)),  # a recoverer dies at its i-th
    }


@settings(max_examples=800, deadline=None)
@given(schedules())
def test_creates_crashes_and_recoverers_in_any_interleaving(s: dict[str, Any]) -> None:
    """A coordinator whose actions fail at random and which may die at any step (its action done or not),
    then recoverers interleaved at random while hosts and the directory come and go, then the next command
    with everyone answering: no VM ever runs at two places, and afterwards the VE either runs with every VM
    defined exactly where its record says, or has no record, no VM anywhere and no index entry; where the
    coordinator reported it created, it runs; where rolled back, it is gone."""
    w = world()
    w.conditional, w.seen[0] = s["conditional"], w.version
    coordinator = Create(NEW)
    action: Action = coordinator.start(0.0)
    ended, crashed, _ = coordinate_then_interleave(w, coordinator, action, lambda core: True, s["crash"], s["faults"],
                                                   s["recoverers"], s["steps"], s["deaths"], recoverer)
    event(f"coordinator: {'crashed' if crashed else ending_of(ended)}")
    w.down.clear()
    if (core := recoverer(w)) is not None:
        event("left for the next command")
        assert isinstance(run(core, w), Done), w.trace
    if w.record is None and VE in w.index:
        event("an index entry left for `ve list` to prune")  # its removal failed; its record is gone
        del w.index[VE]
    assert w.violations == []
    settled = outcome(w)
    if not crashed and isinstance(ended, Done):
        assert settled.startswith("running")
    if not crashed and isinstance(ended, Refuse) and "was rolled back" in ended.reason:
        assert settled == "gone"


def ending_of(outcome: Action) -> str:
    if isinstance(outcome, Done):
        return "created"
    assert isinstance(outcome, Refuse)
    return next((k for k in ("was rolled back", UNFINISHED, "cannot place") if k in outcome.reason), "refused")
