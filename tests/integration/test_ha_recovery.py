"""Recovery with no operator (`discovery.ha`), on a real 4-agent, 2-site cluster (node1 and node3 in rennes, node2
and node4 in lyon; libvirt test:///): after kill -9 of a protected VE's host, its watchers revoke the host's
lease and run the VE elsewhere without any command; the host, back, finds its lease revoked and never runs the
stale copies; a standby VE is failed over onto its copy, and its copy made again; an unprotected VE stays
where it was; 20 VEs of one host all run again. On the network-namespace testbed, a host cut off at the
router freezes its VM before the VE runs elsewhere, and runs nothing stale once healed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from discovery.ha.lease import lease_key
from discovery.ha.watch import watchers_of
from overlay.quorum import replicas_among

from .conftest import rejoined, restart, running_cluster, wait_for
from .test_ha_policy import spec
from .test_metrics import scrape
from .test_relocate import domains, host_info
from .test_replicas import copies_of, standbys
from .test_testbed import running_testbed

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster4(tmp_path_factory):
    with running_cluster(tmp_path_factory, "harecover4", 4, 2, extra=("--vcpus", "32")) as cluster:
        yield cluster


def placed(cluster, name, via):
    shown = cluster.try_json("--agent", via, "ve", "show", name)
    return {vm: (s["node"], s.get("domain_state")) for vm, s in shown["placement"].items()} if shown else None


def lease(cluster, via, node):
    """`node`'s lease as the watchers read it (None: it never held one)."""
    record = cluster.call(via, "ha.lease", {"node": node})
    return record["lease"] if record is not None else None


def runs_once(cluster, domain, node):
    """Wait until `domain` runs on `node` and is defined nowhere else. Waited for, not asserted at once: on a
    loaded machine a renewal may come late, and a host then pauses its protected VMs for a moment (a freeze is
    no double run; `domains` would show it paused)."""
    wait_for(lambda: domains(cluster, domain) == {node: "running"}, what=f"{domain} running on {node} alone")


def other(cluster, host):
    """A running agent other than `host`, to ask."""
    return next(n for n in cluster.running() if n != host)


def listed(cluster, host, ves):
    """Wait until `host`'s lease lists `ves`, as it does a moment after they run there."""
    def lists():
        record = lease(cluster, other(cluster, host), host)
        return record is not None and set(ves) <= set(record["ves"])

    wait_for(lists, what=f"{host}'s lease listing {', '.join(ves)}")


def back_and_fenced(cluster, host, gone):
    """Restart `host`: it reads its lease revoked, and removes its copies of `gone` (domains) without running
    them meanwhile; then it holds a new lease."""
    restart(cluster, host)
    rejoined(cluster, host)

    def fenced():
        mine = {d["name"]: d["state"] for d in host_info(cluster, host)["domains"]}
        assert all(mine.get(d) in (None, "shutoff") for d in gone), mine
        return not set(gone) & set(mine)

    wait_for(fenced, what=f"{host}'s copies of {', '.join(gone)} removed")
    wait_for(lambda: lease(cluster, other(cluster, host), host)["holder"] == host,
             what=f"{host} holding a new lease")


def test_a_protected_ve_runs_elsewhere_after_kill_9_of_its_host_with_no_command(cluster4, tmp_path):
    cluster4.json("--agent", "node1", "ve", "create", spec(tmp_path, "auto", "{mode: restart}", [("a", 1, 256)]))
    plain = cluster4.json("--agent", "node1", "ve", "create", spec(tmp_path, "plain", None, [("p", 1, 256)]))
    assert plain["placement"]["p"]["node"] == "node1"
    assert placed(cluster4, "auto", "node2") == {"a": ("node1", "running")}

    listed(cluster4, "node1", ["auto"])
    cluster4.kill9("node1")
    recovered = wait_for(lambda: (placed(cluster4, "auto", "node2") or {}).get("a", ("node1",))[0] != "node1"
                         and placed(cluster4, "auto", "node2"), what="auto recovered off node1, no command")
    node = recovered["a"][0]
    assert node in ("node2", "node3", "node4") and recovered["a"][1] == "running"
    runs_once(cluster4, "auto:a", node)
    shown = cluster4.json("--agent", "node4", "ve", "show", "auto")
    assert "HA lease (epoch" in shown["placement"]["a"]["why"] and "revoked by node" in shown["placement"]["a"]["why"]
    revoked = lease(cluster4, "node2", "node1")
    assert revoked["holder"] is None and revoked["ves"] == ["auto"]
    recoveries = {n: scrape(cluster4.node(n)["metrics"])[("discovery_ha_recoveries_total", ())]
                  for n in ("node2", "node3", "node4")}
    assert sum(recoveries.values()) == 1 and recoveries[revoked["revoked_by"]] == 1, recoveries  # one recovery
    assert placed(cluster4, "plain", "node2")["p"][0] == "node1"  # unprotected: left where it was

    back_and_fenced(cluster4, "node1", ["auto:a"])
    runs_once(cluster4, "auto:a", node)
    assert lease(cluster4, "node3", "node1")["epoch"] > revoked["epoch"]
    for name in ("auto", "plain"):
        cluster4.cli("--agent", "node2", "ve", "destroy", name)


