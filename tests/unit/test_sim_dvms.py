"""The DVMS campaign on a tiny cluster: both schedulers run, every plan checks, greedy runs repeat."""

import math

import pytest

from dvms import sim as sim_dvms
from dvms.model import Migration

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
