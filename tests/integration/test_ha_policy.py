"""The HA policy (`ha:` in a spec, `ve ha`) and each VM's protection in `ve show`, on a real 4-agent, 2-site
cluster (node1 and node3 in rennes, node2 and node4 in lyon; libvirt test:///)."""

from __future__ import annotations

import pytest

from .conftest import running_cluster
from .test_relocate import host_info
from .test_replicas import copies_of, refused, standbys
from .test_ve_lifecycle import client_config

pytestmark = pytest.mark.integration
NODES = ("node1", "node2", "node3", "node4")


@pytest.fixture(scope="module")
def cluster4(tmp_path_factory):
    with running_cluster(tmp_path_factory, "ha4", 4, 2) as cluster:
        yield cluster


def spec(tmp_path, name, ha, vms=(("a", 2, 512), ("b", 1, 256))):
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\nvms:\n" + "".join(f"  - {{name: {vm}, vcpus: {c}, memory_mb: {m}}}\n"
                                                      for vm, c, m in vms) + (f"ha: {ha}\n" if ha else ""))
    return str(path)


def test_a_standby_policy_keeps_its_copies_until_it_is_set_to_none(cluster4, tmp_path):
    before = {n: host_info(cluster4, n)["free"] for n in NODES}
    created = cluster4.json("--agent", "node1", "ve", "create",
                            spec(tmp_path, "guarded", "{mode: standby, copies: 1, priority: 5}"))
    assert created["spec"]["ha"] == {"mode": "standby", "copies": 1, "priority": 5} and "shortfall" not in created
    for vm in ("a", "b"):
        assert len(copies_of(created, vm)) == 1 and created["replicas"][vm][0]["site"] == "lyon"  # other site first

    shown = cluster4.json("--agent", "node3", "ve", "show", "guarded")
    for vm in ("a", "b"):
        protection = shown["protection"][vm]
        assert protection["status"] == "protected" and "why" not in protection
        assert protection["policy"] == {"mode": "standby", "copies": 1, "priority": 5}
        [held] = protection["copies"]
        assert held["node"] == copies_of(created, vm)[0] and held["standby"] == "held" and held["lag"] >= 0
        assert standbys(cluster4, held["node"]).count(f"guarded:{vm}") == 1
    table = cluster4.cli("--agent", "node3", "ve", "show", "guarded").stdout
    assert "protected" in table and "standby, 1 copy per VM, async replication, priority 5" in table

    assert "keeps 1 standby copies of each VM by its HA policy" in refused(
        cluster4, "--agent", "node2", "ve", "replicate", "guarded", "--copies", "2")
    assert refused(cluster4, "--agent", "node2", "ve", "ha", "guarded", "--mode", "standby", "--copies", "4") == \
        "error: cannot keep 4 standby copies of guarded/a: there are only 3 live nodes besides its host node1"
    assert refused(cluster4, "--agent", "node2", "ve", "ha", "guarded", "--mode", "restart", "--copies", "1") == \
        "error: ha.copies: only for mode standby (mode is restart)"
    assert refused(cluster4, "--agent", "node2", "ve", "ha", "guarded", "--mode", "restart", "--snapshot-every",
                   "5s") == "error: ha.snapshot_every: must be a duration from 10s to 24h (seconds, or as in 30s, " \
                            "5m, 1h30m), got '5s'"
    assert refused(cluster4, "--agent", "node2", "ve", "ha", "guarded", "--mode", "standby", "--replication",
                   "sometimes") == "error: ha.replication: must be one of async, sync, off, got 'sometimes'"
    assert refused(cluster4, "--agent", "node2", "ve", "ha", "guarded", "--mode", "restart", "--replication",
                   "sync") == "error: ha.replication: only for mode standby (mode is restart)"
    assert refused(cluster4, "--agent", "node2", "ve", "ha", "guarded", "--mode", "standby", "--bandwidth",
                   "0") == "error: ha.bandwidth: must be an integer between 1 and 100000, got 0"
    dave = client_config(cluster4, tmp_path, "dave")
    assert "belongs to 'operator'; 'dave' may not act on it" in refused(
        cluster4, "--config", dave, "--agent", "node2", "ve", "ha", "guarded", "--mode", "none")
    unchanged = cluster4.json("--agent", "node4", "ve", "show", "guarded")  # nothing half-applied
    assert unchanged["spec"]["ha"] == created["spec"]["ha"]
    assert all(copies_of(unchanged, vm) == copies_of(created, vm) for vm in ("a", "b"))

    synced = cluster4.cli("--agent", "node2", "ve", "ha", "guarded", "--mode", "standby", "--priority", "5",
                          "--replication", "sync", "--bandwidth", "10", "--max-lag", "10s").stdout
    assert "ha: standby, 1 copy per VM, sync replication at 10 MiB/s, priority 5" in synced
    assert cluster4.json("--agent", "node4", "ve", "show", "guarded")["spec"]["ha"] == {
        "mode": "standby", "copies": 1, "priority": 5, "replication": "sync", "bandwidth": 10, "max_lag": 10}

    dropped = cluster4.json("--agent", "node2", "ve", "ha", "guarded", "--mode", "none")
    assert "ha" not in dropped["spec"] and dropped.get("replicas", {}) == {}
    assert dropped["dropped"] == {vm: copies_of(created, vm) for vm in ("a", "b")}
    gone = cluster4.json("--agent", "node4", "ve", "show", "guarded")
    assert gone.get("replicas", {}) == {} and {p["status"] for p in gone["protection"].values()} == {"unprotected"}
    assert all(standbys(cluster4, n) == [] for n in NODES)
    assert all(host_info(cluster4, n)["free"] == before[n] for n in NODES if n != "node1")  # copies' room freed
    cluster4.cli("--agent", "node1", "ve", "destroy", "guarded")


