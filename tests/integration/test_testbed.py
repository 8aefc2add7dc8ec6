"""`discovery testbed` for real: agents in network namespaces on three sites, joined by the router namespace.

Needs root (network namespaces) and no other testbed on the machine; each test builds a small one and leaves
nothing behind (checked by name: namespaces, the root's link, processes)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agents.hypervisor.qemu import BackendError, prepare_guest
from agents.network.plan import FLOOD, bridge_name, vxlan_name
from discovery.testbed import bed
from discovery.testbed.net import join_segment
from images import tinyguest

from .conftest import Cluster, wait_for
from .test_qemu_agents import VM
from .test_ve_lifecycle import write_spec

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(os.geteuid() != 0, reason="the testbed needs root (ip netns add)")]


@pytest.fixture(scope="module")
def bed_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """`running_testbed` whose agents run real tiny guests, one for this module's tests of real guests (each
    destroys its VEs: bringing three libvirtds and agents up and down costs ~20 s); skipped, with the reason,
    where QEMU cannot run."""
    try:
        prepare_guest()
    except BackendError as err:
        pytest.skip(str(err))
    with running_testbed(tmp_path_factory.mktemp("guests"), "qemu", tinyguest.default_cache().parent) as bed_cluster:
        yield bed_cluster


def _leftovers() -> dict[str, list[str]]:
    return {k: v for k, v in bed.leftovers().items() if v}


@contextlib.contextmanager
def running_testbed(tmp_path: Path, hypervisor: str, home: Path) -> Iterator[Cluster]:
    """3 nodes, one per site, 20 ms between sites, 50 Mbit/s links; down (and checked empty) at the end."""
    if _leftovers():
        pytest.skip(f"another testbed is up on this machine: {_leftovers()}")
    directory = tmp_path / "bed"
    cluster = Cluster(directory, {**os.environ, "DISCOVERY_HOME": str(home)})
    up = subprocess.run([sys.executable, "-m", "discovery", "testbed", "up", "--dir", str(directory), "--nodes", "3",
                         "--sites", "3", "--site-rtt", "20", "--bandwidth", "50", "--hypervisor", hypervisor, "--json"],
                        capture_output=True, text=True, env=cluster.env, timeout=300)
    try:
        assert up.returncode == 0, up.stderr
        nodes = json.loads(up.stdout)
        assert [(n["name"], n["site"], n["address"]) for n in nodes] == [
            ("node1", "rennes", "10.213.1.1"), ("node2", "lyon", "10.213.2.1"), ("node3", "nancy", "10.213.3.1")]
        cluster.state = json.loads((directory / "cluster.json").read_text())
        yield cluster
    finally:
        subprocess.run([sys.executable, "-m", "discovery", "testbed", "down", "--dir", str(directory)],
                       env=cluster.env, timeout=60, capture_output=True)
        if _leftovers():
            bed.teardown(None)
    assert not _leftovers()


@pytest.fixture
def testbed(tmp_path: Path) -> Iterator[Cluster]:
    with running_testbed(tmp_path, "test", tmp_path / "home") as cluster:
        yield cluster


def _alive(pid: int) -> bool:
    """Running, or stopped: not gone and not a zombie that its new parent has yet to reap."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _status_of(cluster: Cluster, observer: str, name: str) -> str | None:
    members = cluster.try_json("--agent", observer, "members")
    return next((m["status"] for m in members or [] if m["name"] == name), None)


def test_life_cycle_partition_heal_down(testbed: Cluster) -> None:
    d = str(testbed.dir)
    status = testbed.json("testbed", "status", "--dir", d)
    assert status["router_up"] and status["relay"] == "running" and not status["partitions"]
    assert [(n["namespace_up"], n["process"], n["answers"]) for n in status["nodes"]] == [(True, "running", True)] * 3

    report = json.loads(testbed.cli("testbed", "validate", "--dir", d, "--seconds", "1", "--json", check=False).stdout)
    assert len(report["pairs"]) == 6  # one node per site: only the pairs between sites
    assert report["ok"], report
    packets = wait_for(lambda: testbed.json("testbed", "status", "--dir", d)["relay_packets"], timeout=10,
                       what="the relay's counts written")
    assert packets["forwarded"] > 0 and set(packets["dropped"]) == {"queue_full", "refused", "tun_full"}
    assert all(isinstance(n, int) for n in packets["dropped"].values()), packets

    testbed.cli("testbed", "partition", "node3", "--dir", d)
    for observer in ("node1", "node2"):
        wait_for(lambda o=observer: _status_of(testbed, o, "node3") == "dead", what=f"{observer} sees node3 dead")
    assert testbed.json("testbed", "status", "--dir", d)["partitions"] == [{"target": "node3", "oneway": False}]

    testbed.cli("testbed", "heal", "--dir", d)
    for observer in ("node1", "node2"):
        wait_for(lambda o=observer: _status_of(testbed, o, "node3") == "alive", what=f"{observer} sees node3 alive")

    pids = [n["pid"] for n in testbed.state["nodes"]]
    testbed.cli("testbed", "down", "--dir", d)
    assert not _leftovers()
    wait_for(lambda: not [p for p in pids if _alive(p)], timeout=10, what="the agents gone (reaped by init)")


