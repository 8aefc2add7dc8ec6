"""Each agent of a real cluster serves Prometheus `/metrics` over HTTP at the address `cluster up` lists: the text
parses with prometheus_client's own parser and its values agree with the cluster (every member alive, the
ring whole, a VE's VMs counted running where they run); garbage, wrong paths, silent and surplus
connections leave the agent serving, over HTTP and over its RPC."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from collections import Counter
from functools import partial
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import Cluster, running_cluster, wait_for

pytestmark = pytest.mark.integration
NODES = 3


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with running_cluster(tmp_path_factory, "metrics", NODES, 2) as cluster:
        yield cluster


def scrape(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample `/metrics` at `address` gives, by (name, sorted labels), as prometheus_client parses it."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as answer:
        assert answer.status == 200 and answer.headers["Content-Type"].startswith("text/plain")
        text = answer.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metrics_of(cluster: Cluster, node: str) -> str:
    return cluster.node(node)["metrics"]


def test_cluster_up_gives_every_agent_a_metrics_address(cluster: Cluster) -> None:
    addresses = [n["metrics"] for n in cluster.state["nodes"]]
    assert len(set(addresses)) == NODES and all(a.startswith("127.0.0.1:") for a in addresses)
    for node in cluster.state["nodes"]:
        data = cluster.dir / node["name"] / "data" / "metrics.addr"
        assert data.read_text() == node["metrics"]
    assert [r["metrics"] for r in cluster.json("cluster", "status", "--dir", str(cluster.dir))] == addresses


def test_every_agent_shows_the_whole_cluster(cluster: Cluster) -> None:
    def whole(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
        """The samples, once they count every member alive and the ring whole (it lags membership a little)."""
        got = scrape(address)
        alive = got["discovery_members", (("state", "alive"),)] == NODES
        return got if alive and got["discovery_ring_successors", ()] == NODES - 1 else None

    for node in cluster.state["nodes"]:
        got = wait_for(partial(whole, node["metrics"]), what=f"{node['name']} counts {NODES} members alive, "
                       f"{NODES - 1} successors")
        assert got["discovery_members", (("state", "dead"),)] == 0
        assert got["discovery_ring_predecessor_known", ()] == 1
        assert 0 < got["discovery_vivaldi_error_ratio", ()] <= 1.5
        assert got["discovery_rpc_server_duration_seconds_count", (("method", "member.ping"),)] > 0
        assert 20 * 2**20 < got["process_resident_memory_bytes", ()] < 2**30
        info = next(labels for (name, labels) in got if name == "discovery_agent_info")
        assert dict(info)["name"] == node["name"] and dict(info)["site"] == node["site"]


def test_a_ves_vms_are_counted_running_where_they_run(cluster: Cluster, tmp_path: Any) -> None:
    spec = tmp_path / "counted.yaml"
    spec.write_text("name: counted\nvms:\n  - {name: a, vcpus: 1, memory_mb: 256}\n  - {name: b, vcpus: 1, "
                    "memory_mb: 256}\n")
    created = cluster.json("--agent", "node1", "ve", "create", str(spec))
    assert created["state"] == "running"
    hosts = Counter(slot["node"] for slot in created["placement"].values())

    def running() -> dict[str, float]:
        return {n["name"]: scrape(n["metrics"])["discovery_vms", (("state", "running"),)]
                for n in cluster.state["nodes"]}

    counts = wait_for(lambda: (c := running()) and sum(c.values()) == 2 and c, what="2 VMs counted running")
    assert {n: count for n, count in counts.items() if count} == hosts
    served = scrape(metrics_of(cluster, "node1"))
    assert served["discovery_rpc_server_duration_seconds_count", (("method", "ve.create"),)] >= 1
    assert sum(scrape(n["metrics"])["discovery_dht_records", (("kind", "live"),)]
               for n in cluster.state["nodes"]) >= 2  # the VE's record and its index entry, each on replicas
    cluster.json("--agent", "node2", "ve", "destroy", "counted")
    wait_for(lambda: sum(running().values()) == 0, what="no VM counted running once the VE is destroyed")


def raw(address: str, data: bytes, close_early: bool = False) -> bytes:
    """Send `data` on a plain TCP connection to `address`; what comes back until the agent closes it."""
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(data)
        if close_early:
            return b""
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


def test_bad_clients_do_not_hurt_the_agent(cluster: Cluster) -> None:
    address = metrics_of(cluster, "node2")
    pid = cluster.node("node2")["pid"]
    assert raw(address, b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03garbage\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert raw(address, b"GET /admin HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 404")
    assert raw(address, b"DELETE /metrics HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 405")
    assert raw(address, b"GET /metrics HTTP/1.1\r\n" + b"X-Long: " + b"y" * 100_000).startswith(b"HTTP/1.1 431")
    for _ in range(5):
        raw(address, b"GET /met", close_early=True)  # hung up mid-request
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://{address}/", timeout=10)
    assert err.value.code == 404
    host, _, port = address.rpartition(":")
    silent = [socket.create_connection((host, int(port)), timeout=20) for _ in range(20)]  # more than it serves
    try:
        assert _scraped(address) is None  # 503: every slot held by a silent client
    finally:
        for sock in silent:
            sock.close()
    got = wait_for(lambda: _scraped(address), what="node2 scraped again once the silent clients left")
    assert got["discovery_members", (("state", "alive"),)] == NODES
    assert cluster.call("node2", "agent.status", {})["name"] == "node2"
    assert cluster.node("node2")["pid"] == pid and "node2" in cluster.running()


def _scraped(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
    try:
        return scrape(address)
    except urllib.error.HTTPError as err:
        if err.code != 503:
            raise
        return None  # every slot is held
