"""Rebuilding a VM as a transaction (discovery.ve.rebuilding), on the in-memory world (discovery.ve.world): the
recovery's whole table (where the coordinator stopped × forced or not × who answers), the coordinator's steps
and its failure at each, where it places the VM, then properties over random runs: crashes, several recoverers
interleaved, reachability flapping."""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from discovery.ve.failovers import VM_STATE
from discovery.ve.rebuilding import Rebuild, RebuildRecovery, Step
from discovery.ve.records import RebuildIntent, Slot, Standby, VERecord, VEState, VMState
from discovery.ve.spec import Constraints, VESpec, VMSpec
from discovery.ve.transaction import Action, Done, Refuse
from discovery.ve.world import DIRECTORY, Host, World, coordinate_then_interleave, record_of, run

from .test_ve_failovers import FAULTS, ending

VE, VM, DOMAIN = "rb", "x", "rb:x"
OLD, NEW, FAR = "old", "new", "far"
"""The VM's host; a node of its site; a node of another site, nearer by the search's order (its name sorts
first)."""
DOWN = f"{OLD} does not answer"
UNDONE = "undone, it stays on old"


def record(ve_state: VEState = "running", intent: RebuildIntent | None = None, image: str = "none") -> VERecord:
    slot = Slot(OLD, "old:1", "rennes", 1.0, "created", rebuilding=intent)
    value = record_of(VE, {VM: slot}, ve_state)
    return replace(value, spec=replace(value.spec, vms=(VMSpec(VM, 1, 256, 1, image),)))


def intent(forced: bool, state: VMState = "running") -> RebuildIntent:
    why = f"forced while {OLD} was alive" if forced else DOWN
    return RebuildIntent(NEW, "new:1", "rennes", 1.0, OLD, why, None, state, "n3", 0.0)


def world(value: VERecord, old: str | None, confirmed: bool, forced: bool, far: bool = False) -> World:
    """The old host holds the VM in state `old` (None: not at all); the new node nothing, or (confirmed) the VM,
    running; with `far`, a third node in another site. A rebuild that is not forced happens because the old
    host is down."""
    hosts = {OLD: Host({DOMAIN: old} if old else {}), NEW: Host({DOMAIN: "running"} if confirmed else {})}
    if far:
        hosts[FAR] = Host(site="lyon")
    w = World(hosts, value)
    if not forced:
        w.crash(OLD)
    return w


def rebuild(value: VERecord, forced: bool, image: str | None = None, pending: tuple[str, ...] = (),
            vm: str = VM) -> Rebuild:
    return Rebuild(value, vm, f"{VE}:{vm}", image, None if forced else DOWN, "n3", pending)


def recovery(w: World) -> RebuildRecovery | None:
    assert w.record is not None
    return RebuildRecovery(w.record, VM, DOMAIN) if w.record.placement[VM].rebuilding else None


def settled(w: World) -> str:
    """After everything: the record names one node, with no intent; that node holds the domain, no other node
    runs it, and no node but the old host keeps another copy."""
    assert w.record is not None
    slot = w.record.placement[VM]
    holders = w.holders(DOMAIN)
    assert slot.rebuilding is None and slot.node in holders, (slot, holders)
    assert set(w.running(DOMAIN)) <= {slot.node} and set(holders) <= {slot.node, OLD}, holders
    if slot.node != OLD:
        assert holders.get(OLD, "shutoff") == "shutoff"  # gone, or off (held off, until fenced)
    return slot.node


def rebuilt(node: str, rank: float, why: str = DOWN, image: str | None = None) -> Slot:
    booted = f" from image {image}" if image else ""
    return Slot(node, f"{node}:1", "lyon" if node == FAR else "rennes", rank, f"rebuilt{booted}, its host old lost "
                                                                               f"({why})")


# --------------------------------------------------------------------------------------------------------
# Recovery: the whole table. Where the coordinator stopped: after writing the intent, after switching the
# old copy off (forced only), after the confirm. Who answers: the old host (O), the new node (N), the
# directory (D). The old host's answer never changes the decision: it is tidied at best.