def test_a_standby_ve_fails_over_onto_its_copy_and_gets_a_new_one(cluster4, tmp_path):
    created = cluster4.json("--agent", "node2", "ve", "create",
                            spec(tmp_path, "hot", "{mode: standby, copies: 1}", [("a", 1, 256)]))
    assert created["placement"]["a"]["node"] == "node2"
    [copy] = copies_of(created, "a")
    assert copy in ("node1", "node3")  # the other site first
    listed(cluster4, "node2", ["hot"])
    cluster4.kill9("node2")

    def failed_over():
        shown = cluster4.try_json("--agent", "node4", "ve", "show", "hot")
        return shown if shown and shown["placement"]["a"]["node"] == copy else None

    shown = wait_for(failed_over, what="hot failed over onto its copy, no command")
    assert shown["placement"]["a"]["domain_state"] == "running" and "revoked by node" in shown["placement"]["a"]["why"]
    runs_once(cluster4, "hot:a", copy)

    def protected_again():
        shown = cluster4.try_json("--agent", "node4", "ve", "show", "hot")
        return shown if shown and shown["protection"]["a"]["status"] == "protected" else None

    shown = wait_for(protected_again, what="a new standby copy of hot:a")
    [new] = copies_of(shown, "a")
    assert new not in (copy, "node2") and "hot:a" in standbys(cluster4, new)
    back_and_fenced(cluster4, "node2", ["hot:a"])
    cluster4.cli("--agent", "node4", "ve", "destroy", "hot")


def test_twenty_protected_ves_of_one_host_killed_at_once_all_run_again(cluster4, tmp_path):
    names = [f"many{i:02d}" for i in range(20)]
    for name in names:
        created = cluster4.json("--agent", "node3", "ve", "create", spec(tmp_path, name, "{mode: restart}",
                                                                         [("a", 1, 128)]))
        assert created["placement"]["a"]["node"] == "node3"
    listed(cluster4, "node3", names)
    cluster4.kill9("node3")

    def hosts():
        found = {}
        for name in names:
            shown = cluster4.try_json("--agent", "node1", "ve", "show", name)
            if shown is None:
                return None
            found[name] = (shown["placement"]["a"]["node"], shown["placement"]["a"].get("domain_state"))
        return found

    def all_moved():
        found = hosts()
        return found if found and all(node != "node3" for node, _ in found.values()) else None

    moved = wait_for(all_moved, what="the 20 VEs of node3 recovered, no command", interval=1)
    assert all(state == "running" for _, state in moved.values()), moved
    for name in names:
        assert len(domains(cluster4, f"{name}:a")) == 1  # each runs once
    back_and_fenced(cluster4, "node3", [f"{name}:a" for name in names])
    for name in names:
        cluster4.cli("--agent", "node1", "ve", "destroy", name)


