"""Rolling upgrades on real agent processes: a cluster of agents that speak only protocol version 1 (the
agents released before version ranges, as `DISCOVERY_PROTOCOL=1` makes them on the wire) is upgraded one
agent at a time to all this build speaks, and works throughout; an agent that shares no version with a
peer is refused by it in one line, logged on both sides, and both keep running."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
import trio

from overlay.wire import tls
from overlay.wire.rpc import Transport, Unreachable
from overlay.wire.versions import Versions

from .conftest import pid_alive, rejoined, restart, running_cluster, wait_for
from .test_faults import holding
from .test_ve_lifecycle import write_spec

pytestmark = pytest.mark.integration
NAMES = ["node1", "node2", "node3", "node4"]  # rennes, lyon, rennes, lyon


@pytest.fixture(scope="module")
def old_cluster(tmp_path_factory):
    """Four agents of version 1 only, on two sites."""
    with running_cluster(tmp_path_factory, "versions", 4, 2, DISCOVERY_PROTOCOL="1") as cluster:
        yield cluster


def stop(cluster, name):
    """SIGTERM: the agent leaves the cluster politely, as an operator's upgrade stops it."""
    pid = cluster.node(name)["pid"]
    os.killpg(pid, signal.SIGTERM)
    wait_for(lambda: not pid_alive(pid), 60, f"{name} (pid {pid}) stopped")


def upgrade(cluster, name, protocol="", ve=None):
    """Stop the agent and start it again speaking `protocol` ("": all this build speaks); wait for it back."""
    stop(cluster, name)
    restart(cluster, name, DISCOVERY_PROTOCOL=protocol)
    rejoined(cluster, name, ve)


def status(cluster, name):
    return cluster.json("--agent", name, "status")


def ve_names(cluster, through):
    return sorted(ve["name"] for ve in cluster.json("--agent", through, "ve", "list")["ves"])


def test_a_cluster_upgraded_one_agent_at_a_time_keeps_working(old_cluster, tmp_path):
    cluster = old_cluster
    cluster.json("--agent", "node1", "ve", "create", write_spec(tmp_path, "before", [("a", 1, 256)]))
    for name in ("node3", "node4"):
        upgrade(cluster, name, ve="before")
    old, new = ["node1", "node2"], ["node3", "node4"]

    for name in old:  # they predate the field: only the version of the CLI's connection is known
        info = status(cluster, name)
        assert "protocol" not in info and info["protocol_version"] == 1
    expected = {"node1": 1, "node2": 1, "node3": 2, "node4": 2}
    for name in new:
        peers = {n: v for n, v in expected.items() if n != name}

        def connected(name=name, peers=peers):
            info = status(cluster, name)
            return info if info["protocol"]["peers"] == peers else None

        info = wait_for(connected, what=f"{name} connected to every peer, each at the newest version both speak")
        assert (info["protocol"]["oldest"], info["protocol"]["newest"], info["protocol_version"]) == (1, 2, 2)
    table = cluster.cli("--agent", "node3", "status").stdout
    assert "speaks 1..2; with this client 2; with peers: node1 1, node2 1, node4 2" in table

    # one VM per node (9 of 16 vCPUs, then 5), so each VE is placed through agents of both versions
    first = cluster.json("--agent", "node1", "ve", "create",
                         write_spec(tmp_path, "from-old", [(f"v{i}", 9, 256) for i in range(4)]))
    second = cluster.json("--agent", "node3", "ve", "create",
                          write_spec(tmp_path, "from-new", [(f"v{i}", 5, 256) for i in range(4)]))
    for ve in (first, second):
        assert ve["state"] == "running" and {s["node"] for s in ve["placement"].values()} == set(NAMES)
    for through in NAMES:
        assert ve_names(cluster, through) == ["before", "from-new", "from-old"]
    for ve in ("before", "from-new", "from-old"):  # 3 replicas of 4 agents: agents of both versions hold each
        holders = wait_for(lambda ve=ve: len(h := holding(cluster, NAMES, f"ve/{ve}")) == 3 and h,
                           what=f"the record of {ve} on three replicas")
        assert set(holders) & set(old) and set(holders) & set(new)

    cluster.cli("--agent", "node4", "ve", "destroy", "from-old")  # a new agent destroys what an old one made
    cluster.cli("--agent", "node2", "ve", "destroy", "from-new")  # and the other way round
    cluster.cli("--agent", "node3", "ve", "destroy", "before")
    for through in NAMES:
        assert ve_names(cluster, through) == []


def test_agents_that_share_no_version_refuse_each_other_in_one_line_and_keep_running(old_cluster):
    """node2 is restarted speaking version 2 only (a release that dropped version 1): node1 speaks 1 only."""
    cluster = old_cluster
    stop(cluster, "node2")
    restart(cluster, "node2", DISCOVERY_PROTOCOL="2")  # it cannot rejoin whole: node1 refuses it
    logs = {name: Path(cluster.node(name)["config"]).parent / "agent.log" for name in ("node1", "node2")}
    said = {  # what each side logs, once: whichever end dialed, it names the other and both ranges
        "node1": r"WARNING overlay\.wire\.rpc: (refused connection|cannot call [\d.:]+): no common protocol version "
                 r"with node2 \([\d.:]+\): it speaks version 2, we speak version 1\n",
        "node2": r"WARNING overlay\.wire\.rpc: (refused connection|cannot call [\d.:]+): no common protocol version "
                 r"with node1 \([\d.:]+\): it speaks version 1, we speak version 2\n",
    }
    for name, line in said.items():
        wait_for(lambda name=name, line=line: re.search(line, logs[name].read_text()),
                 what=f"{name} logged that it shares no version with its peer")

    info = wait_for(lambda: cluster.try_json("--agent", "node2", "status"), what="node2 answers the CLI")
    assert (info["protocol"]["oldest"], info["protocol"]["newest"], info["protocol_version"]) == (2, 2, 2)
    assert "node1" not in info["protocol"]["peers"]
    assert status(cluster, "node1")["name"] == "node1"
    assert all(pid_alive(cluster.node(n)["pid"]) for n in ("node1", "node2"))
    for name, line in said.items():  # retried every tick, but told once
        assert len(re.findall(line, logs[name].read_text())) == 1

    # a client of version 1 only is refused by node2 with the same line
    ident = tls.Identity(cert=cluster.dir / "operator.pem", key=cluster.dir / "operator.key",
                         ca=cluster.dir / "ca" / "ca.pem")

    async def as_version_1():
        async with Transport(ident, node="old-cli", speaks=Versions(1, 1)) as transport:
            await transport.call(cluster.node("node2")["addr"], "agent.status")

    with pytest.raises(Unreachable, match=r"handshake failed: no common protocol version with node2 \([\d.:]+\): "
                                          r"it speaks version 2, we speak version 1$"):
        trio.run(as_version_1)
