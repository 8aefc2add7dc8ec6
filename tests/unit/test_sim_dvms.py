"""The DVMS campaign on a tiny cluster: both schedulers run, every plan checks, greedy runs repeat."""

import math

import pytest

from dvms import sim as sim_dvms
from dvms.model import Migration, Node, Rules
from dvms.solver import check

TINY = {"nodes": 16, "vms_per_node": 5, "sites": 2, "duration": 120.0, "seed": 3, "node_vcpus": 4}


@pytest.mark.parametrize("scheduler", sim_dvms.SCHEDULERS)
def test_tiny_run_is_sane(scheduler):
    r = sim_dvms.run(scheduler=scheduler, **TINY, central_time_limit=0.5)
    assert r["scheduler"] == scheduler
    assert r["check_failures"] == []
    assert r["solves"] > 0  # 5 VMs at N(70, 30) on 4 vCPUs: 87.5 % load on average, overloads happen
    assert math.isfinite(r["overload_node_seconds"]) and r["overload_node_seconds"] >= 0
    assert r["overload_node_seconds"] <= TINY["nodes"] * TINY["duration"]
    assert r["migrations"] >= r["inter_site_migrations"] >= 0
    assert 0 <= r["inter_site_share"] <= 1
    assert all(e["solve_seconds"] >= 0 and e["apply_seconds"] >= 0 for e in r["events"])
    assert r["overloaded_nodes"][0][0] == 0 and all(0 <= k <= TINY["nodes"] for _, k in r["overloaded_nodes"])
    if scheduler == "dvms":
        assert r["partitions"]["protocol_violations"] == []
        assert all(2 <= e["nodes"] <= TINY["nodes"] for e in r["events"])


def test_dvms_repairs_and_repeats_with_greedy():
    runs = [sim_dvms.run(scheduler="dvms", **TINY, engine="greedy", virtual_solve_time=0.01) for _ in range(2)]
    assert runs[0]["migrations"] > 0
    assert runs[0]["migrations"] == runs[1]["migrations"]
    assert runs[0]["overload_node_seconds"] == runs[1]["overload_node_seconds"]


def test_rejects_unknown_scheduler():
    with pytest.raises(ValueError):
        sim_dvms.run(scheduler="nope", **TINY)


def test_a_node_runs_its_migrations_one_at_a_time_in_plan_order():
    sites = {"a": "s0", "b": "s0", "c": "s0", "d": "s0", "e": "s1"}
    moves = [Migration("v1", "a", "b", 1024), Migration("v2", "c", "d", 2048), Migration("v3", "b", "c", 1024),
             Migration("v4", "d", "e", 1024)]
    # v1 and v2 share no node: in parallel; v3 waits for both (b, c); v4 waits for v2 (d), 4x slower between sites
    assert sim_dvms._timeline(sites, moves, 1024.0) == [1.0, 2.0, 3.0, 2.0 + 4.0]


def test_spiral_partitions_migrate_inside_sites_ring_partitions_do_not():
    kw = {**TINY, "nodes": 48, "vms_per_node": 10, "node_vcpus": 8, "sites": 4, "engine": "greedy",
          "virtual_solve_time": 0.01}
    spiral, ring = (sim_dvms.run(scheduler="dvms", route=route, **kw) for route in sim_dvms.ROUTES)
    assert spiral["check_failures"] == ring["check_failures"] == []
    assert spiral["migrations"] > 0 and ring["migrations"] > 0
    assert ring["inter_site_share"] > 0.5  # 3 successors in 4 are in another site
    assert spiral["inter_site_share"] < 0.3 * ring["inter_site_share"]


def test_underloaded_nodes_are_emptied_without_breaking_a_rule():
    kw = {**TINY, "vms_per_node": 2, "mean": 30.0, "std": 10.0, "engine": "greedy", "virtual_solve_time": 0.01}
    plain = sim_dvms.run(scheduler="dvms", **kw)
    consolidated = sim_dvms.run(scheduler="dvms", underload=0.3, **kw)
    assert consolidated["check_failures"] == [] and consolidated["partitions"]["protocol_violations"] == []
    assert any(e["kind"] == "underload" and e["applied"] for e in consolidated["events"])
    assert consolidated["empty_nodes_at_end"] > plain["empty_nodes_at_end"]


def test_a_landing_that_would_break_a_rule_is_refused_and_cuts_its_plan():
    """Two partitions solve at once, each with the other's VM of the VE fixed where it is (spread over 2 sites,
    s0 and s1), and each moves its own to site s2: each plan holds on its own view, together they would
    leave the VE in one site. The second landing is refused (the VM stays), as ve.relocate would refuse it."""
    cluster = sim_dvms._Cluster(6, 1, 3, 1, 2, 4)  # vm00000k on n000k, site s(k % 3); VEs of 2 VMs
    rule = Rules("ve00000", anti_affinity=(frozenset({"vm000000", "vm000001"}),), spread_sites=2)
    cluster.rules["ve00000"] = rule
    for vm in ("vm000000", "vm000001"):
        cluster.set_demand(0.0, vm, 100)
    small = {name: Node(name, cluster.site_of[name], 50, 32 * 1024) for name in ("n0000", "n0001")}
    plans = [cluster.solve([small["n0000"], cluster.by_name["n0002"]], 1.0, "greedy", 1),
             cluster.solve([small["n0001"], cluster.by_name["n0005"]], 1.0, "greedy", 1)]
    assert [[(m.vm, m.target) for m in p.migrations] for p in plans] == [[("vm000000", "n0002")],
                                                                         [("vm000001", "n0005")]]
    landings = sim_dvms._Landings(cluster, lambda node, now: None)
    for p in plans:
        landings.start(0.0, p.migrations, sim_dvms._spans(cluster.site_of, p.migrations, 1024.0))
    while landings.heap:
        landings.land()
    assert cluster.migrations == 1 and cluster.refused == 1 and cluster.failures == []
    assert check([], [cluster.vms["vm000000"], cluster.vms["vm000001"]], [rule], sites=cluster.site_of) == []
    # a refused landing drops what waits for it in its plan (here the move into the node it would have left)
    at = {vm: cluster.vms[vm].node for vm in ("vm000000", "vm000001")}
    plan = [Migration("vm000001", at["vm000001"], at["vm000000"], 4096),  # joins its anti-affine peer: refused
            Migration("vm000003", "n0003", at["vm000001"], 4096),  # waits for it (shares its source): dropped
            Migration("vm000004", "n0004", "n0003", 1024)]  # waits for the one dropped: dropped
    landings.start(10.0, plan, sim_dvms._spans(cluster.site_of, plan, 1024.0))
    while landings.heap:
        landings.land()
    assert (cluster.refused, cluster.dropped, cluster.migrations) == (2, 2, 1) and cluster.failures == []
    assert cluster.vms["vm000003"].node == "n0003" and cluster.vms["vm000004"].node == "n0004"
