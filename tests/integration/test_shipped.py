"""Shipped snapshots (`discovery.ve.shipping`) on a real 3-agent, 2-site cluster of test-driver VMs (node1 and node3 in
rennes, node2 in lyon), whose snapshot image is their domain XML: the periodic pass ships the first one without a
command, each is kept by a node of the other site, `keep` prunes the oldest (their images removed), and what
to boot is named by another agent once the VM's host is dead. Real guests' disks: `test_qemu_agents.py`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from .conftest import Cluster, running_cluster, wait_for
from .test_replicas import refused

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster3(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with running_cluster(tmp_path_factory, "shipped3", 3, 2) as cluster:
        yield cluster


def shipped(cluster: Cluster, ve: str, vm: str, via: str = "node1") -> list[dict[str, Any]]:
    return (cluster.json("--agent", via, "ve", "snapshots", ve).get("shipped") or {}).get(vm, [])


def ship(cluster: Cluster, ve: str, after: list[dict[str, Any]]) -> dict[str, Any]:
    """`ve ship`, once the clock is past the second of the last tag (tags are UTC seconds)."""
    last = max((s["time"] for s in after), default=0.0)
    wait_for(lambda: int(time.time()) > int(last), 5, "the next second")
    return cluster.json("--agent", "node3", "ve", "ship", ve)


def test_a_restart_policy_ships_snapshots_to_another_site_and_keeps_the_newest(cluster3: Cluster,
                                                                               tmp_path: Path) -> None:
    spec = tmp_path / "kept.yaml"
    spec.write_text("name: kept\nvms:\n  - {name: a, vcpus: 1, memory_mb: 256}\n"
                    "ha: {mode: restart, snapshot_every: 1h, keep: 2}\n")
    created = cluster3.json("--agent", "node1", "ve", "create", str(spec))
    host = created["placement"]["a"]["node"]
    [first] = wait_for(lambda: shipped(cluster3, "kept", "a"), 60, "the first snapshot shipped by the policy")
    assert first["image"].startswith("snap/kept/a:") and host in first["holders"]
    assert "lyon" in first["holders"].values() and len(first["holders"]) == 3  # the other site first, then all
    protection = cluster3.json("--agent", "node2", "ve", "show", "kept")["protection"]["a"]
    assert protection["status"] == "protected" and protection["last_shipped"]["digest"] == first["digest"]

    second = ship(cluster3, "kept", [first])["vms"]["a"]
    assert second["host"] == host and second["pruned"] == [] and set(second["sent"]) == set(first["holders"]) - {host}
    third = ship(cluster3, "kept", [first, second["shipped"]])["vms"]["a"]
    assert third["pruned"] == [first["image"]]  # keep: 2
    assert [s["image"] for s in shipped(cluster3, "kept", "a")] == [second["shipped"]["image"],
                                                                    third["shipped"]["image"]]
    images = {e["name"] for e in cluster3.json("--agent", "node2", "image", "list")}
    assert first["image"] not in images and third["shipped"]["image"] in images

    export = tmp_path / "a.raw"  # a test-driver VM's snapshot is its domain XML
    cluster3.cli("--agent", host, "image", "export", third["shipped"]["image"], str(export))
    assert export.read_bytes().rstrip(b"\0").decode().startswith("<domain") and "kept:a" in export.read_text()

    point = cluster3.json("--agent", "node2", "ve", "restore-point", "kept", "a")
    assert point == third["shipped"] | {"holders": point["holders"]} and len(point["holders"]) == 3
    older = cluster3.json("--agent", "node2", "ve", "restore-point", "kept", "a", "--tag",
                          second["shipped"]["image"].rpartition(":")[2])
    assert older["digest"] == second["shipped"]["digest"]
    assert "has no shipped snapshot 'nope' (shipped: " in refused(cluster3, "--agent", "node2", "ve", "restore-point",
                                                                  "kept", "a", "--tag", "nope")
    table = cluster3.cli("--agent", "node2", "ve", "snapshots", "kept").stdout
    assert third["shipped"]["image"] in table and "lyon" in table
    cluster3.cli("--agent", "node1", "ve", "destroy", "kept")
    assert third["shipped"]["image"] in {e["name"] for e in cluster3.json("--agent", "node2", "image", "list")}
    cluster3.cli("--agent", "node1", "image", "rm", third["shipped"]["image"])
    cluster3.cli("--agent", "node1", "image", "rm", second["shipped"]["image"])
