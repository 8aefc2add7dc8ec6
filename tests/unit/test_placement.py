"""Tests for discovery.ve.placement: plans honour capacity and every constraint, refusals are never wrong
(a brute force over small instances confirms that nothing fits), nearer candidates win, and reasons read well."""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from discovery.ve.placement import Candidate, Plan, Refusal, check_placement, plan
from discovery.ve.spec import Constraints, SpecError, VESpec, VMSpec

SITES = ("lyon", "nancy", "rennes")


def node(name: str, site: str = "lyon", vcpus: int = 64, memory_mb: int = 65536, disk_gb: int = 1000,
         rank: float = 0) -> Candidate:
    return Candidate(name, site, vcpus, memory_mb, disk_gb, rank)


def ve(*vms: tuple[str, int, int], site: str | None = None, **constraints: Any) -> VESpec:
    """A spec through the validator, from (name, vcpus, memory_mb) VMs of 1 GiB disk."""
    data: dict[str, Any] = {"name": "ve", "site": site,
                            "vms": [{"name": n, "vcpus": v, "memory_mb": m} for n, v, m in vms]}
    if constraints:
        data["constraints"] = constraints
    return VESpec.from_dict(data)


def small(*names: str) -> list[tuple[str, int, int]]:
    return [(name, 1, 16) for name in names]


def violations(spec: VESpec, candidates: Sequence[Candidate], assignment: dict[str, str]) -> list[str]:
    """What an assignment breaks, checked directly from the definitions (independent of the planner)."""
    nodes = {c.node: c for c in candidates}
    vms = {vm.name: vm for vm in spec.vms}
    c = spec.constraints
    if set(assignment) != set(vms):
        return ["not every VM is placed once"]
    if any(n not in nodes for n in assignment.values()):
        return ["a VM is on a node that is not a candidate"]
    broken = []
    for name, cand in nodes.items():
        here = [vms[v] for v, n in assignment.items() if n == name]
        if (sum(v.vcpus for v in here) > cand.vcpus or sum(v.memory_mb for v in here) > cand.memory_mb
                or sum(v.disk_gb for v in here) > cand.disk_gb):
            broken.append(f"capacity of {name}")
        if c.max_per_node is not None and len(here) > c.max_per_node:
            broken.append(f"max_per_node on {name}")
    sites = {nodes[n].site for n in assignment.values()}
    if spec.site is not None and sites != {spec.site}:
        broken.append("pinned site")
    if c.same_site and len(sites) > 1:
        broken.append("same_site")
    if c.spread_sites is not None and len(sites) < c.spread_sites:
        broken.append("spread_sites")
    for group in c.affinity:
        if len({assignment[v] for v in group}) > 1:
            broken.append(f"affinity {group}")
    for group in c.anti_affinity:
        if len({assignment[v] for v in group}) < len(group):
            broken.append(f"anti-affinity {group}")
    return broken


def brute_force(spec: VESpec, candidates: Sequence[Candidate]) -> list[dict[str, str]]:
    """Every valid assignment."""
    names = [vm.name for vm in spec.vms]
    nodes = [c.node for c in candidates]
    return [a for choice in itertools.product(nodes, repeat=len(names))
            if not violations(spec, candidates, a := dict(zip(names, choice, strict=True)))]


def preference(p: Plan, candidates: Sequence[Candidate]) -> list[tuple[float, str]]:
    return preference_of(p.assignment, list(p.assignment), candidates)


def preference_of(assignment: dict[str, str], order: list[str],
                  candidates: Sequence[Candidate]) -> list[tuple[float, str]]:
    rank = {c.node: c.rank for c in candidates}
    return [(rank[assignment[vm]], assignment[vm]) for vm in order]


def assert_one_line(result: Plan | Refusal) -> str:
    assert isinstance(result, Refusal), result
    assert "\n" not in result.reason and result.reason == str(result)
    return result.reason


# -- random instances ------------------------------------------------------------------------------


