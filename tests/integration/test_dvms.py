"""DVMS inside the agents (test driver): an overloaded node starts a partition, which solves and relocates VMs
away through the VE service, keeping every VE's constraints."""

from __future__ import annotations

import time

import pytest

from discovery.relocation import check_placement
from discovery.spec import VESpec

from .test_relocate import host_call, write_constrained
from .test_ve_lifecycle import write_spec

pytestmark = pytest.mark.integration


def test_an_overloaded_node_is_relieved_by_a_partition(cluster_factory, tmp_path):
    cluster = cluster_factory(4, 2)
    pair = cluster.json("--agent", "node1", "ve", "create", write_constrained(tmp_path, "pair", ["x", "y"],
                                                                                ["anti_affinity: [[x, y]]"]))
    bulk = cluster.json("--agent", "node1", "ve", "create",
                        write_spec(tmp_path, "bulk", [("p", 2, 128), ("q", 2, 128), ("r", 2, 128)]))
    assert {slot["node"] for slot in bulk["placement"].values()} == {"node1"}
    on_node1 = [f"bulk:{vm}" for vm in "pqr"] + [f"pair:{vm}" for vm, s in pair["placement"].items()
                                                  if s["node"] == "node1"]
    assert len(on_node1) == 4  # one of the pair went elsewhere

    # nothing demands CPU by default: no partition, nothing moves
    quiet = cluster.json("--agent", "node1", "dvms", "status")
    assert quiet["partition"] is None and quiet["ended"] == {} and quiet["load"]["state"] == "normal"

    host_call(cluster, "node1", "dvms.load", {"cpu_capacity": 350})
    for domain in on_node1:
        host_call(cluster, "node1", "dvms.load", {"vm": domain, "cpu": 100})  # 400 > 350; 300 after a move clears it

    deadline = time.monotonic() + 60
    while True:
        status = cluster.json("--agent", "node1", "dvms", "status")
        if "solved" in status["ended"].values() and status["load"]["state"] == "normal":
            break
        assert time.monotonic() < deadline, status
        time.sleep(1)
    assert status["load"]["cpu"] <= 300
    assert any(e["kind"] == "migrated" for e in status["events"])
    assert any(e["kind"] == "problem" for e in status["events"])

    sites = {n["name"]: n["site"] for n in cluster.state["nodes"]}
    moved = 0
    for name in ("pair", "bulk"):
        shown = cluster.json("--agent", "node2", "ve", "show", name)
        node_of = {vm: slot["node"] for vm, slot in shown["placement"].items()}
        assert check_placement(VESpec.from_dict(shown["spec"]), node_of, sites) is None
        assert all(slot["domain_state"] == "running" and "moving_to" not in slot
                   for slot in shown["placement"].values())
        moved += sum(node != "node1" for vm, node in node_of.items() if f"{name}:{vm}" in on_node1)
    assert moved >= 1

    table = cluster.cli("--agent", "node1", "dvms", "status").stdout
    assert "solved" in table
    every = cluster.json("--agent", "node3", "dvms", "status", "--all")
    assert sorted(a["node"] for a in every) == ["node1", "node2", "node3", "node4"]
