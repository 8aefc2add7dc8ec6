"""Faults on real agent processes: kill -9, restarts, unauthenticated peers, and hostile frames."""

from __future__ import annotations

import json
import os
import ssl
import struct
import subprocess
import sys

import pytest
import trio

from overlay.wire import frames, tls, versions
from overlay.wire.ca import init_ca, issue
from overlay.wire.rpc import REQUEST, RESPONSE, Transport, Unreachable

from .conftest import SETTLE_DEADLINE, pid_alive, rejoined, restart, wait_for
from .test_relocate import domains, host_call, host_info
from .test_ve_lifecycle import write_spec

pytestmark = pytest.mark.integration


def holding(cluster, names, key):
    """The agents whose own DHT shard holds `key` (`overlay.scan` answers from the agent's shard only)."""
    return [n for n in names
            if any(r[0] == key for r in host_call(cluster, n, "overlay.scan", {"overlay": "chord", "prefix": key}))]


def test_ve_survives_kill_9_of_two_agents_that_do_not_host_it(cluster_factory, tmp_path):
    cluster = cluster_factory(6, 3)
    ve = cluster.json("--agent", "node1", "ve", "create", write_spec(tmp_path, "keep", [("a", 1, 256)]))
    host = ve["placement"]["a"]["node"]
    names = [f"node{i}" for i in range(1, 7)]
    # the VE's record (the VE index is a record of its own): written to a majority of its five fixed replicas
    # (`overlay.quorum`), on the others at once or, if an answer came late (a loaded machine), by the next read
    # repair or anti-entropy round
    replicas = wait_for(lambda: len(found := holding(cluster, names, "ve/keep")) == 5 and found,
                        what="the record on its five replicas")
    victims = ([n for n in replicas if n != host] + [n for n in names if n not in replicas and n != host])[:2]
    for victim in victims:
        cluster.kill9(victim)

    survivor = next(n for n in names if n not in victims and n != host)

    def dead_marked():
        members = cluster.json("--agent", survivor, "members")
        return {m["name"] for m in members if m["status"] == "dead"} == set(victims)

    wait_for(dead_marked, what="the killed agents marked dead")
    for through in (n for n in names if n not in victims):
        assert [v["name"] for v in cluster.json("--agent", through, "ve", "list")["ves"]] == ["keep"]
    shown = cluster.json("--agent", survivor, "ve", "show", "keep")
    assert shown["placement"]["a"]["domain_state"] == "running"
    # the record can still be changed, and repair brings it back to three live replicas
    assert cluster.json("--agent", survivor, "ve", "stop", "keep")["state"] == "stopped"
    live = [n for n in names if n not in victims]
    wait_for(lambda: len(holding(cluster, live, "ve/keep")) >= 3, what="the record back on three live replicas")


def test_restarted_host_recovers_its_vms(cluster_factory, tmp_path):
    cluster = cluster_factory(3, 1)
    ve = cluster.json("--agent", "node2", "ve", "create", write_spec(tmp_path, "durable", [("a", 2, 512)]))
    assert ve["placement"]["a"]["node"] == "node2"
    cluster.kill9("node2")
    restart(cluster, "node2")

    def recovered():
        proc = cluster.cli("--agent", "node1", "ve", "show", "durable", "--json", check=False)
        return proc.returncode == 0 and '"domain_state": "running"' in proc.stdout

    wait_for(recovered, what="node2 brought its VM back after its restart")
    members = cluster.json("--agent", "node1", "members")
    assert all(m["status"] == "alive" for m in members)


# -- relocation interrupted by the death of its coordinator ------------------------------------------
# The coordinator is made to pause at one point of the move (DISCOVERY_TEST_PAUSE, read by every agent of
# the cluster, see discovery.ve.base.pause_for_test) and is killed there. Cluster of 4: node1 and node3 in
# rennes, node2 and node4 in lyon; the VM starts on node1, goes to node4, node3 coordinates.


def start_relocation(cluster, through, ve, target):
    return subprocess.Popen([sys.executable, "-m", "discovery", "--config", str(cluster.dir / "client.toml"),
                             "--agent", through, "ve", "relocate", ve, "--to", target],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cluster.env)


def moving_to(cluster, through, ve, vm):
    """The VM's unfinished move as the directory records it ({} if none)."""
    return cluster.json("--agent", through, "ve", "locate", ve)["vms"][vm].get("moving_to", {})


def kill_coordinator(cluster, name, relocation):
    cluster.kill9(name)
    try:
        relocation.wait(timeout=30)
    finally:
        if relocation.poll() is None:
            relocation.kill()
            relocation.wait()
    assert relocation.returncode == 1  # its client lost the agent