STAGES = {  # stage: (the old copy's state if forced, whether the new node holds the VM)
    "intent": ("running", False), "switched off": ("shutoff", False), "confirmed": ("shutoff", True)}
TABLE = {
    # (confirmed, N answers, D answers): (actions, end)
    (False, False, False): ("probe new", "stopped: new cannot be reached"),
    (False, False, True): ("probe new", "stopped: new cannot be reached"),
    (True, False, False): ("probe new", "stopped: new cannot be reached"),
    (True, False, True): ("probe new", "stopped: new cannot be reached"),
    (False, True, False): ("probe new, vm settle old, read", "stopped: no replica answered"),
    (False, True, True): ("probe new, vm settle old, read, write", "undone"),
    (True, True, False): ("probe new, vm settle new, vm undefine old, read", "stopped: no replica answered"),
    (True, True, True): ("probe new, vm settle new, vm undefine old, read, write", "forward"),
}
CASES = [(stage, forced, "".join(answers)) for stage in STAGES for forced in (True, False)
         for n in range(4) for answers in itertools.combinations("OND", n) if forced or stage != "switched off"]


@pytest.mark.parametrize("stage, forced, answers", CASES)
def test_recovery_table(stage: str, forced: bool, answers: str) -> None:
    old_state, confirmed = STAGES[stage]
    w = world(record(intent=intent(forced)), old_state, confirmed, forced)
    w.down = {n for letter, n in zip("OND", (OLD, NEW, DIRECTORY), strict=True) if letter not in answers}
    actions, end = TABLE[confirmed, "N" in answers, "D" in answers]
    result = run(RebuildRecovery(w.record, VM, DOMAIN), w)
    assert ", ".join(w.trace) == actions
    kind, _, why = end.partition(": ")
    assert ending(result).startswith(kind) and why in ending(result)
    assert w.violations == []
    # the rule: forward iff the new node holds the domain; the old copy removed only then; a new node that
    # does not answer stops recovery before anything changes
    assert ("vm undefine old" in w.trace) == (confirmed and "N" in answers)
    if "N" not in answers:
        assert w.trace == ["probe new"]
    if kind in ("forward", "undone"):
        node = settled(w)
        assert node == (NEW if confirmed else OLD)
        if confirmed:
            assert w.holders(DOMAIN) == ({NEW: "running"} if "O" in answers else {OLD: "shutoff", NEW: "running"})
            assert w.record.placement[VM] == rebuilt(NEW, 1.0, intent(forced).why)
        else:
            assert w.holders(DOMAIN) == {OLD: "running" if "O" in answers else old_state if forced else "shutoff"}
    else:  # stopped: the next attempt, everyone answering, ends as the table says
        w.down.clear()
        assert ending(run(RebuildRecovery(w.record, VM, DOMAIN), w)) == ("forward" if confirmed else "undone")
        assert settled(w) == (NEW if confirmed else OLD) and w.violations == []


# --------------------------------------------------------------------------------------------------------
# The coordinator


@pytest.mark.parametrize("forced, actions", [
    (False, "search, reserve new, write, pause rebuild, confirm new, vm undefine old, read, write"),
    (True, "search, reserve new, write, vm destroy old, pause rebuild, confirm new, vm undefine old, read, write"),
])
@pytest.mark.parametrize("ve_state", list(VM_STATE))
def test_a_rebuild_step_by_step(forced: bool, actions: str, ve_state: VEState) -> None:
    w = world(record(ve_state), "running", False, forced)
    core = rebuild(w.record, forced)
    assert run(core, w) == Done(True)
    assert ", ".join(w.trace) == actions and w.violations == []
    assert settled(w) == NEW and w.hosts[NEW].domains == {DOMAIN: VM_STATE[ve_state]}
    assert w.record.placement[VM] == rebuilt(NEW, 0.0, intent(forced).why)  # the world's search: rank as rtt
    assert core.value == w.record and core.step is Step.OVER and not w.hosts[NEW].reserved
    if forced:
        assert w.holders(DOMAIN) == {NEW: VM_STATE[ve_state]}  # the old copy undefined
    else:
        assert w.hosts[OLD].domains == {DOMAIN: "shutoff"}  # down: its Fencing removes it once back