@st.composite
def specs(draw: st.DrawFn, max_vms: int) -> VESpec:
    count = draw(st.integers(1, max_vms))
    names = [f"v{i}" for i in range(count)]
    vms = [{"name": name, "vcpus": draw(st.integers(1, 4)), "memory_mb": draw(st.sampled_from([16, 32, 64])),
            "disk_gb": draw(st.integers(0, 2))} for name in names]
    constraints: dict[str, Any] = {}
    groups = st.lists(st.lists(st.sampled_from(names), min_size=2, max_size=3, unique=True), max_size=2)
    if count >= 2 and draw(st.booleans()):
        constraints["affinity"] = draw(groups)
    if count >= 2 and draw(st.booleans()):
        constraints["anti_affinity"] = draw(groups)
    if draw(st.integers(0, 3)) == 0:
        constraints["same_site"] = True
    if draw(st.booleans()):
        constraints["spread_sites"] = draw(st.integers(1, min(count, 3)))
    if draw(st.booleans()):
        constraints["max_per_node"] = draw(st.integers(1, 3))
    site = draw(st.sampled_from(SITES)) if draw(st.integers(0, 4)) == 0 else None
    try:
        return VESpec.from_dict({"name": "ve", "site": site, "vms": vms, "constraints": constraints})
    except SpecError:
        assume(False)
        raise


@st.composite
def candidate_sets(draw: st.DrawFn, max_nodes: int, vcpus: int = 10) -> list[Candidate]:
    count = draw(st.integers(1, max_nodes))
    return [Candidate(f"n{i}", draw(st.sampled_from(SITES)), draw(st.integers(0, vcpus)),
                      draw(st.sampled_from([16, 32, 64, 128, 256])), draw(st.integers(0, 6)),
                      draw(st.integers(0, 4)))
            for i in range(count)]


@settings(max_examples=400, deadline=None)
@given(specs(max_vms=5), candidate_sets(max_nodes=5), st.sets(st.sampled_from([f"n{i}" for i in range(5)]), max_size=1))
def test_small_instances_against_brute_force(spec: VESpec, candidates: list[Candidate], exclude: set[str]) -> None:
    """A plan is valid and the best in its order; a refusal is right (nothing fits) and names a cause."""
    result = plan(spec, candidates, exclude=exclude)
    usable = [c for c in candidates if c.node not in exclude]
    valid = brute_force(spec, usable)
    if isinstance(result, Refusal):
        reason = assert_one_line(result)
        assert not valid, f"refused ({reason}) but {valid[0]} fits"
        assert not reason.startswith("search limit")
        return
    assert violations(spec, usable, result.assignment) == []
    order = list(result.assignment)
    assert preference(result, usable) == min(preference_of(a, order, usable) for a in valid)


@settings(max_examples=150, deadline=None)
@given(specs(max_vms=12), candidate_sets(max_nodes=30, vcpus=16))
def test_every_plan_honours_capacity_and_constraints(spec: VESpec, candidates: list[Candidate]) -> None:
    result = plan(spec, candidates)
    if isinstance(result, Plan):
        assert violations(spec, candidates, result.assignment) == []
    else:
        assert_one_line(result)


# -- preference ------------------------------------------------------------------------------------


def test_without_constraints_every_vm_lands_on_the_nearest_node() -> None:
    spec = ve(("db", 8, 16384), ("app", 4, 8192), ("front", 2, 2048))
    candidates = [node("far", rank=3), node("near", rank=0), node("mid", rank=1)]
    assert plan(spec, candidates) == Plan({"db": "near", "app": "near", "front": "near"})


def test_vms_overflow_to_the_next_nearest_largest_first() -> None:
    spec = ve(("front", 2, 2048), ("db", 8, 16384), ("app", 4, 8192))
    candidates = [node("near", vcpus=10, rank=0), node("mid", rank=1), node("far", rank=2)]
    result = plan(spec, candidates)
    assert isinstance(result, Plan)
    assert list(result.assignment) == ["db", "app", "front"]
    assert result.assignment == {"db": "near", "app": "mid", "front": "near"}
    assert result.by_node() == {"near": ["db", "front"], "mid": ["app"]}


def test_equal_ranks_are_broken_by_node_name() -> None:
    assert plan(ve(*small("a")), [node("b"), node("a")]) == Plan({"a": "a"})


