"""The agents' records re-bound from Chord to Kademlia and back at run time, on real agent processes.

What must hold: no acknowledged write is lost across a re-bind, even one made through another agent
while the re-bind runs; every agent answers from the new overlay afterwards; an agent that was down
during the re-bind adopts it when it comes back; kv reads work through either overlay.
"""

from __future__ import annotations

import threading

from discovery.cli.client import call
from discovery.cli.config import load_client_config

from .conftest import Cluster, rejoined, restart, wait_for


class Writer(threading.Thread):
    """Writes kv/w0, kv/w1, ... through one agent until stopped; remembers which writes were acknowledged."""

    def __init__(self, cluster: Cluster, agent: str) -> None:
        super().__init__(daemon=True)
        self.config = load_client_config(str(cluster.dir / "client.toml"))
        self.agent = cluster.node(agent)["addr"]
        self.acked: list[str] = []
        self.failed = 0
        self.stop = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            try:
                call(self.config, self.agent, "overlay.put", {"key": f"w{i}", "value": i}, timeout=60)
                self.acked.append(f"w{i}")
            except Exception:  # noqa: BLE001 - a refused write is allowed; a lost acknowledged one is not
                self.failed += 1
            i += 1


def test_rebind_keeps_every_record_and_write(cluster_factory, tmp_path) -> None:
    cluster = cluster_factory(4, 2)
    spec = tmp_path / "ve.yaml"
    spec.write_text("name: rb\nvms:\n  - {name: a, vcpus: 1, memory_mb: 128}\n")
    cluster.json("--agent", "node1", "ve", "create", str(spec))
    cluster.cli("--agent", "node2", "kv", "put", "before", "chord-era")
    wait_for(lambda: all(cluster.json("--agent", n, "overlay", "status")["kademlia"]["neighbours"] > 0
                         for n in ("node1", "node2", "node3", "node4")), what="every Kademlia node has neighbours")

    writer = Writer(cluster, "node3")
    writer.start()
    wait_for(lambda: len(writer.acked) >= 3, what="three writes acknowledged")
    bound = cluster.json("--agent", "node1", "overlay", "bind", "kademlia")
    during = len(writer.acked)
    wait_for(lambda: len(writer.acked) >= during + 3, what="writes go on after the switch")
    writer.stop.set()
    writer.join(60)
    assert bound["overlay"] == "kademlia" and bound["missed"] == [] and bound["members"] == 4

    for node in ("node1", "node2", "node3", "node4"):
        status = cluster.json("--agent", node, "overlay", "status")
        assert (status["overlay"], status["epoch"], status["frozen"]) == ("kademlia", 1, False)
    assert [ve["name"] for ve in cluster.json("--agent", "node4", "ve", "list")["ves"]] == ["rb"]
    later = tmp_path / "later.yaml"
    later.write_text("name: later\nvms:\n  - {name: a, vcpus: 1, memory_mb: 128}\n")
    refused = cluster.cli("--agent", "node2", "ve", "create", str(later), check=False)
    assert refused.returncode == 1 and "overlay bind chord" in refused.stderr  # no conditional write on Kademlia
    assert cluster.cli("--agent", "node4", "kv", "get", "before").stdout.strip() == "chord-era"
    node2 = cluster.node("node2")["addr"]
    for key in writer.acked:  # every acknowledged write, before, during or after the re-bind
        got = call(writer.config, node2, "overlay.get", {"key": key})
        assert got["found"] and got["overlay"] == "kademlia" and got["value"] == int(key[1:]), key

    cluster.json("--agent", "node2", "ve", "stop", "rb")  # writes the record on Kademlia
    cluster.json("--agent", "node3", "overlay", "bind", "chord")
    assert cluster.json("--agent", "node1", "ve", "show", "rb")["state"] == "stopped"
    assert cluster.json("--agent", "node2", "ve", "create", str(later))["state"] == "running"
    assert sorted(ve["name"] for ve in cluster.json("--agent", "node4", "ve", "list")["ves"]) == ["later", "rb"]
    assert cluster.json("--agent", "node1", "kv", "get", "before", "--overlay", "chord")["found"]


def test_an_agent_down_during_a_rebind_adopts_it(cluster_factory) -> None:
    cluster = cluster_factory(4, 2)
    cluster.cli("--agent", "node1", "kv", "put", "k", "v")
    cluster.kill9("node4")
    wait_for(lambda: all(m["status"] == "dead" for n in ("node1", "node2", "node3")
                         for m in cluster.json("--agent", n, "members") if m["name"] == "node4"),
             what="node4 known dead")
    wait_for(lambda: all(cluster.json("--agent", n, "overlay", "status")["kademlia"]["neighbours"] > 0
                         for n in ("node1", "node2", "node3")), what="every Kademlia node has neighbours")
    assert cluster.json("--agent", "node2", "overlay", "bind", "kademlia")["members"] == 3

    restart(cluster, "node4")
    rejoined(cluster, "node4")
    wait_for(lambda: cluster.json("--agent", "node4", "overlay", "status")["overlay"] == "kademlia",
             what="node4 adopted the binding")
    wait_for(lambda: cluster.json("--agent", "node4", "overlay", "status")["kademlia"]["neighbours"] > 0,
             what="node4 has Kademlia neighbours")
    assert cluster.cli("--agent", "node4", "kv", "get", "k").stdout.strip() == "v"


def test_bad_overlay_requests_are_refused(cluster_factory) -> None:
    cluster = cluster_factory(2, 1)
    proc = cluster.cli("overlay", "bind", "pastry", check=False)
    assert proc.returncode == 1 and "overlay must be one of chord, kademlia" in proc.stderr
    proc = cluster.cli("kv", "get", "absent", check=False)
    assert proc.returncode == 1 and "no record under 'absent'" in proc.stderr
    assert cluster.json("overlay", "status")["overlay"] == "chord"