def test_the_intent_is_written_once_the_node_is_reserved_and_before_any_domain_changes() -> None:
    w = world(record(), "running", False, forced=True)
    core = rebuild(w.record, True)
    action = core.start(0.0)
    while w.trace[-1:] != ["write"]:
        action = core.on(w.perform(action), 1.0)
    assert w.hosts[NEW].reserved and w.hosts[NEW].domains == {} and w.holders(DOMAIN) == {OLD: "running"}
    assert w.record.placement[VM].rebuilding == RebuildIntent(NEW, "new:1", "rennes", 0.0, OLD, "forced while old "
                                                              "was alive", None, "running", "n3", 1.0)


def test_the_image_is_handed_to_the_node_and_prefetched_where_it_lacks_it() -> None:
    """The image booted is the transaction's (the spec's today, a shipped snapshot's tomorrow): a node that
    lacks it prefetches it with the room held; in the old host's site, one that holds it is preferred; a
    failed prefetch changes nothing but the reservation, given back."""
    w = world(record(image="tiny"), "running", False, False)
    assert run(rebuild(w.record, False, "tiny"), w) == Done(True)
    assert ", ".join(w.trace).startswith("search, reserve new, prefetch new, write") and w.hosts[NEW].images == {"tiny"}
    assert w.record.placement[VM] == rebuilt(NEW, 0.0, image="tiny")
    w = world(record(image="tiny"), "running", False, False, far=True)
    w.hosts["mid"] = Host(images={"snap-7"})  # a snapshot's image, held by a node of its site sorted after new
    w.hosts[FAR].images.add("snap-7")  # and by the other site's node: the site comes first
    assert run(rebuild(w.record, False, "snap-7"), w) == Done(True)
    assert settled(w) == "mid" and "prefetch" not in ", ".join(w.trace)
    w = world(record(image="tiny"), "running", False, False)
    end = run(rebuild(w.record, False, "tiny"), w, {"prefetch new": "unreachable"})
    assert end == Refuse("cannot rebuild rb/x: cannot bring the image: new: unreachable")
    assert w.trace[-1] == "release new" and w.record == record(image="tiny") and not w.hosts[NEW].reserved


@pytest.mark.parametrize("forced, failing, fault, end", [
    (False, "search", "unreachable", "cannot rebuild rb/x: the spiral search failed"),
    (False, "reserve new", "unreachable", "cannot rebuild rb/x: no candidate nodes; new refused a reservation"),
    (False, "write", "unreachable", "write reached 0 of 3 replicas"),
    (False, "write", "lost", "write reached 1 of 3 replicas"),  # the intent landed: the next command undoes it
    (True, "vm destroy old", "unreachable", UNDONE),
    (True, "vm destroy old", "lost", UNDONE),  # switched off, then back on
    (False, "confirm new", "unreachable", UNDONE),
    (True, "confirm new", "unreachable", UNDONE),
    (False, "confirm new", "lost", "done"),  # defined after all
    (True, "confirm new", "lost", "done"),
    (False, "probe new", "unreachable", "is left unfinished"),
    (True, "vm undefine old", "unreachable", "done"),  # tidying is best effort
    (False, "read", "unreachable", "no replica answered"),
    (False, "write #2", "unreachable", "write reached 0 of 3 replicas"),
])
def test_a_rebuild_that_fails_at_each_step(forced: bool, failing: str, fault: str, end: str) -> None:
    w = world(record(), "running", False, forced)
    faults = {failing: fault}
    if failing == "probe new":
        faults = {"confirm new": "unreachable", "probe new": "unreachable"}
    outcome = run(rebuild(w.record, forced), w, faults)
    assert w.violations == [] and failing.split(" #")[0] in w.trace
    if end == "done":
        assert outcome == Done(True) and settled(w) == NEW
    else:
        assert isinstance(outcome, Refuse) and end in outcome.reason, outcome.reason
        if end == UNDONE:
            assert settled(w) == OLD and w.holders(DOMAIN) == {OLD: "running" if forced else "shutoff"}
    if failing in ("search", "reserve new", "write") and fault == "unreachable":
        assert w.record == record()  # refused before anything was written
    if (core := recovery(w)) is not None:  # the next attempt, everyone answering
        w.down.clear()
        assert isinstance(run(core, w), Done)
    settled(w)
    assert not any(h.reserved for h in w.hosts.values()) or failing == "write" and fault == "lost"
    assert w.violations == []


