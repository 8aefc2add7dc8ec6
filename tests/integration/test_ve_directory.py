"""The VE directory's state on 8 real agents: concurrent creates of one name through every agent, and the
paged listing served from the index in the DHT. One cluster for the whole module."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import trio

from discovery.cli.client import call
from discovery.cli.config import load_client_config
from discovery.ve.spec import parse_spec
from overlay.wire import tls
from overlay.wire.rpc import RemoteError, RpcError, Transport

from .conftest import Cluster, running_cluster

pytestmark = pytest.mark.integration
NODES = 8
ROUNDS = 20


@pytest.fixture(scope="module")
def cluster8(tmp_path_factory):
    with running_cluster(tmp_path_factory, "cluster8", NODES, 4) as cluster:
        yield cluster


def two_vm_spec(name: str) -> dict[str, Any]:
    return parse_spec(f"name: {name}\nvms:\n  - {{name: a, vcpus: 1, memory_mb: 128}}\n"
                      "  - {name: b, vcpus: 1, memory_mb: 128}\n").to_dict()


def rpc(cluster: Cluster, node: str, method: str, args: dict[str, Any]) -> Any:
    """One call as the CLI makes it (operator certificate), without starting a CLI process."""
    config = load_client_config(str(cluster.dir / "client.toml"))
    return call(config, cluster.node(node)["addr"], method, args, timeout=90)


def race(cluster: Cluster, spec: dict[str, Any]) -> dict[str, Any]:
    """`ve.create` of one spec through every agent at the same moment: node -> the VE or the error."""
    start = threading.Barrier(NODES)

    def one(node: str) -> Any:
        start.wait()
        try:
            return rpc(cluster, node, "ve.create", {"spec": spec})
        except RpcError as err:
            return err

    names = [n["name"] for n in cluster.state["nodes"]]
    with ThreadPoolExecutor(NODES) as pool:
        return dict(zip(names, pool.map(one, names), strict=True))


def domains_by_node(cluster: Cluster) -> dict[str, set[str]]:
    """Every domain defined on every agent's host (one `host.info` each, in parallel)."""
    ident = tls.Identity(cert=cluster.dir / "operator.pem", key=cluster.dir / "operator.key",
                         ca=cluster.dir / "ca" / "ca.pem")
    nodes = {n["addr"]: n["name"] for n in cluster.state["nodes"]}

    async def ask() -> dict[str, set[str]]:
        async with Transport(ident, node="probe") as transport:
            answers = await transport.call_many(list(nodes), "host.info", {}, 10)
        assert not [a for a in answers.values() if isinstance(a, Exception)], answers
        return {nodes[addr]: {d["name"] for d in info["domains"]} for addr, info in answers.items()}

    return trio.run(ask)


def listed(cluster: Cluster, limit: int) -> list[str]:
    """Every VE name, page after page of `ve list --limit` through the CLI, following next_cursor."""
    names, cursor, agents = [], None, [n["name"] for n in cluster.state["nodes"]]
    for page_number in range(1000):
        args = ["--agent", agents[page_number % NODES], "ve", "list", "--limit", str(limit)]
        page = cluster.json(*args, *(["--cursor", cursor] if cursor else []))
        assert len(page["ves"]) <= limit
        names += [ve["name"] for ve in page["ves"]]
        cursor = page["next_cursor"]
        if cursor is None:
            return names
    raise AssertionError("the pages never ended")


def test_of_eight_concurrent_creates_of_one_name_exactly_one_wins_and_the_others_leave_nothing(cluster8):
    winners = {}
    for round_ in range(ROUNDS):
        name = f"race{round_:02d}"
        results = race(cluster8, two_vm_spec(name))
        created = {node: ve for node, ve in results.items() if isinstance(ve, dict)}
        assert len(created) == 1, f"round {round_}: {len(created)} creates of {name} succeeded: {results}"
        [(through, ve)] = created.items()
        for node, err in results.items():
            if node != through:
                assert isinstance(err, RemoteError) and err.kind == "conflict", (node, err)
                assert f"a VE named {name!r} already exists" in str(err), (node, err)
        shown = rpc(cluster8, f"node{round_ % NODES + 1}", "ve.show", {"name": name})
        assert shown["uid"] == ve["uid"] and shown["state"] == "running"
        placed = {vm: slot["node"] for vm, slot in shown["placement"].items()}
        assert set(placed) == {"a", "b"}
        defined = {(node, d) for node, ds in domains_by_node(cluster8).items() for d in ds if d.startswith(f"{name}:")}
        assert defined == {(node, f"{name}:{vm}") for vm, node in placed.items()}, f"round {round_}"
        winners[name] = through
    assert len(set(winners.values())) > 1  # the race was a race: different agents won


def test_the_list_pages_through_every_ve_once_and_forgets_destroyed_ones(cluster8):
    names = {f"race{i:02d}" for i in range(ROUNDS)}  # created by the test above
    for i in range(ROUNDS, 30):
        rpc(cluster8, f"node{i % NODES + 1}", "ve.create", {"spec": two_vm_spec(f"page{i}")})
        names.add(f"page{i}")
    seen = listed(cluster8, 7)
    assert sorted(seen) == sorted(names) and len(seen) == len(set(seen))

    for gone in ("race03", "page25", "race17"):
        assert rpc(cluster8, "node2", "ve.destroy", {"name": gone})["state"] == "destroyed"
        names.discard(gone)
    seen = listed(cluster8, 4)
    assert sorted(seen) == sorted(names) and len(seen) == len(set(seen))
    path = cluster8.dir / "race03.yaml"
    path.write_text("name: race03\nvms:\n  - {name: a, vcpus: 1, memory_mb: 128}\n")
    again = cluster8.json("--agent", "node6", "ve", "create", str(path))
    assert again["state"] == "running"  # the name is free again, and listed again
    page = cluster8.json("--agent", "node3", "ve", "list", "--limit", "1000")
    assert page["next_cursor"] is None and "race03" in [ve["name"] for ve in page["ves"]]
