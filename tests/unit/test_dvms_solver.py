"""Tests for dvms.solver: every plan, replayed migration by migration, never takes a node over capacity nor
breaks a rule that held, and ends where `check` finds nothing (fixed VMs outside the partition counted);
CP-SAT's plans cost what a brute force finds best and its refusals are right; the greedy fallback's plans
hold too; intra-site moves win; cycles go through a pivot; impossible partitions are refused at once."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import replace
from unittest.mock import patch

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dvms import solver
from dvms.model import VM, Migration, Node, Plan, Rules
from dvms.solver import INTER_SITE_WEIGHT, Unorderable, apply, check, keeps_rules, order, predecessors, solve

OUTSIDE = {"o1": "A", "o2": "C"}  # nodes beyond the partition, where fixed VMs may run


def replay(nodes: Sequence[Node], vms: Sequence[VM], fixed: Sequence[VM], migrations: Sequence[Migration]) -> list[VM]:
    """Applies the migrations one by one, asserting each starts where its VM is and lands where there is room."""
    cap = {n.name: n for n in nodes}
    cpu = {n: 0 for n in cap}
    memory = {n: 0 for n in cap}
    for vm in [*vms, *fixed]:
        if vm.node in cap:
            cpu[vm.node] += vm.cpu
            memory[vm.node] += vm.memory_mb
    where = {vm.name: vm for vm in vms}
    for m in migrations:
        vm = where[m.vm]
        assert vm.node == m.source and m.target in cap and m.target != m.source and m.memory_mb == vm.memory_mb
        assert cpu[m.target] + vm.cpu <= cap[m.target].cpu, f"{m} overloads the CPU of {m.target}"
        assert memory[m.target] + vm.memory_mb <= cap[m.target].memory_mb, f"{m} overloads the memory of {m.target}"
        cpu[m.source] -= vm.cpu
        memory[m.source] -= vm.memory_mb
        cpu[m.target] += vm.cpu
        memory[m.target] += vm.memory_mb
        where[m.vm] = replace(vm, node=m.target)
    return list(where.values())


def weighted_mb(before: Sequence[VM], after: Sequence[VM], site_of: dict[str, str]) -> float:
    """Memory moved, inter-site moves weighted: what the solver minimises (pivots aside)."""
    now = {vm.name: vm.node for vm in after}
    return sum(vm.memory_mb * (1 if site_of[vm.node] == site_of[now[vm.name]] else INTER_SITE_WEIGHT)
               for vm in before if now[vm.name] != vm.node)


@st.composite
def instances(draw: st.DrawFn) -> dict:
    """A partition of 2-4 nodes on sites A and B, up to 5 movable VMs, up to 2 fixed ones (inside or out),
    two VEs with random rules."""
    nodes = [Node(f"n{i}", draw(st.sampled_from("AB")), draw(st.sampled_from([300, 400, 600])),
                  draw(st.sampled_from([2048, 4096, 8192]))) for i in range(draw(st.integers(2, 4)))]

    def vm(name: str, places: list[str]) -> VM:
        vcpus = draw(st.integers(1, 2))
        return VM(name, draw(st.sampled_from("ef")), draw(st.sampled_from(places)), vcpus,
                  draw(st.sampled_from([512, 1024, 1024, 2048])), 10 * draw(st.integers(0, 10 * vcpus)))

    names = [n.name for n in nodes]
    vms = [vm(f"v{i}", names) for i in range(draw(st.integers(1, 5)))]
    fixed = [vm(f"x{i}", [*OUTSIDE, *OUTSIDE, names[-1]]) for i in range(draw(st.integers(0, 2)))]
    rules = []
    for ve in "ef":
        movable = sorted(v.name for v in vms if v.ve == ve)
        mine = sorted(v.name for v in [*vms, *fixed] if v.ve == ve)
        if not mine:
            continue

        def group(names: list[str]) -> tuple[frozenset[str], ...]:
            if len(names) < 2:
                return ()
            return tuple(draw(st.lists(st.lists(st.sampled_from(names), min_size=2, max_size=2, unique=True)
                                       .map(frozenset), max_size=1)))

        together = group(movable)  # with a fixed VM, mostly hopeless: the tests below have such cases
        apart = [n for n in mine if not together or n not in sorted(together[0])[1:]]  # not both of a pair
        rules.append(Rules(
            ve,
            affinity=together,
            anti_affinity=group(apart),
            site=draw(st.sampled_from([None] * 6 + ["A", "B"])),
            same_site=draw(st.sampled_from([False] * 5 + [True])),
            spread_sites=draw(st.sampled_from([None] * 4 + [1, 2])),
            max_per_node=draw(st.sampled_from([None] * 4 + [1, 2])),
        ))
    evacuate = draw(st.sampled_from([(), (), (), (names[0],)]))
    return {"nodes": nodes, "vms": vms, "fixed": fixed, "rules": rules, "evacuate": evacuate}


def feasible_placements(inst: dict) -> list[list[VM]]:
    """Every placement of the movable VMs on the partition that breaks nothing (brute force)."""
    targets = [n.name for n in inst["nodes"] if n.name not in inst["evacuate"]]
    out = []
    for nodes in itertools.product(targets, repeat=len(inst["vms"])):
        after = [replace(vm, node=n) for vm, n in zip(inst["vms"], nodes, strict=True)]
        if not check(inst["nodes"], [*after, *inst["fixed"]], inst["rules"], sites=OUTSIDE):
            out.append(after)
    return out


def assert_steps_keep_rules(inst: dict, plan: Plan) -> None:
    """Every rule of a VE (affinity aside) that holds before the plan holds after each of its steps."""
    sites = {**OUTSIDE, **{n.name: n.site for n in inst["nodes"]}}
    where = {vm.name: vm for vm in [*inst["vms"], *inst["fixed"]]}
    rules = [replace(r, affinity=()) for r in inst["rules"]]
    kept = [r for r in rules if not check([], where.values(), [r], sites=sites)]
    for m in plan.migrations:
        where[m.vm] = replace(where[m.vm], node=m.target)
        assert check([], where.values(), kept, sites=sites) == [], (m, plan.migrations)


def assert_valid(inst: dict, plan: Plan) -> list[VM]:
    assert_steps_keep_rules(inst, plan)
    after = replay(inst["nodes"], inst["vms"], inst["fixed"], plan.migrations)
    assert check(inst["nodes"], [*after, *inst["fixed"]], inst["rules"], sites=OUTSIDE) == []
    assert not any(vm.node in inst["evacuate"] for vm in after)
    assert apply(inst["vms"], plan.migrations) == after
    return after


def run(inst: dict, **kw) -> Plan | None:
    return solve(inst["nodes"], inst["vms"], inst["rules"], kw.pop("time_limit", 5.0), fixed=inst["fixed"],
                 sites=OUTSIDE, evacuate=inst["evacuate"], **kw)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances())
def test_cp_sat_plans_hold_are_cheapest_and_its_refusals_are_right(inst: dict) -> None:
    plan = run(inst, engine="cp-sat")
    best = feasible_placements(inst)
    site_of = {n.name: n.site for n in inst["nodes"]}
    if plan is None:
        if best:  # a placement exists: CP-SAT's one must be one whose migrations cannot be ordered
            cost = min(weighted_mb(inst["vms"], b, site_of) for b in best)
            cheapest = [b for b in best if weighted_mb(inst["vms"], b, site_of) == cost]
            assert any(unorderable(inst, b) for b in cheapest)
        return
    assert plan.solver in ("cp-sat", "")
    after = assert_valid(inst, plan)
    assert best, "a plan where the brute force finds no placement"
    assert weighted_mb(inst["vms"], after, site_of) == min(weighted_mb(inst["vms"], b, site_of) for b in best)
    if plan.solver == "":
        assert plan.migrations == [] and inst["vms"] in best


def unorderable(inst: dict, after: list[VM]) -> bool:
    moves = [Migration(a.name, a.node, b.node, a.memory_mb) for a, b in zip(inst["vms"], after, strict=True)
             if a.node != b.node]
    pivots = {n.name for n in inst["nodes"]} - set(inst["evacuate"])
    try:
        order(Plan(moves), inst["nodes"], inst["vms"], fixed=inst["fixed"], pivots=pivots, rules=inst["rules"],
              sites=OUTSIDE)
    except Unorderable:
        return True
    return False


@settings(max_examples=200, deadline=None)
@given(instances())
def test_greedy_plans_hold_too_and_auto_is_no_worse(inst: dict) -> None:
    greedy = run(inst, time_limit=0)  # a zero time limit goes straight to the fallback
    auto = run(inst)
    site_of = {n.name: n.site for n in inst["nodes"]}
    if greedy is not None:
        assert greedy.solver in ("greedy", "")
        after = assert_valid(inst, greedy)
        assert auto is not None
        assert weighted_mb(inst["vms"], assert_valid(inst, auto), site_of) <= weighted_mb(inst["vms"], after, site_of)
    elif auto is not None:
        assert_valid(inst, auto)


@settings(max_examples=200, deadline=None)
@given(instances())
def test_large_problems_are_pruned_and_their_plans_hold(inst: dict) -> None:
    """Every problem counted as large, domains cut to one candidate: plans still hold, and only the VMs of
    nodes in trouble (over capacity, evacuated) or of VEs breaking a rule move, with their affinity peers."""
    with patch.multiple(solver, LARGE=0, CANDIDATES=1):
        plan = run(inst)
    if plan is None:
        return
    assert_valid(inst, plan)
    everything = [*inst["vms"], *inst["fixed"]]
    troubled = {line.split()[1] for line in check(inst["nodes"], everything, sites=OUTSIDE) if line.startswith("node")}
    broken = {r.ve for r in inst["rules"] if check([], everything, [r], sites=OUTSIDE)}
    peers = {n for r in inst["rules"] for g in r.affinity for n in g}
    for m in plan.migrations:
        vm = next(vm for vm in inst["vms"] if vm.name == m.vm)
        assert vm.node in troubled or vm.node in inst["evacuate"] or vm.ve in broken or vm.name in peers, m


def test_a_large_problem_leaves_healthy_nodes_alone() -> None:
    """The cheapest repair of a moves z off healthy b to make room for x; pruned, only a's VMs may move."""
    nodes = [Node("a", "A", 400, 16384), Node("b", "A", 400, 16384), Node("c", "A", 200, 16384)]
    vms = [VM("x", "e", "a", 3, 512, 300), VM("y", "f", "a", 2, 8192, 150), VM("z", "g", "b", 2, 512, 150)]
    full = solve(nodes, vms, [], 5.0)
    assert full is not None and {m.vm for m in full.migrations} == {"x", "z"}
    with patch.multiple(solver, LARGE=0):
        pruned = solve(nodes, vms, [], 5.0)
    assert pruned is not None and [m.vm for m in pruned.migrations] == ["y"]


