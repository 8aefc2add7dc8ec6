"""Relocation as a transaction (discovery.ve.moves), on the in-memory world (discovery.ve.world): the recovery's
whole table (phase × who holds the domain × who answers), the coordinator's table (each step failing each
way), then properties over random runs: crashes at any step, several recoverers interleaved, reachability
flapping. After every event no domain runs at two places and the record names a node that holds it."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from agents.hypervisor.actor import SETTLED
from discovery.ve.moves import PREPARE_STEPS, Move, MoveRecovery, Step
from discovery.ve.records import STEADY, MoveIntent, Slot, Transfer, VERecord, VMState
from discovery.ve.transaction import (
    Action,
    CallHost,
    Continued,
    DirectoryFailed,
    Done,
    HostAnswered,
    HostFailed,
    PauseForTest,
    Probe,
    Probed,
    ReadRecord,
    RecordRead,
    RecordWritten,
    Refuse,
    TimedOut,
    WriteRecord,
)
from discovery.ve.world import DIRECTORY, Host, World, coordinate_then_interleave, label, record_of, run

VE, VM, DOMAIN = "shop", "db", "shop:db"
SRC, DST = "src", "dst"
TARGET = Slot(DST, "dst:1", "lyon", 2.0, "relocated to dst by alice")
NEED = {"vcpus": 1, "memory_mb": 256, "disk_gb": 1}
WAYS = {"carry": ("test", False), "ship": ("qemu", False), "live": ("qemu", True)}  # backend, own libvirtd


def record(intent: MoveIntent | None = None) -> VERecord:
    return record_of(VE, {VM: Slot(SRC, "src:1", "rennes", 1.0, "created", moving_to=intent)})


def intent(phase: Any, state: VMState = "running") -> MoveIntent:
    return MoveIntent(DST, "dst:1", "lyon", 2.0, "relocated to dst by alice", phase, state, "n3", 0.0)


def world(value: VERecord, way: str = "carry", **held: str) -> World:
    backend, live = WAYS[way]
    hosts = {n: Host({DOMAIN: held[n]} if n in held else {}, backend=backend, live=live) for n in (SRC, DST)}
    return World(hosts, value)


def move(value: VERecord, method: str = "auto", limit: float = 60.0) -> Move:
    return Move(value, VM, DOMAIN, TARGET, method, NEED, "n3", limit)


def moving(w: World) -> bool:
    assert w.record is not None
    return w.record.placement[VM].moving_to is not None


def settled_at(w: World) -> str:
    """After everything: the record names one node, with no intent, and only that node holds the domain."""
    assert w.record is not None
    slot = w.record.placement[VM]
    assert slot.moving_to is None and list(w.holders(DOMAIN)) == [slot.node], (slot, w.holders(DOMAIN))
    return slot.node


def test_steady_states_are_the_hypervisors() -> None:
    assert STEADY == SETTLED


# --------------------------------------------------------------------------------------------------------
# Recovery: the whole table. Holds: S (source), T (target), ST (both), - (neither). Answers: which of the
# source, the target and the directory (S, T, D) answer. The phase of the intent never matters.

HOLDS = {"S": {SRC: "paused"}, "T": {DST: "running"}, "ST": {SRC: "paused", DST: "running"}, "-": {}}
ANSWERS = ["".join(c) for n in range(4) for c in itertools.combinations("STD", n)]


@dataclass(frozen=True)
class Row:
    holds: str  # a '|'-separated choice of HOLDS, or '*'
    answers: str  # per letter of S, T, D: 1 answers, 0 does not, * either
    actions: str
    end: str  # forward, undone, or stopped: why

    def matches(self, holds: str, answers: str) -> bool:
        wanted = zip("STD", self.answers, strict=True)
        return ((self.holds == "*" or holds in self.holds.split("|"))
                and all(want == "*" or (want == "1") == (who in answers) for who, want in wanted))


RECOVERY = [  # actions: `vm settle dst` written `settle dst`
    # holds     S T D   the actions, in order                                      how it ends
    Row("*",    "*0*", "probe dst",                                          "stopped: dst cannot be reached"),
    Row("T|ST", "01*", "probe dst, probe src",                               "stopped: src cannot be reached"),
    Row("T|ST", "110", "probe dst, probe src, settle dst, undefine src, read",        "stopped: no replica answered"),
    Row("T|ST", "111", "probe dst, probe src, settle dst, undefine src, read, write", "forward"),
    Row("S|-",  "01*", "probe dst, probe src",                               "stopped: src cannot be reached"),
    Row("-",    "11*", "probe dst, probe src",                               "stopped: held by neither"),
    Row("S",    "110", "probe dst, probe src, undefine dst, settle src, read",        "stopped: no replica answered"),
    Row("S",    "111", "probe dst, probe src, undefine dst, settle src, read, write", "undone"),
]
MUTATING = ("vm settle", "vm undefine")


def recover(w: World) -> Action:
    assert w.record is not None
    return run(MoveRecovery(w.record, VM, DOMAIN), w)


def ending(end: Action) -> str:
    if isinstance(end, Done):
        return "forward" if end.result else "undone"
    assert isinstance(end, Refuse)
    return f"stopped: {end.reason}"


@pytest.mark.parametrize("answers", ANSWERS)
@pytest.mark.parametrize("holds", list(HOLDS))
@pytest.mark.parametrize("phase", ["prepare", "started"])
def test_recovery_table(phase: str, holds: str, answers: str) -> None:
    rows = [r for r in RECOVERY if r.matches(holds, answers)]
    assert len(rows) == 1, f"{holds} {answers}: {rows}"  # the table covers every case, once
    row = rows[0]
    w = world(record(intent(phase)), **HOLDS[holds])
    w.down = {n for letter, n in zip("STD", (SRC, DST, DIRECTORY), strict=True) if letter not in answers}
    end = recover(w)
    assert ", ".join(a.removeprefix("vm ") for a in w.trace) == row.actions
    kind, _, why = row.end.partition(": ")
    assert ending(end).startswith(kind) and why in ending(end), ending(end)
    assert w.violations == [] or holds == "-"  # lost before recovery began: it must not pretend otherwise
    # the rule: forward iff the target holds; the source's copy is removed only if the target holds it; a
    # host that does not answer stops recovery before anything changes
    assert (f"vm undefine {SRC}" in w.trace) == ("T" in holds and {"S", "T"} <= set(answers))
    if not {"S", "T"} <= set(answers):
        assert not [a for a in w.trace if a.startswith(MUTATING)]
    if row.end in ("forward", "undone"):
        assert settled_at(w) == (DST if row.end == "forward" else SRC)
        assert w.holders(DOMAIN) == {DST if row.end == "forward" else SRC: "running"}
    elif holds != "-":  # stopped: the next attempt, everyone answering, ends as the table says
        w.down.clear()
        assert ending(recover(w)) == ("forward" if "T" in holds else "undone") and w.violations == []
        settled_at(w)


def test_a_recovery_finds_the_intent_settled_by_another_and_leaves_the_record_alone() -> None:
    w = world(record(intent("started")), src="paused", dst="running")
    assert w.record is not None
    core = MoveRecovery(w.record, VM, DOMAIN)
    action = core.start(0.0)
    while not isinstance(action, ReadRecord):
        action = core.on(w.perform(action), 0.0)
    settled = record().with_slot(VM, replace(record().placement[VM], node=DST, addr="dst:1"))
    assert core.on(RecordRead(settled), 1.0) == Done(True) and core.value == settled
    gone = MoveRecovery(w.record, VM, DOMAIN)
    gone.step = gone.step.READ
    assert gone.on(RecordRead(None), 1.0) == Refuse("VE 'shop' was destroyed meanwhile", "not_found")


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_recovery_keeps_the_rule_whatever_the_answers(data: st.DataObject) -> None:
    """Any answers at all (even ones no real host would give): the source's copy is never removed unless
    the target said it holds the domain, nothing is changed unless both hosts answered, and the target's
    copy is removed only if it said it does not hold it."""
    phase = data.draw(st.sampled_from(["prepare", "started"]))
    core = MoveRecovery(record(intent(phase)), VM, DOMAIN)
    action, heard = core.start(0.0), {}
    for _ in range(12):
        if isinstance(action, (Done, Refuse)):
            break
        if isinstance(action, CallHost) and action.method in ("host.vm.undefine", "host.vm.settle"):
            assert heard.get(DST) is not None and heard.get(SRC) is not None, "changed a host before asking both"
            if action.node == SRC and action.method == "host.vm.undefine":
                assert heard[DST] is True, "removed the source's copy though the target did not hold the VM"
            if action.node == DST and action.method == "host.vm.undefine":
                assert heard[DST] is False and heard[SRC] is True
        match action:
            case Probe(node=node):
                observation = data.draw(st.sampled_from([Probed(node, True, {"state": "paused"}), Probed(node, False),
                                                         Probed(node, None, reason="unreachable")]))
                heard[node] = observation.holds
            case CallHost(node=node):
                observation = data.draw(st.sampled_from([HostAnswered(node, {}), HostFailed(node, "refused")]))
            case ReadRecord():
                observation = data.draw(st.sampled_from([RecordRead(record(intent(phase))), RecordRead(record()),
                                                         RecordRead(None), DirectoryFailed("down")]))
            case _:
                observation = data.draw(st.sampled_from([RecordWritten(), DirectoryFailed("down")]))
        if isinstance(observation, Probed) and observation.holds is None:
            assert isinstance(core.on(observation, 1.0), Refuse)
            return
        action = core.on(observation, 1.0)
    assert isinstance(action, (Done, Refuse))
    if isinstance(action, Done):
        assert action.result is heard[DST]


# --------------------------------------------------------------------------------------------------------
# The coordinator


@pytest.mark.parametrize("way, actions", [
    ("carry", "vm info src, write, reserve dst, export src, pause prepared, confirm dst, write, pause started, "
              "vm undefine src, write"),
    ("ship", "vm info src, write, reserve dst, export src, pause prepared, confirm dst, write, pause started, "
             "vm undefine src, write"),
    ("live", "vm info src, write, reserve dst, incoming dst, pause prepared, migrate src, vm settle dst, write, "
             "pause started, vm undefine src, write"),
])
@pytest.mark.parametrize("state", STEADY)
def test_a_move_step_by_step(way: str, actions: str, state: str) -> None:
    w = world(record(), way, src=state)
    if way == "live" and state == "shutoff":  # a shut-off VM has nothing to migrate live: shipped
        actions = actions.replace("incoming dst, ", "export src, ").replace("migrate src, vm settle dst", "confirm dst")
    writes = []
    core = move(w.record)
    action, now = core.start(0.0), 0.0
    while not isinstance(action, (Done, Refuse)):
        if isinstance(action, WriteRecord):
            writes.append(action.value.placement[VM])
        now += 1.0
        action = core.on(w.perform(action), now)
    assert ", ".join(w.trace) == actions and w.violations == []
    how = "ship" if way == "live" and state == "shutoff" else way
    transfer = w.trace.index("write", 2) - w.trace.index("reserve dst") - 1  # a second per step since the reservation
    assert action == Done(Transfer(how, float(transfer)))
    assert [s.moving_to.phase if s.moving_to else None for s in writes] == ["prepare", "started", None]
    assert writes[0].moving_to == replace(intent("prepare", state), since=1.0)
    assert writes[-1] == replace(TARGET, transfer=action.result)
    assert settled_at(w) == DST and w.holders(DOMAIN) == {DST: state} and core.value == w.record


def test_method_ship_ships_a_vm_that_could_migrate_live() -> None:
    """`--method ship` insists: a running VM between two daemons is still saved, shipped and restored."""
    w = world(record(), "live", src="running")
    core = move(w.record, method="ship")
    action, now = core.start(0.0), 0.0
    while not isinstance(action, (Done, Refuse)):
        now += 1.0
        action = core.on(w.perform(action), now)
    assert "export src" in w.trace and "migrate src" not in w.trace and w.violations == []
    assert isinstance(action, Done) and action.result.how == "ship"


ROLLED_BACK = "rolled back, it stays on src"
UNFINISHED = "is left unfinished"


@pytest.mark.parametrize("way, failing, fault, end", [
    # the refusals before anything changes
    ("carry", "vm info src", "unreachable", "src: unreachable"),
    ("carry", "write", "unreachable", "write reached 0 of 3 replicas"),
    ("carry", "write", "lost", "write reached 1 of 3 replicas"),  # the intent landed all the same
    # the preparation fails: undone, unless the target holds the VM after all
    ("carry", "reserve dst", "unreachable", ROLLED_BACK),
    ("carry", "reserve dst", "timeout", f"not done within 60 s; {ROLLED_BACK}"),
    ("carry", "export src", "unreachable", ROLLED_BACK),
    ("carry", "export src", "lost", ROLLED_BACK),  # frozen, then brought back
    ("carry", "pause prepared", "timeout", ROLLED_BACK),
    ("carry", "confirm dst", "unreachable", ROLLED_BACK),
    ("carry", "confirm dst", "lost", "moved"),  # the target had taken it
    ("carry", "confirm dst", "late", "moved"),
    ("carry", "confirm dst", "timeout", ROLLED_BACK),
    ("ship", "confirm dst", "lost", "moved"),
    ("live", "incoming dst", "unreachable", ROLLED_BACK),
    ("live", "migrate src", "unreachable", ROLLED_BACK),
    ("live", "migrate src", "lost", "moved"),
    ("live", "vm settle dst", "unreachable", "moved"),
    # recovery after a failure cannot ask a host: the intent stays for the next attempt
    ("carry", "probe dst", "unreachable", UNFINISHED),
    # after the target started the VM: whatever fails, the next attempt goes forward
    ("carry", "write #2", "unreachable", "write reached 0 of 3 replicas"),
    ("carry", "pause started", None, "moved"),
    ("carry", "vm undefine src", "unreachable", "but its old copy could not be removed yet (src: unreachable); retry"),
    ("carry", "write #3", "unreachable", "write reached 0 of 3 replicas"),
])
def test_a_move_that_fails_at_each_step(way: str, failing: str, fault: str | None, end: str) -> None:
    w = world(record(), way, src="running")
    faults = {failing: fault} if fault else {}
    if failing == "probe dst":
        faults = {"confirm dst": "unreachable", "probe dst": "unreachable"}
    outcome = run(move(w.record), w, faults)
    assert w.violations == []
    if end == "moved":
        assert isinstance(outcome, Done) and settled_at(w) == DST
    else:
        assert isinstance(outcome, Refuse) and end in outcome.reason, outcome.reason
        if end.endswith(ROLLED_BACK):
            assert settled_at(w) == SRC
    assert failing.split(" #")[0] in w.trace
    # whatever happened, the next attempt (everyone answering) leaves the VM at exactly one place, running
    if moving(w):
        assert isinstance(recover(w), Done)
    settled_at(w)
    assert list(w.holders(DOMAIN).values()) == ["running"] and w.violations == []


def test_the_preparation_is_given_up_past_its_limit() -> None:
    w = world(record(), "carry", src="running")
    outcome = run(move(w.record, limit=2.5), w)  # every step takes a second
    assert isinstance(outcome, Refuse) and outcome.reason.endswith(f"not done within 2.5 s; {ROLLED_BACK}")
    assert "confirm dst" not in w.trace and settled_at(w) == SRC and w.holders(DOMAIN) == {SRC: "running"}
    core = move(record(), limit=2.5)
    core.start(0.0)
    assert isinstance(core.on(HostAnswered(SRC, {"state": "running"}), 9.0), WriteRecord)
    reserve = core.on(RecordWritten(), 10.0)
    assert isinstance(reserve, CallHost) and reserve.method == "host.reserve" and reserve.within == 2.5
    export = core.on(HostAnswered(DST, {"token": "t"}), 11.0)
    assert isinstance(export, CallHost) and export.method == "host.export" and export.within == 1.5
    assert core.on(TimedOut(), 13.0) == CallHost(DST, "dst:1", "host.release", {"token": "t"}, best_effort=True)


@pytest.mark.parametrize("method, info, refusal", [
    ("live", {"state": "running", "live": False}, "cannot migrate it live: that needs real guests"),
    ("live", {"state": "shutoff", "live": True}, "cannot migrate it live: it is shut off"),
    ("ship", {"state": "running", "backend": "test"}, "cannot ship it: a test-driver VM"),
    ("auto", {"state": "crashed"}, "cannot relocate shop/db: it is crashed on src"),
])
def test_a_move_that_cannot_work_is_refused_before_anything_is_written(method: str, info: dict, refusal: str) -> None:
    core = move(record(), method)
    assert core.start(0.0) == CallHost(SRC, "src:1", "host.vm.info", {"name": DOMAIN})
    refused = core.on(HostAnswered(SRC, info), 1.0)
    assert isinstance(refused, Refuse) and refused.reason.startswith(refusal) and core.step is Step.OVER


@pytest.mark.parametrize("reserved, refusal", [
    ({"token": "t", "backend": "qemu"}, "cannot move a test VM to a qemu node"),
])
def test_a_target_that_cannot_take_it_is_released_and_the_move_undone(reserved: dict, refusal: str) -> None:
    core = move(record())
    core.start(0.0)
    core.on(HostAnswered(SRC, {"state": "running"}), 1.0)
    core.on(RecordWritten(), 2.0)
    release = core.on(HostAnswered(DST, reserved), 3.0)
    assert release == CallHost(DST, "dst:1", "host.release", {"token": "t"}, best_effort=True)
    assert core.on(HostFailed(DST, "gone"), 4.0) == Probe(DST, "dst:1", DOMAIN) and core.cause == refusal


def test_a_live_move_asks_live_of_a_node_without_a_daemon() -> None:
    w = world(record(), "live", src="running")
    w.hosts[DST].live = False
    outcome = run(move(w.record, "live"), w)
    assert isinstance(outcome, Refuse) and "cannot migrate it live: dst has no libvirtd of its own" in outcome.reason
    assert settled_at(w) == SRC


def test_why_recovery_waits_for_the_coordinator_to_be_abandoned() -> None:
    """A recoverer racing a coordinator that is still importing the VM would run it twice: it sees the target
    without the domain and brings the source back, then the coordinator's confirm lands. So an intent is
    recovered only by its coordinator or once that coordinator is abandoned (VEService._check_abandoned)."""
    w = world(record(), "carry", src="running")
    coordinator = move(w.record)
    action = coordinator.start(0.0)
    while label(action) != "confirm dst":
        action = coordinator.on(w.perform(action), 1.0)
    assert isinstance(recover(w), Done)  # undone: the source runs again
    w.perform(action)  # the coordinator's confirm
    assert w.violations and "runs at ['dst', 'src']" in w.violations[0]


# --------------------------------------------------------------------------------------------------------
# Properties over random runs

FAULTS = st.sampled_from([None] * 24 + ["unreachable", "lost", "timeout", "late"])


@st.composite
def schedules(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "way": draw(st.sampled_from(list(WAYS))),
        "state": draw(st.sampled_from(STEADY)),
        "limit": draw(st.sampled_from([3.5, 60.0])),
        "faults": draw(st.lists(FAULTS, max_size=14)),  # the coordinator's i-th action
        "crash": draw(st.sampled_from([None, None, "crash"]).flatmap(  # dies at its i-th action, done or not
            lambda c: st.none() if c is None else st.tuples(st.integers(0, 12), st.booleans()))),
        "recoverers": draw(st.integers(0, 3)),
        # who acts next (the coordinator, once past its preparation, or a recoverer), whose reachability
        # flips first, and a fault on that action
        "steps": draw(st.lists(st.tuples(st.integers(0, 3), st.sampled_from([None] * 16 + [SRC, DST, DIRECTORY]),
                                         FAULTS), min_size=10, max_size=60)),
        "conditional": draw(st.booleans()),  # the directory's writes: compare-and-set, or the last one wins
        "deaths": draw(st.lists(st.integers(0, 12), min_size=3, max_size=3)),  # a recoverer dies at its i-th action
    }


def recoverer(w: World) -> MoveRecovery | None:
    return MoveRecovery(w.record, VM, DOMAIN) if w.record is not None and moving(w) else None


@settings(max_examples=800, deadline=None)
@given(schedules())
def test_moves_crashes_and_recoverers_in_any_interleaving(s: dict[str, Any]) -> None:
    """A coordinator whose calls fail at random and which may die at any step, then recoverers (and the
    coordinator, once it no longer imports the VM) interleaved at random while hosts and the directory come
    and go, then the next command with everyone answering: the VM never runs at two places, is never held by
    none of the nodes its record names, and ends at exactly one place, the one the record names, in the state
    it had; where the coordinator reported a move or a roll-back, that is where it is."""
    w = world(record(), s["way"], src=s["state"])
    w.conditional, w.seen[0] = s["conditional"], w.version
    coordinator = move(w.record, limit=s["limit"])
    action: Action = coordinator.start(0.0)

    def working(c) -> bool:  # the coordinator's own steps
        return bool(c.step in PREPARE_STEPS or c.step in (Step.INSPECT, Step.INTENT))

    outcome, crashed, ended = coordinate_then_interleave(w, coordinator, action, working, s["crash"], s["faults"],
                                                         s["recoverers"], s["steps"], s["deaths"], recoverer)
    event(f"coordinator: {'crashed' if crashed else ending_of(outcome)}")
    event(f"recoverers that acted: {sum(1 for k, end in ended.items() if k and end != Done(None))}")
    w.down.clear()
    if moving(w):  # the next command settles it
        event("left for the next command")
        assert isinstance(recover(w), Done), w.trace
    assert w.violations == []
    assert w.holders(DOMAIN) == {settled_at(w): s["state"]}
    if not crashed and isinstance(outcome, Done):
        assert settled_at(w) == DST
    if not crashed and isinstance(outcome, Refuse) and ROLLED_BACK in outcome.reason:
        assert settled_at(w) == SRC


def ending_of(outcome: Action) -> str:
    if isinstance(outcome, Done):
        return "moved"
    assert isinstance(outcome, Refuse)
    return next((k for k in ("rolled back", "left unfinished", "retry to finish") if k in outcome.reason), "refused")


def test_a_coordinator_past_its_preparation_and_a_recoverer_agree() -> None:
    w = world(record(), "carry", src="running")
    coordinator = move(w.record)
    action = coordinator.start(0.0)
    while not isinstance(action, PauseForTest) or action.point != "started":
        action = coordinator.on(w.perform(action), 1.0)
    assert recover(w) == Done(True) and settled_at(w) == DST  # another agent finished it meanwhile
    action = coordinator.on(Continued(), 2.0)
    while not isinstance(action, (Done, Refuse)):
        action = coordinator.on(w.perform(action), 3.0)
    assert isinstance(action, Done) and settled_at(w) == DST and w.violations == []
