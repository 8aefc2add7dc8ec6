"""Standby copies (`ve replicate`), failover onto them (`ve failover`) and `ve stop --timeout/--force`, on a
real 4-agent, 2-site cluster (node1 and node3 in rennes, node2 and node4 in lyon; libvirt test:///)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from overlay.wire.rpc import RemoteError, RpcError

from .conftest import SETTLE_DEADLINE, rejoined, restart, running_cluster, wait_for
from .test_relocate import domains, host_call, host_info
from .test_ve_lifecycle import client_config, write_spec

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster4(tmp_path_factory):
    with running_cluster(tmp_path_factory, "cluster4", 4, 2) as cluster:
        yield cluster


def standbys(cluster, node):
    return [s["name"] for s in host_call(cluster, node, "host.standbys", {})]


def copies_of(ve, vm):
    return [e["node"] for e in ve.get("replicas", {}).get(vm, [])]


def refused(cluster, *args):
    """Run a command that must fail with one `error:` line and status 1; returns that line."""
    proc = cluster.cli(*args, check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    return proc.stderr.strip()


def test_replicate_keeps_copies_in_the_other_site_with_their_room_reserved(cluster4, tmp_path):
    created = cluster4.json("--agent", "node1", "ve", "create", write_spec(tmp_path, "rep", [("a", 2, 1024)]))
    assert created["placement"]["a"]["node"] == "node1"
    before = {n: host_info(cluster4, n)["free"] for n in ("node2", "node3", "node4")}

    ve = cluster4.json("--agent", "node3", "ve", "replicate", "rep", "--copies", "2")
    assert sorted(copies_of(ve, "a")) == ["node2", "node4"] and ve["copies"] == 2  # the other site first
    assert {e["site"] for e in ve["replicas"]["a"]} == {"lyon"} and ve["added"] == {"a": copies_of(ve, "a")}
    for node in ("node2", "node4"):
        free = host_info(cluster4, node)["free"]
        assert (free["vcpus"], free["memory_mb"]) == (before[node]["vcpus"] - 2, before[node]["memory_mb"] - 1024)
        assert standbys(cluster4, node) == ["rep:a"]
    assert domains(cluster4, "rep:a") == {"node1": "running"}  # a standby is not a domain
    shown = cluster4.json("--agent", "node2", "ve", "show", "rep")
    assert [e["standby"] for e in shown["replicas"]["a"]] == ["held", "held"]
    located = cluster4.json("--agent", "node4", "ve", "locate", "rep")["vms"]["a"]
    assert sorted(r["node"] for r in located["replicas"]) == ["node2", "node4"]
    assert "node2 (lyon)" in cluster4.cli("--agent", "node4", "ve", "locate", "rep").stdout

    again = cluster4.json("--agent", "node2", "ve", "replicate", "rep", "--copies", "2")  # refreshes
    assert sorted(copies_of(again, "a")) == ["node2", "node4"] and again["added"] == {} == again["dropped"]
    assert min(e["taken"] for e in again["replicas"]["a"]) > max(e["taken"] for e in ve["replicas"]["a"])

    one = cluster4.json("--agent", "node1", "ve", "replicate", "rep", "--copies", "1")
    kept, dropped = copies_of(one, "a"), one["dropped"]["a"]
    assert len(kept) == 1 and len(dropped) == 1 and set(kept + dropped) == {"node2", "node4"}
    assert host_info(cluster4, dropped[0])["free"] == before[dropped[0]] and standbys(cluster4, dropped[0]) == []
    none = cluster4.json("--agent", "node1", "ve", "replicate", "rep", "--copies", "0")
    assert "replicas" not in none or none["replicas"] == {}
    assert all(host_info(cluster4, n)["free"] == before[n] for n in before)

    assert refused(cluster4, "--agent", "node1", "ve", "replicate", "rep", "--copies", "-1") == \
        "error: copies must be a whole number from 0 to 16"
    assert refused(cluster4, "--agent", "node1", "ve", "replicate", "rep", "--copies", "4") == \
        "error: cannot keep 4 standby copies of rep/a: there are only 3 live nodes besides its host node1"
    wide = cluster4.json("--agent", "node3", "ve", "create", write_spec(tmp_path, "wide", [("w", 15, 1024)]))
    assert wide["placement"]["w"]["node"] == "node3"
    assert refused(cluster4, "--agent", "node3", "ve", "replicate", "wide", "--copies", "3") == (
        "error: cannot keep 3 standby copies of wide/w: only 2 of the 3 other live nodes have room for one "
        "(15 vCPUs, 1024 MiB, 1 GiB)")
    assert all(standbys(cluster4, n) == [] for n in ("node1", "node2", "node4"))  # nothing half-done
    cluster4.cli("--agent", "node3", "ve", "destroy", "wide")

    dave = client_config(cluster4, tmp_path, "dave")
    for verb in (["replicate", "rep", "--copies", "1"], ["failover", "rep", "--force"]):
        assert "belongs to 'operator'; 'dave' may not act on it" in refused(
            cluster4, "--config", dave, "--agent", "node2", "ve", *verb)

    cluster4.json("--agent", "node4", "ve", "replicate", "rep", "--copies", "3")
    moved = cluster4.json("--agent", "node4", "ve", "relocate", "rep", "--to", "node2")  # onto one of its copies
    assert moved["placement"]["a"]["node"] == "node2" and sorted(copies_of(moved, "a")) == ["node3", "node4"]
    assert standbys(cluster4, "node2") == [] and domains(cluster4, "rep:a") == {"node2": "running"}
    cluster4.cli("--agent", "node1", "ve", "destroy", "rep")  # drops the copies too
    assert all(standbys(cluster4, n) == [] for n in ("node1", "node2", "node3", "node4"))
    assert all(host_info(cluster4, n)["free"] == host_info(cluster4, n)["total"] for n in ("node1", "node4"))


def desired(cluster, node, domain):
    """The state the host persisted for `domain` (what it brings the VM back to after a restart)."""
    db = Path(cluster.node(node)["config"]).parent / "data" / "host.sqlite"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return conn.execute("SELECT desired FROM domains WHERE name = ?", (domain,)).fetchone()[0]


def test_stop_takes_a_timeout_or_force_and_leaves_everything_off(cluster4, tmp_path):
    ve = cluster4.json("--agent", "node2", "ve", "create", write_spec(tmp_path, "stopper", [("s", 1, 128)]))
    node = ve["placement"]["s"]["node"]
    assert cluster4.json("--agent", "node3", "ve", "stop", "stopper", "--timeout", "5")["state"] == "stopped"
    assert domains(cluster4, "stopper:s") == {node: "shutoff"} and desired(cluster4, node, "stopper:s") == "shutoff"
    rule = "timeout must be a number of seconds, more than 0 and at most 600"
    for bad in ("0", "601", "-3"):
        assert refused(cluster4, "--agent", "node1", "ve", "stop", "stopper", "--timeout", bad) == f"error: {rule}"
    for bad, why in ((0, rule), (601, rule), ("soon", "timeout: expected a finite number, got 'soon'"),
                     (True, "timeout: expected a finite number, got True")):  # the host checks it too
        with pytest.raises(RemoteError, match=why):
            host_call(cluster4, node, "host.vm.stop", {"name": "stopper:s", "timeout": bad})
    proc = cluster4.cli("--agent", "node1", "ve", "stop", "stopper", "--force", "--timeout", "3", check=False)
    assert proc.returncode == 2 and proc.stderr == "error: give --timeout or --force, not both\n"

    assert cluster4.json("--agent", "node1", "ve", "start", "stopper")["state"] == "running"
    assert desired(cluster4, node, "stopper:s") == "running"
    assert cluster4.json("--agent", "node4", "ve", "stop", "stopper", "--force")["state"] == "stopped"
    assert domains(cluster4, "stopper:s") == {node: "shutoff"} and desired(cluster4, node, "stopper:s") == "shutoff"
    cluster4.cli("--agent", "node1", "ve", "destroy", "stopper")


def test_failover_after_kill_9_of_the_host_runs_the_vm_on_its_copy_and_only_there(cluster4, tmp_path):
    created = cluster4.json("--agent", "node1", "ve", "create", write_spec(tmp_path, "fo", [("x", 1, 256),
                                                                                           ("y", 1, 256)]))
    assert {slot["node"] for slot in created["placement"].values()} == {"node1"}
    ve = cluster4.json("--agent", "node3", "ve", "replicate", "fo", "--copies", "1")
    assert {e["site"] for vm in ("x", "y") for e in ve["replicas"][vm]} == {"lyon"}
    assert refused(cluster4, "--agent", "node2", "ve", "failover", "fo") == (
        "error: cannot fail over fo: the host of its VMs node1 is alive and answering (--force fails over anyway, "
        "switching the running copy off first)")
    assert "cannot fail over fo/x: its host node1 is alive" in refused(
        cluster4, "--agent", "node2", "ve", "failover", "fo", "--vm", "x")

    cluster4.kill9("node1")
    done = cluster4.json("--agent", "node2", "ve", "failover", "fo")
    targets = {vm: copies_of(ve, vm)[0] for vm in ("x", "y")}
    assert done["failed_over"] == targets and done.get("replicas", {}) == {}  # each used its only copy
    shown = cluster4.json("--agent", "node4", "ve", "show", "fo")
    assert shown["state"] == "running"
    for vm, node in targets.items():
        assert shown["placement"][vm]["node"] == node and shown["placement"][vm]["domain_state"] == "running"
        assert "failed over from node1" in shown["placement"][vm]["why"]
        assert domains(cluster4, f"fo:{vm}") == {node: "running"}
    assert "cannot fail over fo: the host" in refused(cluster4, "--agent", "node3", "ve", "failover", "fo")

    back_and_fenced(cluster4, "node1", {f"fo:{vm}": node for vm, node in targets.items()})
    cluster4.cli("--agent", "node1", "ve", "destroy", "fo")


def back_and_fenced(cluster, host, placed):
    """Restart `host`, whose VMs run elsewhere now (`placed`: domain -> node): it comes back with its old copies
    defined, held off, and removes them once it reads where the VMs run; it never runs them meanwhile, and its
    room is all free again."""
    restart(cluster, host)
    ran_there = []

    def fenced():
        try:
            mine = host_info(cluster, host)["domains"]
            ran_there.extend(d["name"] for d in mine if d["state"] != "shutoff")
            return mine == [] and all(domains(cluster, d) == {node: "running"} for d, node in placed.items())
        except RpcError:
            return False  # the host is not serving yet

    wait_for(fenced, what=f"{host}, back, removed its old copies",
             detail=lambda: f"where: {({d: domains(cluster, d) for d in placed})}")
    assert ran_there == []
    info = host_info(cluster, host)
    assert info["free"] == info["total"]


def test_failover_whose_coordinator_dies_before_the_promotion_is_undone_then_done_again(cluster4, tmp_path):
    cluster4.json("--agent", "node1", "ve", "create", write_spec(tmp_path, "half", [("h", 1, 128)]))
    copy_node = copies_of(cluster4.json("--agent", "node1", "ve", "replicate", "half", "--copies", "1"), "h")[0]
    # node3 coordinates, and stops once the intent is written (ve_base.pause_for_test) until it is killed;
    # once rejoined, not merely answering, so it knows the VE and where its copy is
    cluster4.kill9("node3")
    restart(cluster4, "node3", DISCOVERY_TEST_PAUSE="failover:600")
    rejoined(cluster4, "node3", ve="half")
    cluster4.kill9("node1")
    failover = subprocess.Popen([sys.executable, "-m", "discovery", "--config", str(cluster4.dir / "client.toml"),
                                 "--agent", "node3", "ve", "failover", "half"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=cluster4.env)

    def intent_written():
        if failover.poll() is not None:
            raise AssertionError(f"the failover ended before its intent was seen: {failover.communicate()}")
        located = cluster4.try_json("--agent", "node2", "ve", "locate", "half")
        return located is not None and located["vms"]["h"].get("failing_over", {}).get("node") == copy_node

    try:
        wait_for(intent_written, what="the failover's intent in the directory")
        cluster4.kill9("node3")
    finally:
        failover.kill()
        failover.communicate()
    assert domains(cluster4, "half:h") == {}  # the old host is dead, the copy not promoted: nowhere yet

    # the next command through another agent undoes the intent (refused while node3 is not known dead)
    # and then fails over for real: the VM runs at exactly one place
    wait_for(lambda: cluster4.cli("--agent", "node2", "ve", "failover", "half", check=False).returncode == 0,
             SETTLE_DEADLINE, "the next failover settles the interrupted one, then fails over")
    located = cluster4.json("--agent", "node4", "ve", "locate", "half")["vms"]["h"]
    assert located["node"] == copy_node and "failing_over" not in located
    assert domains(cluster4, "half:h") == {copy_node: "running"}
