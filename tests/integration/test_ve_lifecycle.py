"""VEs managed from any node of a real 6-agent, 3-site cluster (separate processes, TLS, libvirt test:///)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import wait_for

pytestmark = pytest.mark.integration


def write_spec(tmp_path, name, vms, site=None):
    lines = [f"name: {name}"] + ([f"site: {site}"] if site else []) + ["vms:"]
    for vm, vcpus, mem in vms:
        lines += [f"  - name: {vm}", f"    vcpus: {vcpus}", f"    memory_mb: {mem}"]
    path = tmp_path / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_every_agent_sees_every_member_alive(cluster6):
    for node in ("node1", "node4", "node6"):
        members = cluster6.json("--agent", node, "members")
        assert sorted(m["name"] for m in members if m["status"] == "alive") == [f"node{i}" for i in range(1, 7)]
        assert {m["site"] for m in members} == {"rennes", "lyon", "nancy"}


def test_ve_created_through_node1_is_listed_and_stopped_through_node5(cluster6, tmp_path):
    spec = write_spec(tmp_path, "shop", [("front", 2, 1024), ("db", 4, 4096)])
    created = cluster6.json("--agent", "node1", "ve", "create", spec)
    assert created["state"] == "running"
    hosts = {slot["node"] for slot in created["placement"].values()}
    assert hosts == {"node1"}  # the coordinating node is nearest and has room

    listed = {ve["name"]: ve for ve in cluster6.json("--agent", "node5", "ve", "list")["ves"]}
    assert listed["shop"]["state"] == "running"
    assert set(listed["shop"]["placement"]) == {"front", "db"}

    assert cluster6.json("--agent", "node5", "ve", "stop", "shop")["state"] == "stopped"
    shown = cluster6.json("--agent", "node3", "ve", "show", "shop")
    assert shown["state"] == "stopped"
    assert {slot["domain_state"] for slot in shown["placement"].values()} == {"shutoff"}

    assert cluster6.json("--agent", "node2", "ve", "start", "shop")["state"] == "running"
    shown = cluster6.json("--agent", "node6", "ve", "show", "shop")
    assert {slot["domain_state"] for slot in shown["placement"].values()} == {"running"}


def test_full_node_spills_to_the_nearest_node_with_room(cluster6, tmp_path):
    # each node has 16 vCPUs: a 12-vCPU VM and a 10-vCPU VM cannot share node2
    spec = write_spec(tmp_path, "spill", [("big", 12, 1024), ("second", 10, 1024)])
    ve = cluster6.json("--agent", "node2", "ve", "create", spec)
    assert ve["placement"]["big"]["node"] == "node2"
    second = ve["placement"]["second"]
    assert second["node"] != "node2" and "1 nearer full" in second["why"]
    members = {m["name"]: m for m in cluster6.json("--agent", "node2", "members")}
    others = [m["rtt_ms"] for n, m in members.items() if n not in ("node2", second["node"]) and m["rtt_ms"]]
    assert second["rtt_ms"] <= min(others)  # nearest by measured RTT among the rest
    cluster6.cli("--agent", "node4", "ve", "destroy", "spill")


def test_site_pinning_and_refusals_explain_themselves(cluster6, tmp_path):
    pinned = cluster6.json("--agent", "node1", "ve", "create", write_spec(tmp_path, "pinned", [("a", 1, 256)], "nancy"))
    assert pinned["placement"]["a"]["site"] == "nancy"

    proc = cluster6.cli("--agent", "node1", "ve", "create", write_spec(tmp_path, "huge", [("x", 64, 256)]), check=False)
    assert proc.returncode == 1
    assert proc.stderr == "error: cannot place huge: no node has 64 vCPUs free for vm x; the most free is 16 vCPUs\n"

    proc = cluster6.cli("--agent", "node1", "ve", "create", write_spec(tmp_path, "mars", [("x", 1, 256)], "mars"),
                        check=False)
    assert proc.returncode == 1 and "no live node in site 'mars'" in proc.stderr

    proc = cluster6.cli("--agent", "node3", "ve", "create", write_spec(tmp_path, "pinned", [("a", 1, 256)]),
                        check=False)
    assert proc.returncode == 1 and "already exists" in proc.stderr

    names = {ve["name"] for ve in cluster6.json("--agent", "node6", "ve", "list")["ves"]}
    assert "huge" not in names and "mars" not in names  # refusals leave nothing behind


def test_refused_placement_releases_its_reservations(cluster6, tmp_path):
    # 5 VMs of 15 vCPUs fit (one per node of 6 with room), the 7th cannot: nothing may stay reserved
    vms = [(f"v{i}", 15, 256) for i in range(7)]
    proc = cluster6.cli("--agent", "node2", "ve", "create", write_spec(tmp_path, "greedy", vms), check=False)
    assert proc.returncode == 1
    ok = cluster6.json("--agent", "node2", "ve", "create", write_spec(tmp_path, "fits", [("v", 15, 256)]))
    assert ok["state"] == "running"
    cluster6.cli("--agent", "node5", "ve", "destroy", "fits")


def test_destroy_frees_the_name_and_the_capacity(cluster6, tmp_path):
    spec = write_spec(tmp_path, "temp", [("a", 16, 1024)])
    first = cluster6.json("--agent", "node4", "ve", "create", spec)
    host = first["placement"]["a"]["node"]
    assert cluster6.json("--agent", "node1", "ve", "destroy", "temp")["state"] == "destroyed"
    proc = cluster6.cli("--agent", "node2", "ve", "show", "temp", check=False)
    assert proc.returncode == 1 and "no VE named 'temp'" in proc.stderr
    again = cluster6.json("--agent", "node4", "ve", "create", spec)
    assert again["placement"]["a"]["node"] == host  # the whole node was free again
    cluster6.cli("--agent", "node4", "ve", "destroy", "temp")


def test_bad_spec_exits_non_zero_naming_the_field(cluster6, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: oops\nvms:\n  - name: a\n    vcpus: lots\n    memory_mb: 256\n")
    proc = cluster6.cli("--agent", "node1", "ve", "create", str(bad), check=False)
    assert proc.returncode == 1
    assert "vms[0].vcpus" in proc.stderr and ":4:" in proc.stderr and proc.stderr.count("\n") == 1


def test_bad_cli_arguments_give_one_line_errors(cluster6):
    proc = cluster6.cli("--agent", "nosuchnode", "ve", "list", check=False)
    assert proc.returncode == 1 and "unknown agent 'nosuchnode'" in proc.stderr
    proc = cluster6.cli("--agent", "127.0.0.1:1", "ve", "list", check=False)
    assert proc.returncode == 1 and proc.stderr.startswith("error: 127.0.0.1:1")
    proc = cluster6.cli("--agent", "node1", "ve", "show", "ghost", check=False)
    assert proc.returncode == 1 and proc.stderr == "error: no VE named 'ghost'\n"
    proc = cluster6.cli("ve", "create", "/nonexistent.yaml", check=False)
    assert proc.returncode == 1 and "cannot read" in proc.stderr


def test_cluster_status_reports_one_ring(cluster6):
    def one_ring():
        """Following successors from node1 makes one cycle through all six."""
        rows = json.loads(cluster6.cli("cluster", "status", "--dir", str(cluster6.dir), "--json").stdout)
        assert all(r["process"] == "running" and r["answers"] for r in rows)
        successor = {r["name"]: r["successor"] for r in rows}
        seen, node = [], "node1"
        while node not in seen:
            seen.append(node)
            node = successor[node]
        return len(seen) == 6 and node == "node1"

    wait_for(one_ring, what="one ring through the six agents", interval=1)


def test_suspend_resume_and_locate_through_other_nodes(cluster6, tmp_path):
    spec = write_spec(tmp_path, "pausable", [("a", 1, 256), ("b", 1, 256)])
    created = cluster6.json("--agent", "node2", "ve", "create", spec)
    assert cluster6.json("--agent", "node4", "ve", "suspend", "pausable")["state"] == "suspended"
    assert cluster6.json("--agent", "node6", "ve", "suspend", "pausable")["state"] == "suspended"  # a retry is fine
    shown = cluster6.json("--agent", "node1", "ve", "show", "pausable")
    assert {slot["domain_state"] for slot in shown["placement"].values()} == {"paused"}

    located = cluster6.json("--agent", "node5", "ve", "locate", "pausable")
    assert {vm: s["node"] for vm, s in located["vms"].items()} == {
        vm: s["node"] for vm, s in created["placement"].items()}

    assert cluster6.json("--agent", "node3", "ve", "resume", "pausable")["state"] == "running"
    shown = cluster6.json("--agent", "node1", "ve", "show", "pausable")
    assert {slot["domain_state"] for slot in shown["placement"].values()} == {"running"}
    proc = cluster6.cli("--agent", "node3", "ve", "locate", "nothing-here", check=False)
    assert proc.returncode == 1 and "no VE named 'nothing-here'" in proc.stderr
    cluster6.cli("--agent", "node4", "ve", "destroy", "pausable")


def client_config(cluster, tmp_path, name):
    """A client config for a new user certificate `name` (role client) of the cluster's CA."""
    subprocess.run([sys.executable, "-m", "discovery", "ca", "issue", str(cluster.dir / "ca"), name,
                    "--role", "client", "--out", str(tmp_path)], check=True, capture_output=True, env=cluster.env)
    text = (cluster.dir / "client.toml").read_text()
    text = text.replace(str(cluster.dir / "operator.pem"), str(tmp_path / f"{name}.pem"))
    text = text.replace(str(cluster.dir / "operator.key"), str(tmp_path / f"{name}.key"))
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return str(path)


