"""Vivaldi coordinates in real agents: learned from ordinary RPCs, shown by the CLI, kept across restarts."""

from __future__ import annotations

import json
import statistics

import pytest

from .conftest import restart, wait_for

pytestmark = pytest.mark.integration


def relative_errors(cluster, node):
    rows = cluster.json("--agent", node, "coords")["nodes"]
    return [abs(r["estimated_rtt_ms"] - r["measured_rtt_ms"]) / r["measured_rtt_ms"]
            for r in rows if not r["self"] and r["measured_rtt_ms"] and r["measured_rtt_ms"] > 2]


def test_coordinates_learn_the_emulated_wan(cluster6):
    # sites are 10-16 ms apart; nodes of one site are well under 1 ms apart
    def accurate():
        errors = [e for node in ("node1", "node2", "node3") for e in relative_errors(cluster6, node)]
        return len(errors) >= 9 and statistics.median(errors) < 0.25

    def confident():  # a node's error estimate (1.5 when fresh) falls a few samples after its estimates do
        info = cluster6.json("--agent", "node1", "coords")
        me = next(r for r in info["nodes"] if r["self"])
        return (me, info) if me["error"] < 1.0 else None

    wait_for(accurate, what="coordinates within 25 % of the measured RTTs", interval=2,
             detail=lambda: f"node1's errors: {relative_errors(cluster6, 'node1')}")
    me, info = wait_for(confident, what="node1's error estimate below 1.0", interval=1)
    assert me["name"] == "node1" and len(me["vec"]) == info["dimensionality"]


def test_rtt_between_two_other_nodes_is_estimated_and_measured(cluster6):
    answer = json.loads(cluster6.cli("--agent", "node1", "rtt", "node2", "node3", "--json").stdout)
    assert (answer["a"], answer["b"]) == ("node2", "node3")
    assert 8 < answer["measured_ms"] < 40  # lyon <-> nancy: 10 ms emulated
    assert answer["estimated_ms"] > 0 and answer["bound_ms"] >= 0
    text = cluster6.cli("--agent", "node2", "rtt", "node5").stdout  # same site as node2
    assert text.startswith("Estimated node5 <-> node2 rtt:") and "measured:" in text
    proc = cluster6.cli("--agent", "node2", "rtt", "nobody", check=False)
    assert proc.returncode == 1 and "unknown node 'nobody'" in proc.stderr


def test_coordinate_survives_a_restart(cluster_factory):
    cluster = cluster_factory(3, 3)
    saved = cluster.dir / "node2" / "data" / "coordinate.json"
    wait_for(lambda: saved.exists() and json.loads(saved.read_text())["seq"] > 20, what="a coordinate saved")
    cluster.kill9("node2")
    before = json.loads(saved.read_text())
    restart(cluster, "node2")

    def restored():
        proc = cluster.cli("--agent", "node2", "coords", "--json", check=False)
        if proc.returncode:
            return None
        return next(r for r in json.loads(proc.stdout)["nodes"] if r["self"])

    me = wait_for(restored, what="node2 answers with its coordinate")
    assert me["error"] < 1.5  # a fresh node starts at the maximum error
    assert json.loads(saved.read_text())["seq"] >= before["seq"]


def test_spiral_finds_the_nearest_nodes_first(cluster6):
    """6 nodes on 3 sites (2 each): node1's site mate is nearest, then the other sites by emulated RTT."""
    sites = {m["name"]: m["site"] for m in cluster6.json("--agent", "node1", "members")}
    found = cluster6.json("--agent", "node1", "spiral", "--count", "5")
    names = [n["name"] for n in found["nodes"]]
    assert sorted(names) == ["node2", "node3", "node4", "node5", "node6"]
    assert sites[names[0]] == sites["node1"]
    rtts = [n["rtt_ms"] for n in found["nodes"]]
    assert rtts == sorted(rtts) and rtts[0] < 5 < rtts[1]  # inside a site: loopback; across: >= 8 ms emulated
    assert found["hops"] == 5 and found["messages"] == 10 and found["failures"] == 0

    other_site = sites[names[-1]]
    pinned = cluster6.json("--agent", "node1", "spiral", "--count", "1", "--site", other_site)
    assert [sites[n["name"]] for n in pinned["nodes"]] == [other_site]
    proc = cluster6.cli("--agent", "node1", "spiral", "--count", "0", check=False)
    assert proc.returncode != 0