@st.composite
def reorderings(draw: st.DrawFn) -> tuple[list[Node], list[VM], list[VM]]:
    """VMs before and after, both within capacity: an arbitrary plan to order."""
    nodes = [Node(f"n{i}", draw(st.sampled_from("AB")), 400, 4096) for i in range(draw(st.integers(2, 4)))]
    before, after = [], []
    for i in range(draw(st.integers(1, 8))):
        vm = VM(f"v{i}", "e", "", 1, draw(st.sampled_from([512, 1024, 2048])), draw(st.integers(0, 200)))
        before.append(replace(vm, node=draw(st.sampled_from(nodes)).name))
        after.append(replace(vm, node=draw(st.sampled_from(nodes)).name))
    return nodes, before, after


@settings(max_examples=150, deadline=None)
@given(reorderings())
def test_ordered_migrations_never_overload_a_node_on_the_way(case: tuple[list[Node], list[VM], list[VM]]) -> None:
    nodes, before, after = case
    spare = [Node(f"spare{s}", s, 10**6, 10**9) for s in "AB"]  # room for any pivot
    if check(nodes, after):
        return
    moves = Plan([Migration(a.name, a.node, b.node, a.memory_mb) for a, b in zip(before, after, strict=True)
                  if a.node != b.node])
    try:
        plan = order(moves, nodes, before)
    except Unorderable:
        pass
    else:
        assert replay(nodes, before, [], plan.migrations) == after
    plan = order(moves, [*nodes, *spare], before)  # with room somewhere, a cycle always breaks
    assert replay([*nodes, *spare], before, [], plan.migrations) == after