def test_excluded_nodes_are_not_used() -> None:
    spec = ve(*small("a", "b"))
    candidates = [node("near", rank=0), node("mid", rank=1), node("far", rank=2)]
    assert plan(spec, candidates, exclude={"near"}) == Plan({"a": "mid", "b": "mid"})
    assert str(plan(spec, candidates, exclude={"near", "mid", "far"})) == "no candidate nodes"


def test_duplicate_candidates_are_a_caller_error() -> None:
    with pytest.raises(ValueError, match="more than once"):
        plan(ve(*small("a")), [node("x"), node("x", rank=1)])


def test_pinned_site_keeps_its_candidates_only() -> None:
    spec = ve(*small("a"), site="nancy")
    assert plan(spec, [node("l", "lyon", rank=0), node("n", "nancy", rank=5)]) == Plan({"a": "n"})
    assert str(plan(spec, [node("l", "lyon")])) == "no candidate node in site nancy (candidates are in lyon)"


def test_same_site_picks_the_site_of_the_best_plan() -> None:
    spec = ve(("big", 8, 1024), ("small", 1, 16), same_site=True)
    candidates = [node("l1", "lyon", vcpus=8, rank=0), node("n1", "nancy", vcpus=16, rank=1),
                  node("l2", "lyon", vcpus=0, rank=2)]
    assert plan(spec, candidates) == Plan({"big": "n1", "small": "n1"})
    candidates.append(node("l3", "lyon", vcpus=1, rank=3))
    assert plan(spec, candidates) == Plan({"big": "l1", "small": "l3"})


def test_anti_affinity_and_max_per_node_spread_over_nodes() -> None:
    spec = ve(*small("a", "b", "c", "d"), anti_affinity=[["a", "b"]], max_per_node=2)
    candidates = [node(f"n{i}", rank=i) for i in range(4)]
    assert plan(spec, candidates) == Plan({"a": "n0", "b": "n1", "c": "n0", "d": "n1"})


def test_spread_puts_the_smallest_vms_on_the_farther_sites() -> None:
    spec = ve(("db", 8, 1024), ("app", 4, 1024), ("front", 2, 1024), spread_sites=3)
    candidates = [node("l", "lyon", rank=0), node("n", "nancy", rank=1), node("r", "rennes", rank=2)]
    assert plan(spec, candidates) == Plan({"db": "l", "app": "n", "front": "r"})


def test_spread_is_reached_when_only_a_large_vm_fits_the_other_site() -> None:
    spec = ve(("db", 8, 1024), ("app", 1, 2048), ("front", 1, 2048), spread_sites=2)
    candidates = [node("l", "lyon", rank=0), node("n", "nancy", vcpus=8, memory_mb=1024, rank=1)]
    assert plan(spec, candidates) == Plan({"db": "n", "app": "l", "front": "l"})


def test_affinity_groups_sharing_a_vm_are_merged() -> None:
    spec = ve(*small("a", "b", "c", "d"), affinity=[["a", "b"], ["c", "b"]])
    result = plan(spec, [node("x", vcpus=2, rank=0), node("y", vcpus=3, rank=1)])
    assert result == Plan({"a": "y", "b": "y", "c": "y", "d": "x"})


def test_hand_built_contradictions_are_refused() -> None:
    vms = tuple(VMSpec(n, 1, 16) for n in "abc")
    both = VESpec("x", vms, constraints=Constraints(affinity=(("a", "b"),), anti_affinity=(("b", "a"),)))
    assert str(plan(both, [node("n")])) == "anti-affinity [b, a] names VMs that must share a node"
    unknown = VESpec("x", vms, constraints=Constraints(anti_affinity=(("a", "z"),)))
    assert str(plan(unknown, [node("n")])) == "the constraints name vm z, which the VE does not have"
    crowded = VESpec("x", vms, constraints=Constraints(affinity=(("a", "b", "c"),), max_per_node=2))
    assert str(plan(crowded, [node("n")])) == "affinity [a, b, c] puts 3 VMs on one node, more than max_per_node 2"


# -- reasons ---------------------------------------------------------------------------------------


def test_reason_single_vm_too_big_for_the_pinned_site() -> None:
    spec = ve(("front", 1, 16), ("db", 4, 1024), site="lyon")
    candidates = [node("l1", "lyon", vcpus=2), node("l2", "lyon", vcpus=1), node("n", "nancy")]
    assert str(plan(spec, candidates)) == "no node in site lyon has 4 vCPUs free for vm db; the most free is 2 vCPUs"


