"""DVMS inside the agents (test driver): an overloaded node starts a partition, which solves and relocates VMs
away through the VE service, keeping every VE's constraints; a pinned demand follows its VM; with
consolidation on, an underloaded node is emptied."""

from __future__ import annotations

import pytest

from discovery.ve.placement import check_placement
from discovery.ve.spec import VESpec

from .conftest import wait_for
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

    def relieved():
        status = cluster.json("--agent", "node1", "dvms", "status")
        return "solved" in status["ended"].values() and status["load"]["state"] == "normal" and status

    status = wait_for(relieved, what="a partition solved node1's overload", interval=1,
                      detail=lambda: str(cluster.json("--agent", "node1", "dvms", "status")))
    assert status["load"]["cpu"] <= 300
    assert any(e["kind"] == "migrated" for e in status["events"])
    assert any(e["kind"] == "problem" and e["load"] == "overload" for e in status["events"])
    assert "overload" in status["problems"].values()

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


def placement_of(cluster, name):
    shown = cluster.json("--agent", "node2", "ve", "show", name)
    return shown, {vm: slot["node"] for vm, slot in shown["placement"].items()}


def test_a_pinned_demand_follows_its_vm_when_it_is_relocated(cluster_factory, tmp_path):
    cluster = cluster_factory(3, 2)
    created = cluster.json("--agent", "node1", "ve", "create", write_spec(tmp_path, "hot", [("a", 2, 128)]))
    assert created["placement"]["a"]["node"] == "node1"
    pinned = cluster.json("dvms", "load", "hot:a", "150")  # the CLI finds the VM's host
    assert pinned["node"] == "node1"
    wait_for(lambda: cluster.json("--agent", "node1", "dvms", "status")["load"]["cpu"] == 150,
             what="the pinned demand counted at node1")

    cluster.json("--agent", "node2", "ve", "relocate", "hot", "--vm", "a", "--to", "node3")
    status = wait_for(lambda: (s := cluster.json("--agent", "node3", "dvms", "status"))["load"]["cpu"] == 150 and s,
                      what="the pinned demand followed its VM to node3")
    assert status["pinned"] == {"hot:a": 150}
    wait_for(lambda: cluster.json("--agent", "node1", "dvms", "status")["pinned"] == {},  # at its next sample
             what="the pin gone from node1 with its VM")

    cluster.json("dvms", "load", "hot:a", "--unpin")
    wait_for(lambda: cluster.json("--agent", "node3", "dvms", "status")["load"]["cpu"] == 0,
             what="the unpinned demand gone")
    refused = cluster.cli("dvms", "load", "hot:nope", "10", check=False)
    assert refused.returncode == 1 and "no VM 'nope'" in refused.stderr


def test_an_underloaded_node_is_emptied_when_consolidation_is_on(cluster_factory, tmp_path):
    cluster = cluster_factory(3, 1, "--dvms", "underload=0.2", "--dvms", "underload_dwell=1")
    duo = cluster.json("--agent", "node1", "ve", "create", write_constrained(tmp_path, "duo", ["p", "q"],
                                                                               ["affinity: [[p, q]]"]))
    solo = cluster.json("--agent", "node2", "ve", "create", write_spec(tmp_path, "solo", [("s", 1, 128)]))
    assert {slot["node"] for slot in duo["placement"].values()} == {"node1"}
    assert solo["placement"]["s"]["node"] == "node2"

    # both nodes idle far below 20 %: one is emptied onto the other (node3, empty, is not woken up)
    def hosts():
        nodes = {node for name in ("duo", "solo") for node in placement_of(cluster, name)[1].values()}
        return len(nodes) == 1 and nodes
    assert wait_for(hosts, what="one node emptied onto the other") <= {"node1", "node2"}
    every = cluster.json("--agent", "node3", "dvms", "status", "--all")
    led = [a for a in every if any(a["ended"].get(pid) == "solved" and problem == "underload"
                                   for pid, problem in a["problems"].items())]
    assert led and any(e["kind"] == "migrated" for a in led for e in a["events"])
    sites = {n["name"]: n["site"] for n in cluster.state["nodes"]}
    for name in ("duo", "solo"):
        shown, node_of = placement_of(cluster, name)
        assert check_placement(VESpec.from_dict(shown["spec"]), node_of, sites) is None