def test_only_the_owner_or_an_operator_acts_on_a_ve(cluster6, tmp_path):
    alice, bob = client_config(cluster6, tmp_path, "alice"), client_config(cluster6, tmp_path, "bob")
    spec = write_spec(tmp_path, "alices", [("vm", 1, 256)])
    created = json.loads(cluster6.cli("--config", alice, "--agent", "node1", "ve", "create", spec, "--json").stdout)
    assert created["owner"] == "alice"

    for verb in ("show", "stop", "destroy"):
        proc = cluster6.cli("--config", bob, "--agent", "node3", "ve", verb, "alices", check=False)
        assert proc.returncode == 1 and "belongs to 'alice'; 'bob' may not act on it" in proc.stderr, verb
    bobs_list = json.loads(cluster6.cli("--config", bob, "--agent", "node2", "ve", "list", "--json").stdout)
    assert "alices" not in [ve["name"] for ve in bobs_list["ves"]]
    alices_list = json.loads(cluster6.cli("--config", alice, "--agent", "node2", "ve", "list", "--json").stdout)
    assert [ve["name"] for ve in alices_list["ves"]] == ["alices"]

    assert "alices" in [ve["name"] for ve in cluster6.json("--agent", "node4", "ve", "list")["ves"]]  # the operator
    assert cluster6.json("--agent", "node4", "ve", "stop", "alices")["state"] == "stopped"
    cluster6.cli("--config", alice, "--agent", "node5", "ve", "destroy", "alices")