def test_reason_names_every_missing_dimension() -> None:
    spec = ve(("db", 4, 8192))
    reason = str(plan(spec, [node("a", vcpus=2, memory_mb=4096), node("b", vcpus=1, memory_mb=6000)]))
    assert reason == ("no node has 4 vCPUs and 8192 MiB memory free for vm db; "
                      "the most free is 2 vCPUs and 6000 MiB memory")
    reason = str(plan(spec, [node("a", vcpus=2), node("b", memory_mb=1024)]))
    assert reason == "no node has 4 vCPUs, 8192 MiB memory and 1 GiB disk free at once for vm db"


def test_reason_anti_affinity() -> None:
    spec = ve(*small("a", "b", "c"), anti_affinity=[["a", "b", "c"]])
    reason = str(plan(spec, [node("x"), node("y"), node("full", vcpus=0)]))
    assert reason == "anti-affinity [a, b, c] needs 3 nodes with room; only 2 have"


def test_reason_spread() -> None:
    spec = ve(*small("a", "b", "c"), spread_sites=3)
    candidates = [node("l", "lyon"), node("n", "nancy"), node("r", "rennes", memory_mb=0)]
    assert str(plan(spec, candidates)) == "spread over 3 sites needs 3 sites with room; sites with room: lyon, nancy"


def test_reason_spread_when_sites_have_room_for_one_vm_only() -> None:
    spec = ve(("big", 8, 16), ("a", 1, 16), spread_sites=2)
    candidates = [node("l", "lyon", vcpus=8), node("n", "nancy", vcpus=8, rank=1)]
    assert plan(spec, candidates) == Plan({"big": "l", "a": "n"})
    spec = ve(("big", 8, 16), ("big2", 8, 16), ("a", 1, 16), spread_sites=3)
    candidates = [node("l", "lyon"), node("n", "nancy", vcpus=1), node("r", "rennes", vcpus=1)]
    assert str(plan(spec, candidates)) == ("spread over 3 sites needs 3 sites with room; sites with room: "
                                           "lyon, nancy, rennes (only 2 can each take a different VM)")


def test_reason_affinity() -> None:
    spec = ve(("app", 2, 4096), ("db", 4, 8192), affinity=[["app", "db"]])
    reason = str(plan(spec, [node("a", vcpus=4), node("b", vcpus=3)]))
    assert reason == ("affinity [app, db] needs one node with 6 vCPUs and 12288 MiB memory free; "
                      "the most free is 4 vCPUs")


def test_reason_max_per_node() -> None:
    spec = ve(*small("a", "b", "c", "d", "e"), max_per_node=2)
    reason = str(plan(spec, [node("x"), node("y"), node("full", memory_mb=0)]))
    assert reason == "max_per_node 2 needs at least 3 nodes with room for 5 VMs; only 2 have"


def test_reason_total_room() -> None:
    spec = ve(("a", 3, 16), ("b", 3, 16), ("c", 3, 16))
    reason = str(plan(spec, [node("x", vcpus=4), node("y", vcpus=4)]))
    assert reason == "the VE needs 9 vCPUs in total; the nodes with room have 8 vCPUs free"


def test_reason_when_only_the_combination_fails() -> None:
    spec = ve(("a", 2, 16), ("b", 1, 64), ("c", 1, 64))
    reason = str(plan(spec, [node("x", vcpus=3, memory_mb=64), node("y", vcpus=1, memory_mb=80)]))
    assert reason == ("the VMs do not fit together on the nodes: largest first, vm c found no node "
                      "after 2 of 3 VMs were placed")
    spec = ve(*small("a", "b", "c"), anti_affinity=[["a", "b"], ["b", "c"], ["a", "c"]], max_per_node=2)
    reason = str(plan(spec, [node("x"), node("y")]))
    assert reason == ("no placement meets capacity and the constraints (anti-affinity, max_per_node 2) "
                      "together: largest first, vm c found no node after 2 of 3 VMs were placed")