def test_a_swap_goes_through_a_pivot_or_is_reported() -> None:
    nodes = [Node("a", "A", 400, 2048), Node("b", "A", 400, 2048)]
    vms = [VM("v", "e", "a", 1, 2048, 50), VM("w", "e", "b", 1, 2048, 50)]
    swap = Plan([Migration("v", "a", "b", 2048), Migration("w", "b", "a", 2048)], "cp-sat")
    with pytest.raises(Unorderable, match="no node can take a pivot"):
        order(swap, nodes, vms)
    with pytest.raises(Unorderable):  # a pivot in another site would take the VM out of its site
        order(swap, [*nodes, Node("far", "B", 400, 4096)], vms)
    plan = order(swap, [*nodes, Node("c", "A", 400, 4096)], vms)
    assert [(m.vm, m.source, m.target) for m in plan.migrations] == [("v", "a", "c"), ("w", "b", "a"), ("v", "c", "b")]
    assert plan.solver == "cp-sat" and plan.moved_mb == 3 * 2048
    with pytest.raises(ValueError):
        order(Plan([Migration("v", "b", "a", 2048)]), nodes, vms)  # v is not on b


def test_no_step_breaks_a_rule_a_swap_of_anti_affine_vms_pivots() -> None:
    """Sim dvms, ring, seed 4: w must leave b before v joins it, though v relieves an overloaded node. An
    anti-affine swap (seed 3) goes through a third node, or is Unorderable (the partition grows)."""
    nodes = [Node("a", "A", 100, 8192), Node("b", "A", 400, 8192), Node("c", "A", 400, 8192)]
    v, w = VM("v", "e", "a", 2, 1024, 150), VM("w", "e", "b", 1, 1024, 50)
    apart = [Rules("e", anti_affinity=(frozenset({"v", "w"}),))]
    chain = Plan([Migration("v", "a", "b", 1024), Migration("w", "b", "c", 1024)])
    assert [m.vm for m in order(chain, nodes, [v, w]).migrations] == ["v", "w"]  # rules aside: a first
    assert [m.vm for m in order(chain, nodes, [v, w], rules=apart).migrations] == ["w", "v"]
    swap = Plan([Migration("v", "a", "b", 1024), Migration("w", "b", "a", 1024)])
    with pytest.raises(Unorderable, match="rules"):
        order(swap, nodes[:2], [v, w], rules=apart)
    plan = order(swap, nodes, [v, w], rules=apart)
    assert [(m.vm, m.target) for m in plan.migrations] == [("v", "c"), ("w", "a"), ("v", "b")]
    x = VM("x", "e", "c", 1, 512, 10)  # a fixed VM of the VE, anti-affine too, on the only other node
    rules = [Rules("e", anti_affinity=(frozenset({"v", "w", "x"}),))]
    with pytest.raises(Unorderable):
        order(swap, nodes, [v, w], fixed=[x], rules=rules)


