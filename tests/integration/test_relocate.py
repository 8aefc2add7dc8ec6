"""Relocation and snapshots of VEs on a real 6-agent, 3-site cluster (libvirt test:///, no migration):
the domain is carried to the target, the source freed, the VE's constraints kept, snapshots restored."""

from __future__ import annotations

import json

import pytest

from overlay.wire.rpc import RemoteError

from .conftest import pid_alive
from .test_ve_lifecycle import client_config, write_spec

pytestmark = pytest.mark.integration


def host_call(cluster, node, method, args, cert_dir=None, user="operator"):
    """Call a `host.*` method of one agent directly, with the operator's certificate (or `user`'s)."""
    return cluster.call(node, method, args, cert_dir, user)


def host_info(cluster, node):
    """`host.info` of one agent: total and free room, its domains."""
    return host_call(cluster, node, "host.info", {})


def domains(cluster, name):
    """Where domain `name` is defined, node -> state, asking every running agent of the cluster."""
    found = {}
    for node in cluster.state["nodes"]:
        if not pid_alive(node["pid"]):
            continue
        for domain in host_info(cluster, node["name"])["domains"]:
            if domain["name"] == name:
                found[node["name"]] = domain["state"]
    return found


def write_constrained(tmp_path, name, vms, constraints):
    lines = [f"name: {name}", "vms:"] + [f"  - {{name: {vm}, vcpus: 1, memory_mb: 128}}" for vm in vms]
    path = tmp_path / f"{name}.yaml"
    path.write_text("\n".join(lines + ["constraints:"] + [f"  {c}" for c in constraints]) + "\n")
    return str(path)


def test_relocate_through_a_third_node_carries_the_vm_and_frees_the_source(cluster6, tmp_path):
    created = cluster6.json("--agent", "node1", "ve", "create",
                            write_spec(tmp_path, "mover", [("a", 2, 1024), ("b", 1, 512)]))
    assert {slot["node"] for slot in created["placement"].values()} == {"node1"}
    before = host_info(cluster6, "node1")["free"]

    moved = cluster6.json("--agent", "node3", "ve", "relocate", "mover", "--vm", "a", "--to", "node5")
    assert moved["moved"] == ["a"] and moved["placement"]["a"]["node"] == "node5"
    located = cluster6.json("--agent", "node6", "ve", "locate", "mover")
    assert {vm: s["node"] for vm, s in located["vms"].items()} == {"a": "node5", "b": "node1"}
    assert not any("moving_to" in s for s in located["vms"].values())
    shown = cluster6.json("--agent", "node2", "ve", "show", "mover")
    assert shown["placement"]["a"]["domain_state"] == "running" and "moving_to" not in shown["placement"]["a"]
    assert domains(cluster6, "mover:a") == {"node5": "running"}  # on the target, gone from the source
    after = host_info(cluster6, "node1")["free"]
    assert after["vcpus"] == before["vcpus"] + 2 and after["memory_mb"] == before["memory_mb"] + 1024

    again = cluster6.cli("--agent", "node4", "ve", "relocate", "mover", "--vm", "a", "--to", "node5")
    assert "nothing to move: already there" in again.stdout  # idempotent
    assert domains(cluster6, "mover:a") == {"node5": "running"}

    # a paused VE moves paused, and the whole VE moves when no VM is named
    assert cluster6.json("--agent", "node2", "ve", "suspend", "mover")["state"] == "suspended"
    whole = cluster6.json("--agent", "node6", "ve", "relocate", "mover", "--to", "node4")
    assert sorted(whole["moved"]) == ["a", "b"]
    assert domains(cluster6, "mover:a") == {"node4": "paused"} and domains(cluster6, "mover:b") == {"node4": "paused"}
    assert cluster6.json("--agent", "node1", "ve", "resume", "mover")["state"] == "running"
    assert domains(cluster6, "mover:b") == {"node4": "running"}

    proc = cluster6.cli("--agent", "node1", "ve", "relocate", "mover", "--vm", "zz", "--to", "node2", check=False)
    assert proc.returncode == 1 and proc.stderr == "error: VE 'mover' has no VM 'zz' (VMs: a, b)\n"
    proc = cluster6.cli("--agent", "node1", "ve", "relocate", "mover", "--to", "node42", check=False)
    assert proc.returncode == 1 and proc.stderr == "error: no live node named 'node42'\n"
    proc = cluster6.cli("--agent", "node1", "ve", "relocate", "mover", check=False)
    assert proc.returncode == 2 and proc.stderr == "error: give either --to NODE or --site SITE\n"
    proc = cluster6.cli("--agent", "node1", "ve", "relocate", "mover", "--to", "node2", "--method", "ship", check=False)
    assert proc.returncode == 1 and "cannot ship it: a test-driver VM has no disk" in proc.stderr
    proc = cluster6.cli("--agent", "node1", "ve", "relocate", "mover", "--to", "node2", "--method", "fly", check=False)
    assert proc.returncode == 1 and proc.stderr == "error: method must be one of auto, live, ship\n"
    assert domains(cluster6, "mover:a") == {"node4": "running"}  # refusals changed nothing
    cluster6.cli("--agent", "node3", "ve", "destroy", "mover")
    assert domains(cluster6, "mover:a") == {} and domains(cluster6, "mover:b") == {}


