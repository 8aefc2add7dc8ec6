"""Concurrent DVMS partitions moving VMs of one VE. Each partition solves on its own view: the VE's VMs outside
it fixed where they were when it solved, a view that the other partitions' moves make stale. The plans then
run interleaved, in any order their `predecessors` allow (a node, and a VE, one migration at a time), each
possibly cut at its deadline; every migration is re-checked against the live placement before it takes
effect (`keeps_rules`, as the simulator does and as `ve.relocate` checks the VE's record), and a refused one
drops the migrations of its plan that wait for it. Then the VE keeps its rules at every moment, no node goes
over capacity (beyond what it held at the start), and a plan never needs the re-check for its own moves:
each of its steps keeps the rules on its own view (`order`), so only another partition's move can make one
step refused."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dvms.model import VM, Node, Plan, Rules
from dvms.solver import _loads, check, keeps_rules, predecessors, solve

SITES = "ABC"


@st.composite
def clusters(draw: st.DrawFn) -> dict:
    """2-3 partitions of 2-3 nodes on sites A-C. One VE "e": a VM on the first node of each partition (a small
    node, which often has to shed it), 0-2 more anywhere, with random anti-affinity, spread_sites (often as
    many sites as it covers: no VM may join another's site) and max_per_node, kept at the start; other VMs,
    without rules, that load the nodes. The first nodes are out of one site, the hub, where the other nodes
    often are: VMs of the VE from several partitions may all go there."""
    hub = draw(st.sampled_from(SITES))
    nodes: list[Node] = []
    partitions: list[list[str]] = []
    for _ in range(draw(st.integers(2, 3))):
        size = draw(st.integers(2, 3))
        partitions.append([f"n{len(nodes) + i}" for i in range(size)])
        nodes.append(Node(partitions[-1][0], draw(st.sampled_from([x for x in SITES if x != hub])),
                          draw(st.sampled_from([40, 100])), 8192))
        nodes += [Node(name, draw(st.sampled_from([hub, hub, hub, hub, *SITES])), draw(st.sampled_from([200, 400])),
                       8192) for name in partitions[-1][1:]]
    names = [n.name for n in nodes]

    def vm(name: str, ve: str, node: str) -> VM:
        vcpus = draw(st.integers(1, 2))
        memory = draw(st.sampled_from([512, 1024, 2048]))
        return VM(name, ve, node, vcpus, memory, 10 * draw(st.integers(5 * vcpus, 10 * vcpus)))

    homes = [p[0] for p in partitions] + draw(st.lists(st.sampled_from(names), max_size=2))
    ve = [vm(f"e{i}", "e", node) for i, node in enumerate(homes)]
    others = [vm(f"f{i}", f"f{i}", draw(st.sampled_from(names))) for i in range(draw(st.integers(0, 5)))]
    site_of = {n.name: n.site for n in nodes}
    covered = len({site_of[node] for node in homes})
    apart = draw(st.lists(st.sampled_from([v.name for v in ve]), min_size=2, unique=True))
    rule = Rules("e", anti_affinity=(frozenset(apart),),
                 spread_sites=draw(st.sampled_from([None, covered - 1, covered, covered, covered])),
                 max_per_node=draw(st.sampled_from([None, None, 1, 2])))
    assume(not check([], ve, [rule], sites=site_of))  # the VE keeps its rules at the start
    return {"nodes": nodes, "partitions": partitions, "vms": [*ve, *others], "rule": rule, "site_of": site_of,
            "engine": draw(st.sampled_from(["greedy", "auto"]))}


def dependents(preds: list[set[int]], i: int) -> set[int]:
    """i and the migrations that wait for it, directly or not."""
    out = {i}
    for j in range(i + 1, len(preds)):
        if preds[j] & out:
            out.add(j)
    return out


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(clusters(), st.data())
def test_concurrent_partitions_moving_vms_of_one_ve_never_break_its_rules(c: dict, data: st.DataObject) -> None:
    nodes, rule, site_of = c["nodes"], c["rule"], c["site_of"]
    by_node = {n.name: n for n in nodes}
    plans: list[Plan] = []
    views: list[dict[str, VM]] = []  # each partition's view of the VE when it solved
    for members in c["partitions"]:
        mine = [vm for vm in c["vms"] if vm.node in members]
        fixed = [vm for vm in c["vms"] if vm.ve == "e" and vm.node not in members]
        plan = solve([by_node[n] for n in members], mine, [rule], 1.0, fixed=fixed, sites=site_of,
                     engine=c["engine"])
        plans.append(plan or Plan())
        views.append({vm.name: vm for vm in [*mine, *fixed] if vm.ve == "e"})
    live = {vm.name: vm for vm in c["vms"]}
    cpu0, memory0 = _loads(c["vms"])
    preds = [predecessors(p.migrations, {m.vm: live[m.vm].ve for m in p.migrations}) for p in plans]
    cut = [data.draw(st.one_of(st.just(len(p.migrations)), st.integers(0, len(p.migrations))),
                     label="migrations before the deadline") for p in plans]
    landed: list[set[int]] = [set() for _ in plans]
    dropped: list[set[int]] = [set() for _ in plans]
    while True:
        ready = [(k, i) for k, p in enumerate(plans) for i in range(cut[k])
                 if i not in landed[k] | dropped[k] and preds[k][i] <= landed[k]]
        if not ready:
            break
        k, i = data.draw(st.sampled_from(ready), label="next migration to take effect")
        m = plans[k].migrations[i]
        vm = live[m.vm]
        assert vm.node == m.source, m
        if vm.ve == "e":
            # the plan alone never breaks a rule: each step keeps them on the partition's own view
            assert keeps_rules(rule, views[k].values(), m.vm, m.target, site_of), (m, plans[k].migrations)
            views[k][m.vm] = replace(views[k][m.vm], node=m.target)
            if not keeps_rules(rule, [v for v in live.values() if v.ve == "e"], m.vm, m.target, site_of):
                dropped[k] |= dependents(preds[k], i)  # refused: another partition moved a VM of the VE
                continue
        live[m.vm] = replace(vm, node=m.target)
        landed[k].add(i)
        assert check([], [v for v in live.values() if v.ve == "e"], [rule], sites=site_of) == [], (m, plans)
        cpu, memory = _loads(live.values())
        for n in (m.source, m.target):
            assert cpu[n] <= max(by_node[n].cpu, cpu0[n]) and memory[n] <= max(by_node[n].memory_mb, memory0[n])