def test_keeps_rules_allows_repairs_and_forbids_new_breaks() -> None:
    sites = {"a": "A", "b": "A", "c": "B", "d": "C"}
    three = [VM("u", "e", "a", 1, 512, 10), VM("v", "e", "a", 1, 512, 10), VM("w", "e", "c", 1, 512, 10)]
    r = Rules("e", anti_affinity=(frozenset({"u", "v", "w"}),), spread_sites=2, max_per_node=2, site=None)
    assert keeps_rules(r, three, "v", "b", sites)  # u and v shared a: a repair
    assert keeps_rules(r, three, "v", "d", sites)
    assert not keeps_rules(r, three, "w", "b", sites)  # one site left, where two sites were covered
    assert not keeps_rules(r, three, "w", "a", sites)  # a third VM on a: further broken
    pinned = Rules("e", site="A", same_site=True)
    assert keeps_rules(pinned, three, "w", "b", sites)  # back into its site
    assert not keeps_rules(pinned, three, "u", "d", sites)


def test_overloaded_sources_are_relieved_first() -> None:
    nodes = [Node("a", "A", 200, 8192), Node("b", "A", 200, 8192), Node("c", "A", 400, 8192)]
    vms = [VM("v", "e", "a", 2, 1024, 150), VM("w", "e", "a", 2, 1024, 150), VM("u", "e", "b", 1, 1024, 100)]
    plan = order(Plan([Migration("u", "b", "c", 1024), Migration("w", "a", "c", 1024)]), nodes, vms)
    assert [m.vm for m in plan.migrations] == ["w", "u"]