@pytest.mark.skipif(os.geteuid() != 0, reason="the testbed needs root (ip netns add)")
def test_a_partitioned_host_freezes_its_vms_the_ve_runs_once_elsewhere_and_nothing_stale_after_heal(tmp_path):
    """On the network-namespace testbed (3 nodes, one per site): node1 is cut off both ways at the router. Its
    lease lapses, so it pauses its protected VM, before node2 or node3 revoke the lease and run the VE; healed,
    node1 reads its lease revoked and removes its copy, never having run it again."""
    with running_testbed(tmp_path, "test", tmp_path / "home") as bed:
        node1_ns = next(n["namespace"] for n in json.loads((bed.dir / "testbed.json").read_text())["nodes"]
                        if n["name"] == "node1")

        def node1_ha():  # asked from inside node1's namespace: the partition is at the router
            proc = subprocess.run(["ip", "netns", "exec", node1_ns, sys.executable, "-m", "discovery", "--config",
                                   str(bed.dir / "client.toml"), "--agent", "node1", "ha", "status", "--json"],
                                  capture_output=True, text=True, env=bed.env, timeout=60)
            return json.loads(proc.stdout) if proc.returncode == 0 else None

        created = bed.json("--agent", "node1", "ve", "create", spec(tmp_path, "iso", "{mode: restart}",
                                                                    [("a", 1, 256)]))
        assert created["placement"]["a"]["node"] == "node1"
        listed(bed, "node1", ["iso"])
        bed.cli("testbed", "partition", "node1", "--dir", str(bed.dir))
        frozen = wait_for(lambda: (s := node1_ha()) and s["frozen"] and s, what="node1 frozen, cut off")
        assert frozen["frozen_vms"] == ["iso:a"]

        def elsewhere():
            shown = bed.try_json("--agent", "node2", "ve", "show", "iso")
            slot = shown["placement"]["a"] if shown else None
            return slot if slot and slot["node"] != "node1" and slot.get("domain_state") == "running" else None

        moved = wait_for(elsewhere, what="iso running off node1, no command")
        assert node1_ha()["frozen_vms"] == ["iso:a"]  # still paused there: it never ran twice
        bed.cli("testbed", "heal", "--dir", str(bed.dir))

        def fenced():
            mine = {d["name"]: d["state"] for d in host_info(bed, "node1")["domains"]}
            assert mine.get("iso:a") in (None, "paused", "shutoff"), mine  # never running again
            return "iso:a" not in mine

        wait_for(fenced, what="node1's copy of iso:a removed once healed")
        runs_once(bed, "iso:a", moved["node"])
        wait_for(lambda: lease(bed, "node2", "node1")["holder"] == "node1", what="node1 holding a new lease")
        bed.cli("--agent", "node2", "ve", "destroy", "iso")


def test_a_watcher_killed_during_a_recovery_leaves_it_to_the_other_watcher(cluster4, tmp_path):
    """The watcher that revokes a host's lease (either of its two: the first usually, but not always) dies before
    recovering anything (DISCOVERY_TEST_PAUSE holds both watchers there, as revokers only); the other, which
    confirmed the revocation, recovers the VE once SWIM holds the revoker dead: it runs once, elsewhere. The
    host is one whose lease record (3 replicas among the 4 nodes) does not have it and both its watchers as
    replicas: with two of its three replicas dead, the record could be neither read nor written (a majority
    is needed) until one came back."""
    members = [(m["name"], m["site"]) for m in cluster4.json("--agent", "node2", "members")]
    sites = dict(members)

    def recoverable(host):
        replicas = set(replicas_among(lease_key(host), [(n, n) for n, _ in members], 3))
        return all(len({host, w} & replicas) < 2 for w in watchers_of(host, sites[host], members))

    host = next(name for name, _ in sorted(members) if recoverable(name))
    watchers = watchers_of(host, sites[host], members)
    for watcher in watchers:
        cluster4.kill9(watcher)
        restart(cluster4, watcher, DISCOVERY_TEST_PAUSE="recover:600")
        rejoined(cluster4, watcher)
    created = cluster4.json("--agent", host, "ve", "create", spec(tmp_path, "orphan", "{mode: restart}",
                                                                  [("a", 1, 256)]))
    assert created["placement"]["a"]["node"] == host
    listed(cluster4, host, ["orphan"])
    cluster4.kill9(host)
    ask = next(n for n, _ in members if n not in (host, *watchers))
    revoked = wait_for(lambda: (r := lease(cluster4, ask, host)) and r["holder"] is None and r,
                       what=f"{host}'s lease revoked")
    revoker = revoked["revoked_by"]
    other = next(w for w in watchers if w != revoker)
    cluster4.kill9(revoker)  # it recovered nothing

    def recovered():
        shown = cluster4.try_json("--agent", ask, "ve", "show", "orphan")
        slot = shown["placement"]["a"] if shown else None
        ok = slot and slot["node"] not in (host, revoker) and not slot.get("rebuilding")
        return slot if ok and slot.get("domain_state") == "running" else None

    slot = wait_for(recovered, what=f"orphan recovered by {other}")
    assert f"revoked by {revoker}" in slot["why"]  # the reason is the revocation's, whoever recovered
    runs_once(cluster4, "orphan:a", slot["node"])
    restart(cluster4, revoker)  # the other keeps running: it may host the VE now (the module's last test)
    rejoined(cluster4, revoker)
    back_and_fenced(cluster4, host, ["orphan:a"])
    runs_once(cluster4, "orphan:a", slot["node"])
    cluster4.cli("--agent", ask, "ve", "destroy", "orphan")
