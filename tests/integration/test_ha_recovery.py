"""Recovery with no operator (`discovery.ha`), on a real 4-agent, 2-site cluster (node1 and node3 in rennes, node2
and node4 in lyon; libvirt test:///): after kill -9 of a protected VE's host, its watchers revoke the host's
lease and run the VE elsewhere without any command; the host, back, finds its lease revoked and never runs the
stale copies; a standby VE is failed over onto its copy, and its copy made again; an unprotected VE stays
where it was."""

from __future__ import annotations

import pytest

from .conftest import rejoined, restart, running_cluster, wait_for
from .test_ha_policy import spec
from .test_relocate import domains, host_info

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster4(tmp_path_factory):
    with running_cluster(tmp_path_factory, "harecover4", 4, 2) as cluster:
        yield cluster


def placed(cluster, name, via):
    shown = cluster.try_json("--agent", via, "ve", "show", name)
    return {vm: (s["node"], s.get("domain_state")) for vm, s in shown["placement"].items()} if shown else None


def lease(cluster, via, node):
    """`node`'s lease as the watchers read it (None: it never held one)."""
    record = cluster.call(via, "ha.lease", {"node": node})
    return record["lease"] if record is not None else None


def test_a_protected_ve_runs_elsewhere_after_kill_9_of_its_host_with_no_command(cluster4, tmp_path):
    cluster4.json("--agent", "node1", "ve", "create", spec(tmp_path, "auto", "{mode: restart}", [("a", 1, 256)]))
    plain = cluster4.json("--agent", "node1", "ve", "create", spec(tmp_path, "plain", None, [("p", 1, 256)]))
    assert plain["placement"]["p"]["node"] == "node1"
    assert placed(cluster4, "auto", "node2") == {"a": ("node1", "running")}

    def listed():  # the host's lease lists the VE before anything may fail
        record = lease(cluster4, "node2", "node1")
        return record is not None and "auto" in record["ves"]

    wait_for(listed, what="node1's lease listing auto")
    cluster4.kill9("node1")
    recovered = wait_for(lambda: (placed(cluster4, "auto", "node2") or {}).get("a", ("node1",))[0] != "node1"
                         and placed(cluster4, "auto", "node2"), what="auto recovered off node1, no command")
    node = recovered["a"][0]
    assert node in ("node2", "node3", "node4") and recovered["a"][1] == "running"
    assert domains(cluster4, "auto:a") == {node: "running"}
    shown = cluster4.json("--agent", "node4", "ve", "show", "auto")
    assert "HA lease (epoch" in shown["placement"]["a"]["why"] and "revoked by node" in shown["placement"]["a"]["why"]
    revoked = lease(cluster4, "node2", "node1")
    assert revoked["holder"] is None and revoked["ves"] == ["auto"]
    assert placed(cluster4, "plain", "node2")["p"][0] == "node1"  # unprotected: left where it was

    restart(cluster4, "node1")
    rejoined(cluster4, "node1", ve="auto")

    def fenced():  # the host back reads its lease revoked: the stale copy goes, and it never ran meanwhile
        mine = {d["name"]: d["state"] for d in host_info(cluster4, "node1")["domains"]}
        assert mine.get("auto:a") in (None, "shutoff"), mine
        return "auto:a" not in mine

    wait_for(fenced, what="node1's copy of auto:a removed")
    assert domains(cluster4, "auto:a") == {node: "running"}
    wait_for(lambda: lease(cluster4, "node3", "node1")["holder"] == "node1", what="node1 holding a new lease")
    assert lease(cluster4, "node3", "node1")["epoch"] > revoked["epoch"]
    for name in ("auto", "plain"):
        cluster4.cli("--agent", "node2", "ve", "destroy", name)