def test_relocate_refuses_what_the_target_cannot_hold_and_rolls_back(cluster6, tmp_path):
    cluster6.json("--agent", "node2", "ve", "create", write_spec(tmp_path, "heavy", [("h", 12, 1024)]))
    cluster6.json("--agent", "node5", "ve", "create", write_spec(tmp_path, "filler", [("f", 8, 1024)]))
    proc = cluster6.cli("--agent", "node3", "ve", "relocate", "heavy", "--to", "node5", check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert "cannot relocate heavy/h to node5" in proc.stderr and "needs 12 vCPUs (has 8)" in proc.stderr
    assert "rolled back, it stays on node2" in proc.stderr
    assert domains(cluster6, "heavy:h") == {"node2": "running"}  # unfrozen at the source
    assert cluster6.json("--agent", "node1", "ve", "locate", "heavy")["vms"]["h"]["node"] == "node2"
    for name in ("heavy", "filler"):
        cluster6.cli("--agent", "node1", "ve", "destroy", name)


def test_relocate_to_a_site_keeps_the_constraints_or_names_the_one_it_would_break(cluster6, tmp_path):
    pair = cluster6.json("--agent", "node2", "ve", "create",
                         write_constrained(tmp_path, "pair", ["x", "y"], ["anti_affinity: [[x, y]]"]))
    y_node = pair["placement"]["y"]["node"]
    proc = cluster6.cli("--agent", "node1", "ve", "relocate", "pair", "--vm", "x", "--to", y_node, check=False)
    assert proc.returncode == 1
    assert proc.stderr == f"error: cannot relocate pair: anti-affinity [x, y]: x and y would share {y_node}\n"

    y_site = pair["placement"]["y"]["site"]
    moved = cluster6.json("--agent", "node6", "ve", "relocate", "pair", "--vm", "x", "--site", y_site)
    x_slot = moved["placement"]["x"]
    if pair["placement"]["x"]["site"] != y_site:
        assert moved["moved"] == ["x"]
    assert x_slot["site"] == y_site and x_slot["node"] != y_node  # the site's other node
    assert domains(cluster6, "pair:x") == {x_slot["node"]: "running"}

    whole = cluster6.json("--agent", "node4", "ve", "relocate", "pair", "--site", "nancy")
    nodes = {vm: slot["node"] for vm, slot in whole["placement"].items()}
    assert {slot["site"] for slot in whole["placement"].values()} == {"nancy"} and nodes["x"] != nodes["y"]
    for vm in ("x", "y"):
        assert domains(cluster6, f"pair:{vm}") == {nodes[vm]: "running"}
    cluster6.cli("--agent", "node4", "ve", "destroy", "pair")

    spread = cluster6.json("--agent", "node1", "ve", "create", write_constrained(
        tmp_path, "wide", ["w0", "w1", "w2"], ["anti_affinity: [[w0, w1, w2]]", "spread_sites: 3"]))
    w1_site = spread["placement"]["w1"]["site"]
    proc = cluster6.cli("--agent", "node5", "ve", "relocate", "wide", "--vm", "w0", "--site", w1_site, check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert f"cannot relocate wide/w0 to site {w1_site}: " in proc.stderr
    w1_node = spread["placement"]["w1"]["node"]
    assert f"{w1_node}: anti-affinity [w0, w1, w2]: w0 and w1 would share {w1_node}" in proc.stderr
    assert "spread over 3 sites: the VMs would cover only 2" in proc.stderr, proc.stderr
    assert cluster6.json("--agent", "node1", "ve", "locate", "wide")["vms"]["w0"] == {
        k: spread["placement"]["w0"][k] for k in ("node", "site", "addr")}
    cluster6.cli("--agent", "node1", "ve", "destroy", "wide")

    cluster6.json("--agent", "node1", "ve", "create", write_spec(tmp_path, "stay", [("s", 1, 128)], "rennes"))
    proc = cluster6.cli("--agent", "node1", "ve", "relocate", "stay", "--site", "lyon", check=False)
    assert proc.returncode == 1
    assert proc.stderr == "error: cannot relocate stay to site lyon: the VE is pinned to site rennes\n"
    proc = cluster6.cli("--agent", "node1", "ve", "relocate", "stay", "--to", "node2", check=False)
    assert proc.returncode == 1
    assert proc.stderr == "error: cannot relocate stay: the VE is pinned to site rennes; s would be in lyon\n"
    cluster6.cli("--agent", "node1", "ve", "destroy", "stay")


def test_snapshot_restore_and_restore_after_relocation(cluster6, tmp_path):
    created = cluster6.json("--agent", "node3", "ve", "create",
                            write_spec(tmp_path, "snappy", [("a", 1, 256), ("b", 1, 256)]))
    snap = cluster6.json("--agent", "node1", "ve", "snapshot", "snappy", "--tag", "t1")
    assert snap["tag"] == "t1" and {vm: v["state"] for vm, v in snap["vms"].items()} == {"a": "running", "b": "running"}
    shown = cluster6.json("--agent", "node2", "ve", "show", "snappy")
    assert {s["domain_state"] for s in shown["placement"].values()} == {"running"}  # resumed after the snapshot

    assert cluster6.json("--agent", "node4", "ve", "stop", "snappy")["state"] == "stopped"
    cluster6.json("--agent", "node5", "ve", "snapshot", "snappy", "--tag", "off")
    restored = cluster6.json("--agent", "node6", "ve", "restore", "snappy", "t1")
    assert restored["state"] == "running"
    shown = cluster6.json("--agent", "node2", "ve", "show", "snappy")
    assert {s["domain_state"] for s in shown["placement"].values()} == {"running"}

    listed = cluster6.json("--agent", "node2", "ve", "snapshots", "snappy")["snapshots"]
    assert [s["tag"] for s in listed] == ["t1", "off"] and [s["state"] for s in listed] == ["running", "stopped"]
    assert listed[0]["vms"]["a"]["node"] == created["placement"]["a"]["node"]
    table = cluster6.cli("--agent", "node2", "ve", "snapshots", "snappy").stdout
    assert "t1" in table and "off" in table

    # snapshots travel with the VM: restore after a relocation
    source = created["placement"]["a"]["node"]
    target = "node6" if source != "node6" else "node5"
    cluster6.json("--agent", "node1", "ve", "relocate", "snappy", "--vm", "a", "--to", target)
    assert cluster6.json("--agent", "node1", "ve", "restore", "snappy", "off")["state"] == "stopped"
    assert domains(cluster6, "snappy:a") == {target: "shutoff"}
    assert cluster6.json("--agent", "node1", "ve", "restore", "snappy", "t1")["state"] == "running"
    assert domains(cluster6, "snappy:a") == {target: "running"}

    proc = cluster6.cli("--agent", "node4", "ve", "restore", "snappy", "nope", check=False)
    assert proc.returncode == 1
    assert proc.stderr == "error: VE 'snappy' has no snapshot 'nope' (snapshots: t1, off)\n"
    proc = cluster6.cli("--agent", "node4", "ve", "snapshot", "snappy", "--tag", "t1", check=False)
    assert proc.returncode == 1 and proc.stderr == "error: VE 'snappy' already has a snapshot 't1'\n"
    proc = cluster6.cli("--agent", "node4", "ve", "snapshot", "snappy", "--tag", "bad tag", check=False)
    assert proc.returncode == 1 and "a snapshot tag is 1-63 characters" in proc.stderr
    cluster6.cli("--agent", "node4", "ve", "destroy", "snappy")
    assert domains(cluster6, "snappy:a") == {}


def host_tags(cluster, node, domain):
    """The snapshot tags a host keeps for `domain` (what `host.export` would carry; it changes nothing)."""
    return [row[0] for row in host_call(cluster, node, "host.export", {"name": domain})["snapshots"]]


def test_snapshot_delete_on_every_host_and_after_a_relocation(cluster6, tmp_path):
    created = cluster6.json("--agent", "node2", "ve", "create",
                            write_spec(tmp_path, "pruned", [("a", 1, 256), ("b", 1, 256)]))
    hosts = {vm: slot["node"] for vm, slot in created["placement"].items()}
    for tag in ("keep", "drop"):
        cluster6.json("--agent", "node2", "ve", "snapshot", "pruned", "--tag", tag)
    deleted = cluster6.json("--agent", "node5", "ve", "snapshot-delete", "pruned", "drop")
    assert deleted["tag"] == "drop" and [s["tag"] for s in deleted["snapshots"]] == ["keep"]
    assert [s["tag"] for s in cluster6.json("--agent", "node3", "ve", "snapshots", "pruned")["snapshots"]] == ["keep"]
    assert {vm: host_tags(cluster6, node, f"pruned:{vm}") for vm, node in hosts.items()} == {"a": ["keep"],
                                                                                             "b": ["keep"]}
    proc = cluster6.cli("--agent", "node1", "ve", "restore", "pruned", "drop", check=False)
    assert proc.returncode == 1 and proc.stderr == "error: VE 'pruned' has no snapshot 'drop' (snapshots: keep)\n"
    proc = cluster6.cli("--agent", "node4", "ve", "snapshot-delete", "pruned", "drop", check=False)
    assert proc.returncode == 1 and proc.stderr == "error: VE 'pruned' has no snapshot 'drop' (snapshots: keep)\n"

    # a retry after a partial failure: one host already forgot the snapshot, the record still lists it
    cluster6.json("--agent", "node2", "ve", "snapshot", "pruned", "--tag", "half")
    assert host_call(cluster6, hosts["a"], "host.snapshot_delete", {"name": "pruned:a", "tag": "half"})["deleted"]
    table = cluster6.cli("--agent", "node6", "ve", "snapshot-delete", "pruned", "half").stdout
    assert "half" in table and "keep" in table
    assert host_tags(cluster6, hosts["b"], "pruned:b") == ["keep"]

    # the remaining snapshot travelled with a relocated VM, and is deleted at its new host
    target = next(n for n in ("node6", "node5", "node4") if n not in hosts.values())
    cluster6.json("--agent", "node1", "ve", "relocate", "pruned", "--vm", "a", "--to", target)
    assert host_tags(cluster6, target, "pruned:a") == ["keep"]
    deleted = cluster6.json("--agent", "node3", "ve", "snapshot-delete", "pruned", "keep")
    assert deleted["snapshots"] == [] and host_tags(cluster6, target, "pruned:a") == []
    assert host_tags(cluster6, hosts["b"], "pruned:b") == []
    proc = cluster6.cli("--agent", "node3", "ve", "snapshot-delete", "pruned", "keep", check=False)
    assert proc.returncode == 1 and proc.stderr == "error: VE 'pruned' has no snapshot 'keep' (it has none)\n"
    cluster6.cli("--agent", "node4", "ve", "destroy", "pruned")


def test_only_the_owner_or_an_operator_relocates_or_snapshots_and_users_never_reach_hosts(cluster6, tmp_path):
    carol, dave = client_config(cluster6, tmp_path, "carol"), client_config(cluster6, tmp_path, "dave")
    created = json.loads(cluster6.cli("--config", carol, "--agent", "node1", "ve", "create",
                                      write_spec(tmp_path, "carols", [("vm", 1, 256)]), "--json").stdout)
    cluster6.cli("--config", carol, "--agent", "node2", "ve", "snapshot", "carols", "--tag", "s1")
    for verb in (["relocate", "carols", "--to", "node4"], ["snapshot", "carols"], ["snapshots", "carols"],
                 ["restore", "carols", "s1"], ["snapshot-delete", "carols", "s1"]):
        proc = cluster6.cli("--config", dave, "--agent", "node3", "ve", *verb, check=False)
        assert proc.returncode == 1 and "belongs to 'carol'; 'dave' may not act on it" in proc.stderr, verb
    host = created["placement"]["vm"]["node"]
    for method, args in (("host.restore", {"name": "carols:vm", "tag": "s1"}), ("host.info", {})):
        with pytest.raises(RemoteError, match="'dave' \\(client\\) may not call host\\.") as err:
            host_call(cluster6, host, method, args, cert_dir=tmp_path, user="dave")
        assert err.value.kind == "forbidden"
    moved = json.loads(cluster6.cli("--config", carol, "--agent", "node3", "ve", "relocate", "carols",
                                    "--site", "lyon", "--json").stdout)
    assert moved["placement"]["vm"]["site"] == "lyon"
    cluster6.cli("--agent", "node5", "ve", "destroy", "carols")  # the operator may