def test_a_second_testbed_is_refused_and_leaves_the_first_up(testbed: Cluster, tmp_path: Path) -> None:
    up = testbed.cli("testbed", "up", "--dir", str(tmp_path / "second"), "--nodes", "2", "--sites", "2", check=False)
    assert up.returncode != 0 and "already up" in up.stderr and len(up.stderr.strip().splitlines()) == 1
    status = testbed.json("testbed", "status", "--dir", str(testbed.dir))
    assert status["router_up"] and all(n["answers"] for n in status["nodes"])


def test_ve_created_listed_destroyed_across_three_sites(testbed: Cluster, tmp_path: Path) -> None:
    created = testbed.json("--agent", "node1", "ve", "create",
                           write_spec(tmp_path, "far", [("web", 2, 512), ("db", 2, 512)], site="nancy"))
    assert created["state"] == "running"
    assert {slot["node"] for slot in created["placement"].values()} == {"node3"}  # the only node in nancy

    listed = {ve["name"]: ve for ve in testbed.json("--agent", "node2", "ve", "list")["ves"]}
    assert listed["far"]["state"] == "running"

    testbed.json("--agent", "node3", "ve", "destroy", "far")
    wait_for(lambda: "far" not in {ve["name"] for ve in testbed.json("--agent", "node1", "ve", "list")["ves"]},
             what="the destroyed VE gone from node1's list")