def test_a_ve_whose_copies_cannot_be_made_is_created_degraded_until_they_are(cluster4, tmp_path):
    proc = cluster4.cli("--agent", "node1", "ve", "create", spec(tmp_path, "thin", "{mode: standby, copies: 4}"))
    assert "warning: created, but not protected as its HA policy asks: cannot keep 4 standby copies" in proc.stderr
    shown = cluster4.json("--agent", "node2", "ve", "show", "thin")
    assert shown["state"] == "running" and shown.get("replicas", {}) == {}
    for protection in shown["protection"].values():
        assert protection["status"] == "degraded"
        assert protection["why"].startswith("0 of 4 standby copies held; cannot keep 4 standby copies of thin/")

    fixed = cluster4.json("--agent", "node3", "ve", "ha", "thin", "--mode", "standby", "--copies", "3")
    assert "shortfall" not in fixed and all(len(copies_of(fixed, vm)) == 3 for vm in ("a", "b"))
    shown = cluster4.json("--agent", "node2", "ve", "show", "thin")
    assert {p["status"] for p in shown["protection"].values()} == {"protected"}

    restart = cluster4.cli("--agent", "node4", "ve", "ha", "thin", "--mode", "restart", "--snapshot-every", "30s",
                           "--keep", "2", "--priority", "7").stdout
    assert "ha: restart, a snapshot every 30s, 2 kept, priority 7" in restart
    snap = cluster4.json("--agent", "node1", "ve", "snapshot", "thin", "--tag", "t1")
    shown = cluster4.json("--agent", "node2", "ve", "show", "thin")
    assert shown["spec"]["ha"] == {"mode": "restart", "snapshot_every": 30, "keep": 2, "priority": 7}
    assert shown.get("replicas", {}) == {} and all(standbys(cluster4, n) == [] for n in NODES)
    for protection in shown["protection"].values():
        assert protection["last_snapshot"] == snap["time"] and "copies" not in protection
    cluster4.cli("--agent", "node1", "ve", "destroy", "thin")
