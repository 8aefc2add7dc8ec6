"""The DVMS campaign on a tiny cluster: both schedulers run, every plan checks, greedy runs repeat."""

import math

import pytest

from discovery import sim_dvms

TINY = {"nodes": 16, "vms_per_node": 4, "sites": 2, "duration": 120.0, "seed": 3, "node_vcpus": 4}


@pytest.mark.parametrize("scheduler", sim_dvms.SCHEDULERS)
def test_tiny_run_is_sane(scheduler):
    r = sim_dvms.run(scheduler=scheduler, **TINY, central_time_limit=0.5)
    assert r["scheduler"] == scheduler
    assert r["check_failures"] == []
    assert r["solves"] > 0  # 4 vCPU nodes at ~85 % load: overloads happen
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