def _fdb(node: str, vni: int) -> set[tuple[str, str]] | None:
    """The forwarding entries of segment `vni` in node `node`'s namespace; None if it has no such segment."""
    done = subprocess.run(["ip", "netns", "exec", f"dtb-{node}", "bridge", "-j", "fdb", "show", "dev",
                           vxlan_name(vni)], capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        return None
    return {(e["mac"], e["dst"]) for e in json.loads(done.stdout or "[]") if "dst" in e}


def test_a_ve_network_spans_its_vms_hosts_and_goes_with_the_ve(testbed: Cluster, tmp_path: Path) -> None:
    """Each host of a VE network carries its segment with the other host's VM's MAC (the test driver has no taps:
    what real guests send over it is `test_qemu_agents`' to show)."""
    spec = tmp_path / "pair.yaml"
    spec.write_text("name: pair\nvms:\n  - {name: a, vcpus: 1, memory_mb: 64}\n  - {name: b, vcpus: 1, memory_mb: 64}\n"
                    "constraints: {anti_affinity: [[a, b]]}\n")
    created = testbed.json("--agent", "node1", "ve", "create", str(spec))
    vni = created["networks"]["default"]["vni"]
    at = {vm: (slot["node"], slot["addr"].rpartition(":")[0]) for vm, slot in created["placement"].items()}
    (na, addr_a), (nb, addr_b) = at["a"], at["b"]
    mac_a, mac_b = (created["nics"][vm][0]["mac"] for vm in ("a", "b"))
    wanted = {na: {(FLOOD, addr_b), (mac_b, addr_b)}, nb: {(FLOOD, addr_a), (mac_a, addr_a)}}
    wait_for(lambda: {n: _fdb(n, vni) for n in (na, nb)} == wanted, what="each host forwarding to the other")
    assert _fdb(next(n for n in ("node1", "node2", "node3") if n not in (na, nb)), vni) is None

    testbed.json("--agent", "node2", "ve", "destroy", "pair")
    wait_for(lambda: _fdb(na, vni) is None and _fdb(nb, vni) is None, what="the segments gone with the VE")


def test_down_without_dir_removes_what_a_crashed_testbed_left(testbed: Cluster) -> None:
    relay = json.loads((testbed.dir / "testbed.json").read_text())["relay_pid"]
    (testbed.dir / "testbed.json").unlink()  # the state is lost, as after a crash
    testbed.cli("testbed", "down")
    assert not _leftovers()
    wait_for(lambda: not _alive(relay), timeout=10, what="the relay gone (reaped by init)")


@pytest.mark.qemu
def test_a_real_guest_migrates_live_between_namespaces_across_sites(bed_cluster: Cluster, tmp_path: Path) -> None:
    """Real guests on the testbed: each node is a host whose agent uses the host's system libvirtd
    (qemu:///system, listening on the namespace's address), the tiny image is pulled over the router, and a
    live relocation to another site carries memory and disk between two namespaces' addresses (delayed and
    shaped by the router), the guest counting on without a reboot. Then its new host's agent alone is killed
    (`cluster crash`): the guest counts on without it, and the agent started again takes it back as it runs."""
    spec = tmp_path / "mover.yaml"
    spec.write_text("name: mover\nvms:\n  - {name: a, vcpus: 1, memory_mb: 128, disk_gb: 1, image: tiny}\n")
    assert bed_cluster.json("--agent", "node1", "ve", "create", str(spec))["state"] == "running"
    vm = VM(bed_cluster, "mover", "a")
    vm.wait_ready()
    source = vm.node
    target = next(n for n in ("node1", "node2", "node3") if n != source)
    before = vm.wait_beat_above(0, source)
    moved = bed_cluster.json("--agent", target, "ve", "relocate", "mover", "--vm", "a", "--to", target)
    assert moved["placement"]["a"]["transfer"]["how"] == "live"
    assert moved["placement"]["a"]["addr"].startswith("10.213.")
    moved_at = vm.wait_beat_above(before, target)
    assert moved_at > before
    assert tinyguest.READY not in vm.file(".log", target).read_text(errors="replace")  # no reboot
    assert [ve["name"] for ve in bed_cluster.json("--agent", "node3", "ve", "list")["ves"]] == ["mover"]
    directory = bed_cluster.dir
    bed_cluster.cli("cluster", "crash", target, "--dir", str(directory))
    assert bed_cluster.try_json("--agent", target, "ve", "show", "mover") is None  # no agent there now
    alone = vm.wait_beat_above(moved_at + 2, target)  # the guest and its libvirtd live on
    bed_cluster.cli("cluster", "start", target, "--dir", str(directory))
    wait_for(lambda: (bed_cluster.try_json("--agent", target, "ve", "show", "mover") or {}).get("state")
             == "running", timeout=120, what=f"{target}'s new agent answering for mover")
    assert vm.wait_beat_above(alone, target) > alone
    assert tinyguest.READY not in vm.file(".log", target).read_text(errors="replace")  # the same guest
    assert bed_cluster.json("--agent", source, "ve", "show", "mover")["placement"]["a"]["node"] == target
    bed_cluster.cli("ve", "destroy", "mover")


def _probe(tag: str, node: str, vni: int, address: str) -> str:
    """A namespace on node `node`'s segment `vni` with `address`/24 (a VM of the network that the test can run
    commands in), named from `tag`; the caller deletes it."""
    ns = f"dtp-{tag}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    join_segment(f"dtb-{node}", bridge_name(vni), ns, f"{address}/24", f"02:77:00:00:00:{int(tag, 16) % 256:02x}")
    return ns


def _pings(ns: str, address: str) -> bool:
    return subprocess.run(["ip", "netns", "exec", ns, "ping", "-c", "1", "-W", "2", address],
                          capture_output=True, timeout=30).returncode == 0


def _fetch(ns: str, url: str) -> str:
    """The body `url` answers with, fetched from namespace `ns`; '' if it does not answer."""
    get = f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=3).read().decode())"
    done = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", get], capture_output=True, text=True,
                          timeout=30)
    return done.stdout.strip() if done.returncode == 0 else ""


def _underlay(node: str) -> str:
    return f"10.213.{node.removeprefix('node')}.1"


