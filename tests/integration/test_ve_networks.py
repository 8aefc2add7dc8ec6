"""A VE's networks as created on a real cluster (libvirt test:///): subnets, VXLAN ids claimed in the directory,
each VM's MAC and address in its record, kept through a relocation, released with the VE."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import wait_for

pytestmark = pytest.mark.integration
EXAMPLE = Path(__file__).parents[2] / "examples" / "web-net.yaml"


def claim_of(cluster, vni):
    """The newest copy of VNI `vni`'s claim the agents hold in their shards (its value None once released)."""
    copies = [r for n in range(1, 7)
              for r in cluster.call(f"node{n}", "overlay.scan", {"overlay": "chord", "prefix": f"vni/{vni}"})
              if r[0] == f"vni/{vni}"]
    return max(copies, key=lambda r: (r[2], r[3]))[1] if copies else None


def test_a_ve_s_addresses_are_in_its_record_shown_kept_through_a_move_and_its_vnis_released(cluster6, tmp_path):
    created = cluster6.json("--agent", "node1", "ve", "create", str(EXAMPLE))
    networks, nics = created["networks"], created["nics"]
    assert {n: s["subnet"] for n, s in networks.items()} == {"back": "10.20.0.0/24", "front": "10.21.0.0/24"}
    assert networks["back"]["vni"] != networks["front"]["vni"]
    assert [(n["network"], n["address"]) for n in nics["web"]] == [("front", "10.21.0.10"), ("back", "10.20.0.2")]
    assert [(n["network"], n["address"]) for n in nics["db"]] == [("back", "10.20.0.3")]
    assert len({n["mac"] for vm in nics.values() for n in vm}) == 3

    plain = tmp_path / "plain.yaml"
    plain.write_text("name: plain\nvms:\n  - {name: a, vcpus: 1, memory_mb: 64}\n")
    other = cluster6.json("--agent", "node4", "ve", "create", str(plain))
    assert other["networks"]["default"]["subnet"] == "10.0.0.0/24"  # the default: subnets may repeat across VEs
    assert other["networks"]["default"]["vni"] not in {s["vni"] for s in networks.values()}
    for net in networks.values():
        assert claim_of(cluster6, net["vni"])["ve"] == "web-net"

    shown = cluster6.cli("--agent", "node3", "ve", "show", "web-net").stdout
    assert "10.21.0.10" in shown and nics["db"][0]["mac"] in shown
    web_host = created["placement"]["web"]["addr"].rpartition(":")[0]
    assert f"{web_host}:8080/tcp -> 80" in shown  # where a client outside reaches web's port 80
    host = created["placement"]["db"]["node"]
    target = next(f"node{i}" for i in range(1, 7) if f"node{i}" != host)
    moved = cluster6.json("--agent", "node2", "ve", "relocate", "web-net", "--vm", "db", "--to", target)
    assert moved["placement"]["db"]["node"] == target and moved["nics"] == nics  # the same MAC and address

    cluster6.json("--agent", "node6", "ve", "destroy", "web-net")
    for net in networks.values():
        wait_for(lambda vni=net["vni"]: claim_of(cluster6, vni) is None, what=f"VNI {net['vni']} released")
    cluster6.json("--agent", "node4", "ve", "destroy", "plain")