def test_an_intra_site_move_is_preferred_to_an_inter_site_one() -> None:
    nodes = [Node("a1", "A", 400, 8192), Node("b1", "B", 400, 8192), Node("a2", "A", 400, 8192)]
    vms = [VM("big", "e", "a1", 4, 2048, 300), VM("small", "e", "a1", 2, 1024, 150), VM("z", "f", "a2", 2, 1024, 100)]
    for engine in ("cp-sat", "greedy"):
        plan = solve(nodes, vms, [], 2.0, engine=engine)
        assert plan is not None and plan.solver == engine
        assert [(m.vm, m.target) for m in plan.migrations] == [("small", "a2")]


@pytest.mark.parametrize(("weight", "target"), [(4.0, "a2"), (2.0, "b1")])
def test_the_inter_site_weight_trades_memory_against_distance(weight: float, target: str) -> None:
    """Relieving a1 takes 3 GiB inside site A or 1 GiB to site B (light may not join g, which may not move):
    the weight decides."""
    nodes = [Node("a1", "A", 400, 8192), Node("a2", "A", 400, 8192), Node("b1", "B", 400, 8192)]
    vms = [VM("big", "e", "a1", 4, 3072, 300), VM("light", "e", "a1", 2, 1024, 150)]
    rules = [Rules("e", anti_affinity=(frozenset({"light", "g"}),))]
    plan = solve(nodes, vms, rules, 2.0, inter_site_weight=weight, fixed=[VM("g", "e", "a2", 1, 1024, 50)])
    assert plan is not None
    moved = {m.vm: m.target for m in plan.migrations}
    assert moved == ({"big": "a2"} if target == "a2" else {"light": "b1"})


def test_fixed_vms_outside_count_for_the_rules() -> None:
    nodes = [Node("a1", "A", 400, 8192), Node("a2", "A", 400, 8192), Node("b1", "B", 400, 8192)]
    vms = [VM("v1", "e", "a1", 2, 1024, 200), VM("v2", "e", "a1", 2, 2048, 250)]  # a1 overloaded
    spread = [Rules("e", spread_sites=2)]
    far = [VM("x", "e", "o2", 1, 512, 10)]  # the VE already covers site C
    plan = solve(nodes, vms, spread, 2.0, fixed=far, sites=OUTSIDE)
    assert plan is not None and [(m.vm, m.target) for m in plan.migrations] == [("v1", "a2")]
    near = [VM("x", "e", "o1", 1, 512, 10)]  # site A only: one VM must cover site B
    plan = solve(nodes, vms, spread, 2.0, fixed=near, sites=OUTSIDE)
    assert plan is not None and [(m.vm, m.target) for m in plan.migrations] == [("v1", "b1")]
    pinned = [Rules("e", site="A", max_per_node=1)]
    assert solve(nodes, vms, pinned, 2.0, fixed=near, sites=OUTSIDE).migrations == [Migration("v1", "a1", "a2", 1024)]
    with pytest.raises(ValueError):
        solve(nodes, vms, spread, 2.0, fixed=[VM("x", "e", "nowhere", 1, 512, 10)])


def test_impossible_partitions_are_refused_quickly() -> None:
    nodes = [Node("a", "A", 400, 8192), Node("b", "A", 400, 8192)]
    crowd = [VM(f"v{i}", "e", "a", 2, 1024, 200) for i in range(5)]  # 1000 % of CPU on 800
    t = time.monotonic()
    assert solve(nodes, crowd, [], 10.0) is None
    three = crowd[:3]  # 600 fits, but pairwise apart on two nodes does not
    assert solve(nodes, three, [Rules("e", anti_affinity=(frozenset(vm.name for vm in three),))], 10.0) is None
    assert solve(nodes, three, [Rules("e", site="B")], 10.0) is None
    assert solve(nodes, three[:1], [Rules("e", affinity=(frozenset({"v0", "x"}),))], 10.0,
                 fixed=[VM("x", "e", "o1", 1, 512, 10)], sites=OUTSIDE) is None  # its partner cannot come in
    assert time.monotonic() - t < 2.0


def test_nothing_to_do_and_evacuation() -> None:
    nodes = [Node("a", "A", 400, 8192), Node("b", "A", 400, 8192)]
    vms = [VM("v", "e", "a", 2, 1024, 100), VM("w", "e", "b", 2, 1024, 100)]
    plan = solve(nodes, vms, [], 1.0)
    assert plan is not None and plan.migrations == [] and plan.solver == ""
    for engine in ("cp-sat", "greedy"):
        plan = solve(nodes, vms, [], 1.0, evacuate={"a"}, engine=engine)
        assert plan is not None and plan.migrations == [Migration("v", "a", "b", 1024)]
    assert solve(nodes, vms, [Rules("e", max_per_node=1)], 1.0, evacuate={"a"}) is None