def test_constraints_are_honoured_and_refusals_name_the_constraint(cluster6, tmp_path):
    spec = tmp_path / "ha.yaml"
    spec.write_text("name: ha\nvms:\n" + "".join(f"  - {{name: w{i}, vcpus: 1, memory_mb: 128}}\n" for i in range(4))
                    + "  - {name: app, vcpus: 1, memory_mb: 128}\n  - {name: db, vcpus: 1, memory_mb: 128}\n"
                    + "constraints:\n  affinity: [[app, db]]\n  anti_affinity: [[w0, w1, w2]]\n"
                    + "  spread_sites: 3\n  max_per_node: 2\n")
    ve = cluster6.json("--agent", "node4", "ve", "create", str(spec))
    node = {vm: slot["node"] for vm, slot in ve["placement"].items()}
    site = {vm: slot["site"] for vm, slot in ve["placement"].items()}
    assert node["app"] == node["db"]
    assert len({node["w0"], node["w1"], node["w2"]}) == 3
    assert len(set(site.values())) >= 3
    assert max(list(node.values()).count(n) for n in node.values()) <= 2
    cluster6.cli("--agent", "node1", "ve", "destroy", "ha")

    spec.write_text("name: crowd\nvms:\n" + "".join(f"  - {{name: v{i}, vcpus: 1, memory_mb: 128}}\n" for i in range(7))
                    + "constraints:\n  anti_affinity: [[v0, v1, v2, v3, v4, v5, v6]]\n")
    proc = cluster6.cli("--agent", "node2", "ve", "create", str(spec), check=False)
    assert proc.returncode == 1 and "anti-affinity [v0, v1, v2, v3, v4, v5, v6] needs 7 nodes with room; only 6 have" \
        in proc.stderr, proc.stderr