def test_coordinator_killed_after_the_target_started_the_vm_finishes_the_move_on_restart(
        cluster_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("DISCOVERY_TEST_PAUSE", "started:600")  # until killed
    cluster = cluster_factory(4, 2)
    ve = cluster.json("--agent", "node1", "ve", "create", write_spec(tmp_path, "moving", [("a", 2, 512)]))
    assert ve["placement"]["a"]["node"] == "node1"
    relocation = start_relocation(cluster, "node3", "moving", "node4")
    wait_for(lambda: moving_to(cluster, "node2", "moving", "a").get("phase") == "started",
             what="the move started at the target",
             detail=lambda: relocation.stderr.read() if relocation.poll() is not None else "")
    assert domains(cluster, "moving:a") == {"node1": "paused", "node4": "running"}  # source frozen meanwhile
    kill_coordinator(cluster, "node3", relocation)
    restart(cluster, "node3")

    def settled():
        slot = cluster.json("--agent", "node2", "ve", "locate", "moving")["vms"]["a"]
        return slot["node"] == "node4" and "moving_to" not in slot

    wait_for(settled, what="the restarted coordinator finished the move")
    assert domains(cluster, "moving:a") == {"node4": "running"}  # exactly one place, where the record says
    shown = cluster.json("--agent", "node1", "ve", "show", "moving")
    assert shown["state"] == "running" and shown["placement"]["a"]["domain_state"] == "running"
    source = host_info(cluster, "node1")
    assert source["free"] == source["total"]


def test_coordinators_killed_mid_relocation_or_mid_snapshot_are_undone_by_the_next_command(
        cluster_factory, tmp_path, monkeypatch):
    # until killed; a move's preparation gives up after PREPARE_LIMIT (60 s) whatever the pause
    monkeypatch.setenv("DISCOVERY_TEST_PAUSE", "prepared:600,snapshot:600")
    cluster = cluster_factory(5, 2)  # two coordinators die: three replicas of the record stay
    cluster.json("--agent", "node1", "ve", "create", write_spec(tmp_path, "moving", [("a", 2, 512)]))
    relocation = start_relocation(cluster, "node3", "moving", "node4")
    wait_for(lambda: domains(cluster, "moving:a") == {"node1": "paused"}, what="the VM exported and frozen")
    assert moving_to(cluster, "node2", "moving", "a") == {"node": "node4", "site": "lyon", "phase": "prepare"}
    kill_coordinator(cluster, "node3", relocation)

    # node3 stays dead: the next command on the VE, through another agent, undoes the move (refused, as
    # "in progress", until node3 is known dead) and then does its own work
    def started():
        return cluster.cli("--agent", "node2", "ve", "start", "moving", check=False).returncode == 0

    wait_for(started, SETTLE_DEADLINE, "the next command settles the interrupted move")
    assert domains(cluster, "moving:a") == {"node1": "running"}
    slot = cluster.json("--agent", "node4", "ve", "locate", "moving")["vms"]["a"]
    assert slot["node"] == "node1" and "moving_to" not in slot
    target = host_info(cluster, "node4")
    wait_for(lambda: host_info(cluster, "node4")["free"] == target["total"], what="the target's reservation lapsed")

    # a snapshot whose coordinator dies while the VMs are paused: the next command runs them again
    snapshot = subprocess.Popen([sys.executable, "-m", "discovery", "--config", str(cluster.dir / "client.toml"),
                                 "--agent", "node2", "ve", "snapshot", "moving", "--tag", "lost"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cluster.env)
    wait_for(lambda: domains(cluster, "moving:a") == {"node1": "paused"}, what="the VM paused for the snapshot")
    assert cluster.json("--agent", "node5", "ve", "show", "moving")["snapshotting"]["paused"] == ["a"]
    kill_coordinator(cluster, "node2", snapshot)
    wait_for(lambda: cluster.cli("--agent", "node5", "ve", "stop", "moving", check=False).returncode == 0,
             SETTLE_DEADLINE, "the next command settles the interrupted snapshot")
    assert domains(cluster, "moving:a") == {"node1": "shutoff"}  # not left paused: settled, then stopped
    assert cluster.json("--agent", "node4", "ve", "snapshots", "moving")["snapshots"] == []
    assert "snapshotting" not in cluster.json("--agent", "node4", "ve", "show", "moving")


# -- creation interrupted by the death of its coordinator ---------------------------------------------
# Cluster of 4 (node1, node3 in rennes; node2, node4 in lyon): a VE pinned to lyon is created through node3,
# which coordinates while its VM goes to a lyon node.


def start_create(cluster, through, spec):
    return subprocess.Popen([sys.executable, "-m", "discovery", "--config", str(cluster.dir / "client.toml"),
                             "--agent", through, "ve", "create", spec],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cluster.env)


def located(cluster, through, ve):
    """The VE's record as `ve locate` shows it ({} if there is none)."""
    proc = cluster.cli("--agent", through, "ve", "locate", ve, "--json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else {}


def test_coordinators_killed_mid_create_are_undone_or_finished(cluster_factory, tmp_path):
    cluster = cluster_factory(4, 2)

    def paused_create(ve, point):
        """Create `ve` (one VM, pinned to lyon) through node3, made to pause at `point` (until killed), and
        return once it is paused there."""
        if "node3" in cluster.running():
            cluster.kill9("node3")
        restart(cluster, "node3", DISCOVERY_TEST_PAUSE=f"{point}:600")
        rejoined(cluster, "node3")
        create = start_create(cluster, "node3", write_spec(tmp_path, ve, [("a", 2, 512)], "lyon"))
        wait_for(lambda: located(cluster, "node1", ve).get("vms") and (
            point == "placed" or list(domains(cluster, f"{ve}:a").values()) == ["running"]),
                 what=f"the create paused at {point}",
                 detail=lambda: create.stderr.read() if create.poll() is not None else "")
        assert located(cluster, "node1", ve)["state"] == "creating"
        return create

    # killed once the placement is written, no VM started: the next command, through another agent, undoes it
    # (refused as "in progress" until node3 is known dead); the reservation lapses
    kill_coordinator(cluster, "node3", paused_create("half", "placed"))
    host = located(cluster, "node1", "half")["vms"]["a"]["node"]
    assert host in ("node2", "node4") and domains(cluster, "half:a") == {}

    def undone():
        proc = cluster.cli("--agent", "node1", "ve", "start", "half", check=False)
        return "its create, left unfinished by node3, was rolled back" in proc.stderr

    wait_for(undone, SETTLE_DEADLINE, "the next command undoes the interrupted create")
    assert located(cluster, "node2", "half") == {} and domains(cluster, "half:a") == {}
    assert "half" not in [ve["name"] for ve in cluster.json("--agent", "node4", "ve", "list")["ves"]]
    total = host_info(cluster, host)["total"]
    wait_for(lambda: host_info(cluster, host)["free"] == total, what="the reservation lapsed")

    # the same, then the create retried through another agent: it settles the left one and goes on
    kill_coordinator(cluster, "node3", paused_create("again", "placed"))

    def created():
        proc = cluster.cli("--agent", "node1", "ve", "create", str(tmp_path / "again.yaml"), "--json", check=False)
        return proc.returncode == 0 and json.loads(proc.stdout)

    ve = wait_for(created, SETTLE_DEADLINE, "the retried create settles the interrupted one and goes on")
    assert ve["state"] == "running" and ve["coordinator"] == "node1"
    assert domains(cluster, "again:a") == {ve["placement"]["a"]["node"]: "running"}

    # killed once every VM runs, the record still `creating`: node3, restarted, finishes it by itself
    kill_coordinator(cluster, "node3", paused_create("whole", "confirmed"))
    restart(cluster, "node3")
    wait_for(lambda: located(cluster, "node1", "whole").get("state") == "running", SETTLE_DEADLINE,
             "the restarted coordinator finishes the create")
    host = located(cluster, "node2", "whole")["vms"]["a"]["node"]
    assert domains(cluster, "whole:a") == {host: "running"}  # exactly where the record says
    assert "whole" in [ve["name"] for ve in cluster.json("--agent", "node4", "ve", "list")["ves"]]


def test_cluster_down_leaves_no_agent_process(cluster_factory):
    cluster = cluster_factory(3, 2)
    pids = cluster.pids()
    assert all(pid_alive(p) for p in pids)
    proc = cluster.cli("cluster", "down", "--dir", str(cluster.dir))
    assert "stopped 3 agents" in proc.stdout
    assert not any(pid_alive(p) for p in pids)
    logs = [(cluster.dir / f"node{i}" / "agent.log").read_text() for i in (1, 2, 3)]
    assert all("leaving" in log and "Traceback" not in log for log in logs)  # SIGTERM: clean exit


# -- the wire under attack -------------------------------------------------------------------------


async def status_via(identity, addr):
    async with Transport(identity, node="probe") as transport:
        return await transport.call(addr, "agent.status", timeout=10)


def operator(cluster):
    return tls.Identity(cert=cluster.dir / "operator.pem", key=cluster.dir / "operator.key",
                        ca=cluster.dir / "ca" / "ca.pem")


async def raw_tls(addr, context):
    host, port = addr.split(":")
    tcp = await trio.open_tcp_stream(host, int(port))
    stream = trio.SSLStream(tcp, context, server_hostname=None)
    await stream.do_handshake()
    return stream


async def read_all(stream, limit=5.0):
    """What the agent sends before it closes the connection (it must close it)."""
    data = b""
    with trio.fail_after(limit):
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return data
            if not chunk:
                return data
            data += chunk


def test_client_without_a_cluster_certificate_gets_nothing(cluster6, tmp_path):
    addr = cluster6.node("node1")["addr"]
    ca = cluster6.dir / "ca" / "ca.pem"

    async def no_cert():
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(ca)
        try:  # TLS 1.3: the server's refusal arrives after our handshake "succeeds"
            stream = await raw_tls(addr, ctx)
            await stream.send_all(frames.encode(versions.hello("x", "", versions.SPOKEN)))
            await stream.send_all(frames.encode([REQUEST, 1, "ve.list", {}]))
            return await read_all(stream)
        except (trio.BrokenResourceError, ssl.SSLError):
            return b""

    before = trio.run(status_via, operator(cluster6), addr)["rejected_connections"]
    assert trio.run(no_cert) == b""  # not a byte of application data
    assert trio.run(status_via, operator(cluster6), addr)["rejected_connections"] == before + 1

    init_ca(tmp_path / "rogue")
    rogue = issue(tmp_path / "rogue", "operator", "operator")
    with pytest.raises(Unreachable, match="handshake failed"):
        trio.run(status_via, rogue, addr)
    # and the agent still serves its own cluster
    assert trio.run(status_via, operator(cluster6), addr)["name"] == "node1"


@pytest.mark.parametrize("attack", ["random", "truncated", "oversized", "not_msgpack", "bad_handshake",
                                    "old_protocol", "unknown_frame", "response_as_request", "ext_type"])
def test_hostile_frames_close_only_that_connection(cluster6, attack):
    addr = cluster6.node("node2")["addr"]
    ident = operator(cluster6)
    hello = frames.encode(versions.hello("attacker", "", versions.SPOKEN))
    payloads = {
        "random": os.urandom(4096),
        "truncated": hello + frames.encode([REQUEST, 1, "agent.status", {}])[:-3],
        "oversized": hello + struct.pack(">I", frames.MAX_FRAME + 1) + b"x" * 100,
        "not_msgpack": hello + struct.pack(">I", 3) + b"\xc1\xc1\xc1",
        "bad_handshake": frames.encode(["hello?"]),
        "old_protocol": frames.encode({"proto": 0, "node": "old", "site": ""}),
        "unknown_frame": hello + frames.encode([7, 1, "x", {}]),
        "response_as_request": hello + frames.encode([RESPONSE, 1, True, None]),
        "ext_type": hello + struct.pack(">I", 4) + b"\xd4\x05zz"[:4],
    }

    async def attack_then_check():
        before = await status_via(ident, addr)
        stream = await raw_tls(addr, tls.client_context(ident))
        await stream.send_all(payloads[attack])
        if attack == "truncated":
            await stream.aclose()
        else:
            await read_all(stream)  # returns only because the agent closed the connection
        after = await status_via(ident, addr)
        return before, after

    before, after = trio.run(attack_then_check)
    assert after["name"] == "node2"
    if attack != "truncated":
        assert after["rejected_connections"] > before["rejected_connections"]
    assert pid_alive(cluster6.node("node2")["pid"])


def test_plain_tcp_garbage_and_unknown_methods(cluster6):
    addr = cluster6.node("node3")["addr"]
    ident = operator(cluster6)

    async def scenario():
        host, port = addr.split(":")
        tcp = await trio.open_tcp_stream(host, int(port))
        await tcp.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(5):
            while await tcp.receive_some(1024):
                pass
        async with Transport(ident, node="probe") as transport:
            with pytest.raises(Exception, match="no method 'nope'"):
                await transport.call(addr, "nope", {})
            with pytest.raises(Exception, match="^host.vm.info: name: expected str, got int$"):
                await transport.call(addr, "host.vm.info", {"name": 5})
            return await transport.call(addr, "agent.status")

    assert trio.run(scenario)["name"] == "node3"