def test_affinity_groups_move_together() -> None:
    nodes = [Node("a", "A", 400, 8192), Node("b", "A", 400, 8192), Node("c", "A", 400, 8192)]
    vms = [VM("v", "e", "a", 2, 1024, 200), VM("w", "e", "a", 2, 1024, 150), VM("u", "f", "a", 1, 512, 100),
           VM("z", "f", "b", 4, 512, 300)]
    rules = [Rules("e", affinity=(frozenset({"v", "w"}),))]
    for engine in ("cp-sat", "greedy"):
        plan = solve(nodes, vms, rules, 2.0, engine=engine)
        assert plan is not None
        assert {m.vm: m.target for m in plan.migrations} in ({"u": "b"}, {"u": "c"})  # moving v and w costs more
        plan = solve(nodes, [*vms[:3], replace(vms[2], name="u2")], rules, 2.0, engine=engine)
        assert plan is not None  # 550 % on a: both f VMs, or the pair, must go
        after = apply([*vms[:3], replace(vms[2], name="u2")], plan.migrations)
        assert check(nodes, after, rules) == []


def test_check_names_each_broken_rule() -> None:
    nodes = [Node("a", "A", 100, 1024), Node("b", "B", 400, 8192)]
    vms = [VM("v", "e", "a", 2, 2048, 150), VM("w", "e", "a", 1, 512, 10), VM("u", "e", "b", 1, 512, 10),
           VM("x", "e", "o2", 1, 512, 10), VM("y", "e", "lost", 1, 512, 10)]
    rules = [Rules("e", affinity=(frozenset({"v", "u"}),), anti_affinity=(frozenset({"v", "w"}),), site="A",
                   same_site=True, spread_sites=4, max_per_node=1)]
    got = check(nodes, vms, rules, sites=OUTSIDE)
    assert got == [
        "vm y: on lost, a node of unknown site",
        "node a: CPU demand 160 > capacity 100",
        "node a: memory 2560 MB > capacity 1024 MB",
        "ve e: affinity {u, v} split over a, b",
        "ve e: anti-affinity {v, w}: v, w share a",
        "ve e: 2 VMs on a, max_per_node 1",
        "ve e: vm u on site B, pinned to A",
        "ve e: vm x on site C, pinned to A",
        "ve e: on sites A, B, C, not one (same_site)",
        "ve e: covers 3 site(s), spread_sites needs 4",
    ]
    assert check(nodes, [*vms[:1], vms[0]])[0] == "vm v: listed 2 times"
    with pytest.raises(ValueError, match="the VM is on a"):
        apply(vms, [Migration("v", "b", "a", 2048)])


def test_greedy_stands_in_when_cp_sat_has_no_time_and_cp_sat_wins_when_cheaper() -> None:
    nodes = [Node("a", "A", 400, 8192), Node("b", "A", 400, 8192)]
    vms = [VM("v", "e", "a", 2, 1024, 200), VM("w", "e", "a", 2, 1024, 150), VM("u", "f", "a", 1, 512, 100),
           VM("u2", "f", "a", 1, 512, 100)]  # 550 % on a
    rules = [Rules("e", affinity=(frozenset({"v", "w"}),))]
    hurried = solve(nodes, vms, rules, 1e-9)
    assert hurried is not None and hurried.solver == "greedy"
    assert hurried.moved_mb == 2048  # the one unit that relieves a alone: the pair
    best = solve(nodes, vms, rules, 5.0)
    assert best is not None and best.solver == "cp-sat" and best.moved_mb == 1024  # u and u2


def test_predecessors_serialize_per_node_and_per_ve() -> None:
    moves = [Migration("e:1", "a", "b", 1), Migration("f:1", "c", "d", 1), Migration("e:2", "x", "y", 1),
             Migration("f:2", "b", "c", 1), Migration("g:1", "p", "q", 1)]
    assert predecessors(moves) == [set(), set(), set(), {0, 1}, set()]
    ves = {m.vm: m.vm.split(":")[0] for m in moves}
    assert predecessors(moves, ves) == [set(), set(), {0}, {0, 1}, set()]  # e:2 waits for e:1, its VE's