@pytest.mark.qemu
def test_real_guests_of_one_ve_network_on_two_sites_get_their_addresses_and_reach_each_other(bed_cluster: Cluster,
                                                                                             tmp_path: Path) -> None:
    """Two tiny guests of one VE, on two nodes of two sites, get the addresses their record gave them by DHCP from
    their own hosts, and a VM of the network beside the first reaches both, the second across VXLAN and the
    router; another VE's guest, with the same subnet and address, on the same host, is on another network.
    The second's web server is exposed on its host's port 8080, reached from another node and, through the
    network's NAT'd uplink, from the VM beside the first; it follows the guest's live relocation."""
    tiny = "vcpus: 1, memory_mb: 128, disk_gb: 1, image: tiny"
    pair, other = tmp_path / "pair.yaml", tmp_path / "other.yaml"
    pair.write_text(f"name: pair\nvms:\n  - {{name: a, {tiny}}}\n  - {{name: b, {tiny}}}\n"
                    "constraints: {anti_affinity: [[a, b]]}\nnetworks: [{name: default, nat: true}]\n"
                    "expose: [{vm: b, port: 80, host_port: 8080}]\n")
    created = bed_cluster.json("--agent", "node1", "ve", "create", str(pair))
    host_a = created["placement"]["a"]["node"]
    other.write_text(f"name: other\nvms:\n  - {{name: c, {tiny}}}\n")
    bed_cluster.json("--agent", host_a, "ve", "create", str(other))
    nics = {("pair", vm): created["nics"][vm][0] for vm in ("a", "b")}
    nics["other", "c"] = bed_cluster.json("ve", "show", "other")["nics"]["c"][0]
    for (ve, vm), nic in nics.items():
        console = VM(bed_cluster, ve, vm).file(".log")
        wait_for(lambda c=console, a=nic["address"]: f"{tinyguest.NET} ip={a}/255.255.255.0 router=10.0.0.1"
                 in (c.read_text(errors="replace") if c.exists() else ""), timeout=240,
                 what=f"{ve}/{vm} configured by DHCP")
    assert nics["other", "c"]["address"] == nics["pair", "a"]["address"]  # one subnet, two networks
    probe = _probe(uuid.uuid4().hex[:4], host_a, created["networks"]["default"]["vni"], "10.0.0.250")
    try:
        for vm in ("a", "b"):
            wait_for(lambda v=vm: _pings(probe, nics["pair", v]["address"]), what=f"pair/{vm} answering")
        neighbours = subprocess.run(["ip", "-n", probe, "neigh", "show", nics["pair", "a"]["address"]],
                                    capture_output=True, text=True).stdout
        assert nics["pair", "a"]["mac"] in neighbours and nics["other", "c"]["mac"] not in neighbours
        host_b = created["placement"]["b"]["node"]
        web = f"{tinyguest.WEB} ip={nics['pair', 'b']['address']}"
        wait_for(lambda: _fetch(f"dtb-{host_a}", f"http://{_underlay(host_b)}:8080/") == web,
                 what="pair/b's web server on its host's port 8080")
        subprocess.run(["ip", "-n", probe, "route", "add", "default", "via", "10.0.0.1"], check=True)
        assert _fetch(probe, f"http://{_underlay(host_b)}:8080/") == web  # out by host_a's NAT, in by host_b's
        # b moves live to the third node, keeping its MAC and address: reached there, its port with it
        third = next(n for n in ("node1", "node2", "node3") if n not in {host_a, host_b})
        moved = bed_cluster.json("--agent", third, "ve", "relocate", "pair", "--vm", "b", "--to", third)
        assert moved["placement"]["b"]["transfer"]["how"] == "live" and moved["nics"] == created["nics"]
        wait_for(lambda: _pings(probe, nics["pair", "b"]["address"]), what="pair/b answering from its new host")
        wait_for(lambda: _fetch(f"dtb-{host_a}", f"http://{_underlay(third)}:8080/") == web,
                 what="pair/b's web server on its new host's port 8080")
        assert _fetch(f"dtb-{host_a}", f"http://{_underlay(host_b)}:8080/") == ""
    finally:
        subprocess.run(["ip", "netns", "del", probe], check=False)
    bed_cluster.cli("ve", "destroy", "pair")
    bed_cluster.cli("ve", "destroy", "other")
    wait_for(lambda: _network_leftovers() == [], what="no bridge, VXLAN device or DHCP server left")


def _network_leftovers() -> list[str]:
    """The VE networks' devices and nftables table in the nodes' namespaces, their gateways' namespaces and DHCP
    servers."""
    found = []
    for node in ("node1", "node2", "node3"):
        links = subprocess.run(["ip", "-n", f"dtb-{node}", "-j", "link", "show"], capture_output=True, text=True)
        found += [f"{node}:{link['ifname']}" for link in json.loads(links.stdout or "[]")
                  if link["ifname"].startswith(("dvb", "dvx", "dvg", "dvu"))]
        tables = subprocess.run(["ip", "netns", "exec", f"dtb-{node}", "nft", "list", "tables"], capture_output=True,
                                text=True).stdout
        found += [f"{node}:{table}" for table in tables.splitlines() if table.endswith(" discovery")]
    found += [ns for ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
              if ns.startswith("dvn")]
    found += [f"pid {pid.name}" for pid in Path("/proc").iterdir() if pid.name.isdigit()
              and b"dnsmasq" in _cmdline(pid) and b"--dhcp-range" in _cmdline(pid)]
    return found


def _cmdline(pid: Path) -> bytes:
    try:
        return (pid / "cmdline").read_bytes()
    except OSError:
        return b""