# --------------------------------------------------------------------------------------------------------
# Where the VM goes


def placed(w: World, core: Rebuild, faults: dict[str, str] | None = None) -> str:
    assert run(core, w, faults) == Done(True), w.trace
    return settled(w)


def test_the_old_hosts_site_comes_first_then_nearness_asking_every_member_for_it() -> None:
    w = world(record(), None, False, False, far=True)  # far sorts first: the nearest by the world's search
    assert placed(w, rebuild(w.record, False)) == NEW and w.trace[:2] == ["search", "reserve new"]
    w = world(record(), None, False, False, far=True)
    w.hosts[NEW].near = False  # only a search of every member finds it
    assert placed(w, rebuild(w.record, False)) == NEW and w.trace[:3] == ["search", "search all", "reserve new"]
    w = world(record(), None, False, False, far=True)
    del w.hosts[NEW]  # none in its site: the nearest elsewhere
    assert placed(w, rebuild(w.record, False)) == FAR and w.trace[:3] == ["search", "search all", "reserve far"]


def test_a_node_that_refuses_the_reservation_is_planned_without() -> None:
    w = world(record(), None, False, False, far=True)
    core = rebuild(w.record, False)
    assert placed(w, core, {"reserve new": "unreachable"}) == FAR
    assert w.trace[:4] == ["search", "reserve new", "search all", "reserve far"]
    assert core.notes == ["reservation of x on new refused: new: unreachable; planning again without it"]


def test_a_node_keeping_a_standby_copy_of_the_vm_is_not_chosen() -> None:
    w = world(replace(record(), standbys={VM: (Standby(NEW, "new:1", "rennes", 0.0),)}), None, False, False, far=True)
    assert placed(w, rebuild(w.record, False)) == FAR


def test_the_ve_keeps_its_constraints_with_its_other_vms() -> None:
    """y runs on new: anti-affinity sends x elsewhere; a site pin keeps it in its site, or refuses, naming why."""
    spec = VESpec(VE, (VMSpec("x", 1, 256), VMSpec("y", 1, 256)), constraints=Constraints(anti_affinity=(("x", "y"),)))
    value = record_of(VE, {"x": Slot(OLD, "old:1", "rennes", 1.0, "created"),
                           "y": Slot(NEW, "new:1", "rennes", 1.0, "created")})
    w = World({OLD: Host({DOMAIN: "running"}), NEW: Host({"rb:y": "running"}), FAR: Host(site="lyon")},
              replace(value, spec=spec))
    w.crash(OLD)
    assert placed(w, rebuild(w.record, False)) == FAR
    w = World({OLD: Host({DOMAIN: "running"}), NEW: Host({"rb:y": "running"}), FAR: Host(site="lyon")},
              replace(value, spec=replace(spec, site="rennes")))
    w.crash(OLD)
    end = run(rebuild(w.record, False), w)
    assert end == Refuse("cannot rebuild rb/x: new: anti-affinity [x, y]: x and y would share new; far: the VE is "
                         "pinned to site rennes; x would be in lyon")
    assert w.trace == ["search", "search all"] and w.holders(DOMAIN) == {OLD: "shutoff"}