def test_reason_when_each_node_holds_too_few() -> None:
    spec = ve(*[(f"v{i}", 5, 1024) for i in range(4)])
    reason = str(plan(spec, [node("x", vcpus=9), node("y", vcpus=12), node("z", vcpus=4)]))
    assert reason == ("at most 3 of the 4 VMs fit on the nodes at once "
                      "(each needs 5 vCPUs, 1024 MiB memory and 1 GiB disk)")


def test_reason_same_site_lists_each_site() -> None:
    spec = ve(*small("a", "b"), same_site=True, anti_affinity=[["a", "b"]])
    assert str(plan(spec, [node("l", "lyon"), node("n", "nancy")])) == (
        "same_site: no site can host all 2 VMs: lyon: anti-affinity [a, b] needs 2 nodes with room; only 1 have"
        " / nancy: anti-affinity [a, b] needs 2 nodes with room; only 1 have")
    assert str(plan(spec, [node("l", "lyon")])) == (
        "anti-affinity [a, b] needs 2 nodes in site lyon with room; only 1 have")


def test_search_limit_is_a_refusal() -> None:
    """Twenty VMs of 5 vCPUs and 19 nodes that take one each: every simple bound holds, and nodes that all
    differ (memory) defeat the pruning of identical nodes, so the search runs out of tries."""
    spec = ve(*[(f"v{i}", 5, 16) for i in range(20)], ("small", 1, 16))
    candidates = [node(f"n{i}", vcpus=8 + i % 2, memory_mb=65536 + i, rank=i) for i in range(19)]
    reason = str(plan(spec, candidates, limit=1000))
    assert reason.startswith("search limit: no placement found in 1000 tries")


# -- scale -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("constraints", [
    {},
    {"anti_affinity": [[f"v{i}" for i in range(64)]]},
    {"max_per_node": 1},
    {"spread_sites": 5},
    {"same_site": True},
    {"affinity": [["v1", "v2", "v3"], ["v10", "v11"]], "anti_affinity": [["v1", "v10", "v20"]], "max_per_node": 4,
     "spread_sites": 3},
])
def test_64_vms_on_1000_candidates_is_fast(constraints: dict[str, Any]) -> None:
    spec = ve(*[(f"v{i}", 1 + i % 8, 512 * (1 + i % 5)) for i in range(64)], **constraints)
    candidates = [node(f"n{i}", SITES[i % 3] if i % 7 else f"s{i % 5}", vcpus=4 + i % 29, memory_mb=2048 * (1 + i % 13),
                       rank=(i * 7919) % 1000) for i in range(1000)]
    start = time.perf_counter()
    result = plan(spec, candidates)
    elapsed = time.perf_counter() - start
    assert isinstance(result, Plan), result
    assert violations(spec, candidates, result.assignment) == []
    assert elapsed < 1.0
    if not constraints:
        assert Counter(result.assignment.values()).most_common(1)[0][1] > 1


def test_a_placement_of_some_vms_is_checked_for_what_they_can_already_break() -> None:
    """A rebuild places one VM while others of its VE wait their turn: groups count their placed members, and a
    spread over sites is judged on the whole VE only."""
    spec = ve(*small("a", "b", "c"), anti_affinity=[["a", "b"]], spread_sites=2, max_per_node=2)
    sites = {"n1": "lyon", "n2": "lyon", "n3": "nancy"}
    assert check_placement(spec, {"a": "n1"}, sites) is None
    assert check_placement(spec, {"a": "n1", "b": "n1"}, sites) == "anti-affinity [a, b]: a and b would share n1"
    assert check_placement(spec, {"a": "n1", "b": "n2"}, sites) is None  # one site so far: c may still spread it
    assert check_placement(spec, {"a": "n1", "b": "n2", "c": "n2"}, sites) == (
        "spread over 2 sites: the VMs would cover only 1 (lyon)")
    assert check_placement(spec, {"a": "n1", "b": "n2", "c": "n3"}, sites) is None
    together = ve(*small("a", "b", "c"), affinity=[["a", "b"]])
    assert check_placement(together, {"a": "n1", "c": "n2"}, sites) is None
    assert check_placement(together, {"a": "n1", "b": "n2"}, sites) == (
        "affinity [a, b] keeps them on one node; they would be on n1, n2")
