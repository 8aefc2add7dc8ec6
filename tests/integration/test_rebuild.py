"""Rebuilding VMs whose host is down (`ve rebuild`) on a real 4-agent, 2-site cluster (node1 and node3 in rennes,
node2 and node4 in lyon; libvirt test:///): after kill -9 of the host, the VMs run elsewhere, in the old host's
site; the old host, back, never runs its stale copies and drops them; a VM with a shipped snapshot boots the
newest; a rebuild whose coordinator dies is settled by the next command."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import SETTLE_DEADLINE, rejoined, restart, running_cluster, ve_name_outliving, wait_for
from .test_relocate import domains
from .test_replicas import back_and_fenced, refused
from .test_ve_lifecycle import write_spec

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster4(tmp_path_factory):
    with running_cluster(tmp_path_factory, "rebuild4", 4, 2) as cluster:
        yield cluster


def test_rebuild_after_kill_9_runs_the_vms_in_the_old_hosts_site_and_the_host_back_never_runs_them(
        cluster4, tmp_path):
    created = cluster4.json("--agent", "node1", "ve", "create", write_spec(tmp_path, "rb", [("x", 1, 256),
                                                                                           ("y", 1, 256)]))
    assert {slot["node"] for slot in created["placement"].values()} == {"node1"}
    assert refused(cluster4, "--agent", "node2", "ve", "rebuild", "rb") == (
        "error: cannot rebuild rb: the host of its VMs node1 is alive and answering (--force rebuilds anyway, "
        "switching the running copy off first)")
    assert "cannot rebuild rb/x: its host node1 is alive" in refused(
        cluster4, "--agent", "node2", "ve", "rebuild", "rb", "--vm", "x")
    assert "VE 'rb' has no VM 'z' (VMs: x, y)" in refused(cluster4, "--agent", "node2", "ve", "rebuild", "rb",
                                                          "--vm", "z")

    cluster4.kill9("node1")
    # retried while the directory's write cannot reach a majority of the record's replicas yet (one may be on
    # node1 until SWIM says it is dead); a retry first settles what a failed attempt left
    done = wait_for(lambda: cluster4.try_json("--agent", "node2", "ve", "rebuild", "rb"), what="ve rebuild")
    assert {vm: slot["node"] for vm, slot in done["placement"].items()} == {"x": "node3", "y": "node3"}  # its site
    shown = wait_for(lambda: cluster4.try_json("--agent", "node4", "ve", "show", "rb"),  # its ring may be mending
                     what="ve show through node4")
    assert shown["state"] == "running"
    for vm in ("x", "y"):
        slot = shown["placement"][vm]
        assert slot["node"] == "node3" and slot["domain_state"] == "running" and "rebuilding" not in slot
        assert slot["why"] == "rebuilt, its host node1 lost (node1 does not answer)"
        assert domains(cluster4, f"rb:{vm}") == {"node3": "running"}
    assert "cannot rebuild rb: the host of its VMs node3 is alive" in refused(
        cluster4, "--agent", "node4", "ve", "rebuild", "rb")

    back_and_fenced(cluster4, "node1", {"rb:x": "node3", "rb:y": "node3"})
    rejoined(cluster4, "node1", ve="rb")
    forced = cluster4.json("--agent", "node1", "ve", "rebuild", "rb", "--vm", "x", "--force")
    assert forced["rebuilt"] == {"x": "node1"}  # node3 alive: its copy switched off, then undefined
    assert "forced while node3 was alive" in forced["placement"]["x"]["why"]
    assert domains(cluster4, "rb:x") == {"node1": "running"}
    cluster4.cli("--agent", "node1", "ve", "destroy", "rb")


def test_a_vm_with_a_shipped_snapshot_is_rebuilt_booting_the_newest(cluster4, tmp_path):
    created = cluster4.json("--agent", "node1", "ve", "create", write_spec(tmp_path, "sn", [("a", 1, 256)]))
    assert created["placement"]["a"]["node"] == "node1"
    image = cluster4.json("--agent", "node3", "ve", "ship", "sn")["vms"]["a"]["shipped"]["image"]
    cluster4.kill9("node1")
    done = wait_for(lambda: cluster4.try_json("--agent", "node2", "ve", "rebuild", "sn"), what="ve rebuild")
    slot = done["placement"]["a"]
    assert slot["node"] == "node3" and slot["why"].startswith(f"rebuilt from image {image}, its host node1 lost")
    assert domains(cluster4, "sn:a") == {"node3": "running"}
    back_and_fenced(cluster4, "node1", {"sn:a": "node3"})
    rejoined(cluster4, "node1", ve="sn")
    cluster4.cli("--agent", "node1", "ve", "destroy", "sn")
    cluster4.cli("--agent", "node1", "image", "rm", image)


def test_a_rebuild_whose_coordinator_dies_is_undone_then_done_by_the_next_command(cluster4, tmp_path):
    # node1 and node2 die: a name whose record keeps two of its three replicas
    half = ve_name_outliving("half", ["node1", "node2", "node3", "node4"], {"node1", "node2"})
    cluster4.json("--agent", "node1", "ve", "create", write_spec(tmp_path, half, [("h", 1, 128)]))
    # node2 (lyon) coordinates, and stops once the intent is written (ve_base.pause_for_test) until it is
    # killed; once rejoined, not merely answering, so it knows the VE
    cluster4.kill9("node2")
    restart(cluster4, "node2", DISCOVERY_TEST_PAUSE="rebuild:600")
    rejoined(cluster4, "node2", ve=half)
    cluster4.kill9("node1")
    # the coordinator holds node1 dead first (as `ve rebuild` needs anyway), so that its ring no longer names
    # node1 among the record's replicas: the intent's write would else wait on a dead replica and fail
    wait_for(lambda: any(m["name"] == "node1" and m["status"] == "dead"
                         for m in cluster4.call("node2", "agent.members", {})), what="node2 holding node1 dead")
    rebuild = subprocess.Popen([sys.executable, "-m", "discovery", "--config", str(cluster4.dir / "client.toml"),
                                "--agent", "node2", "ve", "rebuild", half], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=cluster4.env)

    def intent_written():
        if rebuild.poll() is not None:
            raise AssertionError(f"the rebuild ended before its intent was seen: {rebuild.communicate()}")
        located = cluster4.try_json("--agent", "node4", "ve", "locate", half)
        return located is not None and located["vms"]["h"].get("rebuilding", {}).get("node") == "node3"

    try:
        wait_for(intent_written, what="the rebuild's intent in the directory")
        cluster4.kill9("node2")
    finally:
        rebuild.kill()
        rebuild.communicate()
    assert domains(cluster4, f"{half}:h") == {}  # the old host is dead, node3 only reserved: nowhere yet

    # the next command through another agent undoes the intent (refused while node2 is not known dead)
    # and then rebuilds for real: the VM runs at exactly one place
    wait_for(lambda: cluster4.cli("--agent", "node4", "ve", "rebuild", half, check=False).returncode == 0,
             SETTLE_DEADLINE, "the next rebuild settles the interrupted one, then rebuilds")
    located = cluster4.json("--agent", "node3", "ve", "locate", half)["vms"]["h"]
    # node3, or node4 while the dead coordinator's reservation on node3 has not lapsed yet
    assert located["node"] in ("node3", "node4") and "rebuilding" not in located
    assert domains(cluster4, f"{half}:h") == {located["node"]: "running"}