def test_vms_of_one_rebuild_placed_later_do_not_bind_the_first() -> None:
    """x and y, kept together by affinity, are both on the dead host: x goes first, y (pending) not holding it
    back; then y must join x."""
    spec = VESpec(VE, (VMSpec("x", 1, 256), VMSpec("y", 1, 256)), constraints=Constraints(affinity=(("x", "y"),)))
    value = replace(record_of(VE, {vm: Slot(OLD, "old:1", "rennes", 1.0, "created") for vm in ("x", "y")}), spec=spec)
    w = World({OLD: Host({DOMAIN: "running", "rb:y": "running"}), NEW: Host(), FAR: Host(site="lyon")}, value)
    w.crash(OLD)
    assert run(rebuild(w.record, False), w) == Refuse(
        "cannot rebuild rb/x: new: affinity [x, y] keeps them on one node; they would be on new, old; far: affinity "
        "[x, y] keeps them on one node; they would be on far, old")
    assert run(rebuild(w.record, False, pending=("y",)), w) == Done(True) and w.record.placement["x"].node == NEW
    w.hosts[NEW].free = {"vcpus": 0, "memory_mb": 0, "disk_gb": 0}  # y cannot follow: refused, naming why
    end = run(rebuild(w.record, False, vm="y"), w)
    assert isinstance(end, Refuse) and end.reason.startswith(
        "cannot rebuild rb/y: far: affinity [x, y] keeps them on one node; they would be on far, new; no node has")
    w.hosts[NEW].free = {"vcpus": 8, "memory_mb": 8192, "disk_gb": 10}
    assert run(rebuild(w.record, False, vm="y"), w) == Done(True) and w.record.placement["y"].node == NEW
    assert w.holders("rb:y") == {OLD: "shutoff", NEW: "running"} and w.violations == []


# --------------------------------------------------------------------------------------------------------
# Properties over random runs

@st.composite
def schedules(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "forced": draw(st.booleans()),
        "image": draw(st.booleans()),
        "ve_state": draw(st.sampled_from(list(VM_STATE))),
        "faults": draw(st.lists(FAULTS, max_size=10)),
        "crash": draw(st.sampled_from([None, None, "crash"]).flatmap(
            lambda c: st.none() if c is None else st.tuples(st.integers(0, 8), st.booleans()))),
        "recoverers": draw(st.integers(0, 3)),
        "steps": draw(st.lists(st.tuples(st.integers(0, 3),
                                         st.sampled_from([None] * 16 + [OLD, NEW, FAR, DIRECTORY]), FAULTS),
                               min_size=10, max_size=60)),
        "conditional": draw(st.booleans()),  # the directory's writes: compare-and-set, or the last one wins
        "deaths": draw(st.lists(st.integers(0, 8), min_size=3, max_size=3)),
    }


WORKING = {Step.SEARCH, Step.RESERVE, Step.PREFETCH, Step.INTENT, Step.RELEASE, Step.SWITCH_OFF, Step.PAUSE,
           Step.CONFIRM}


@settings(max_examples=600, deadline=None)
@given(schedules())
def test_rebuilds_crashes_and_recoverers_in_any_interleaving(s: dict[str, Any]) -> None:
    """A coordinator whose calls fail at random and which may die at any step, then recoverers interleaved at
    random (the coordinator too, once it has confirmed or failed) while nodes and the directory come and go,
    then the next command with everyone answering: the VM never runs at two places, is never held by none of
    the nodes its record names, and ends where its record says, with no intent left and no copy but the old
    host's (off); where the coordinator reported a rebuild, it runs elsewhere (in its VE's state); where it
    reported it undone or refused it before its intent, it stays on the old host."""
    state = VM_STATE[s["ve_state"]]
    image = "tiny" if s["image"] else None
    w = world(record(s["ve_state"], image=image or "none"), state, False, s["forced"], far=True)
    w.conditional, w.seen[0] = s["conditional"], w.version
    coordinator = rebuild(w.record, s["forced"], image)
    action: Action = coordinator.start(0.0)
    outcome, crashed, _ = coordinate_then_interleave(w, coordinator, action, lambda c: c.step in WORKING,
                                                     s["crash"], s["faults"], s["recoverers"], s["steps"],
                                                     s["deaths"], recovery)
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
    if node != OLD:
        assert w.holders(DOMAIN)[node] == state and w.record.placement[VM].why.startswith("rebuilt")
    if not crashed and outcome == Done(True):
        assert node != OLD
    if not crashed and isinstance(outcome, Refuse) and (UNDONE in outcome.reason or "write" not in w.trace):
        assert node == OLD
