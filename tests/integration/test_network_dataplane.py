"""The VE networks' data plane on real kernels (`agents.network`): two hosts (network namespaces joined by a veth
underlay), each carrying a VE network's segment, with a "VM" on each (a namespace whose veth joins the segment's
bridge, as a guest's tap would): they reach each other across VXLAN, a VM of another VE network does not, the
MTU leaves room for the encapsulation, and the devices go with the segment."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from agents.network.plan import OVERHEAD, bridge_name
from discovery.testbed.net import join_segment

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (ip netns add)")]
CARRY = """
import json, sys, trio
from agents.network.linux import DataPlane
from agents.network.plan import Segment
local, wanted = sys.argv[1], json.loads(sys.argv[2])
segments = [Segment(s["vni"], {h: frozenset(m) for h, m in s["remotes"].items()}) for s in wanted]
print(trio.run(DataPlane(local).carry, segments))
"""


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=30)


def inside(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", ns, *argv, check=check)


@contextlib.contextmanager
def namespaces(*names: str) -> Iterator[None]:
    try:
        for name in names:
            sh("ip", "netns", "add", name)
        yield
    finally:
        for name in names:
            sh("ip", "netns", "del", name, check=False)


def carry(host: str, local: str, segments: list[dict]) -> int:
    done = inside(host, sys.executable, "-c", CARRY, local, json.dumps(segments))
    return int(done.stdout.strip())


def vm(host: str, name: str, vni: int, mac: str, address: str | None) -> None:
    """A VM on `host`'s segment `vni`: namespace `name`, its NIC `mac` with `address` (None: left to DHCP)."""
    join_segment(host, bridge_name(vni), name, f"{address}/24" if address is not None else None, mac)


def test_two_vms_of_one_network_on_two_hosts_reach_each_other_and_no_one_else(tmp_path):
    tag = uuid.uuid4().hex[:6]
    a, b, va, vb, vc = (f"dp{x}-{tag}" for x in ("a", "b", "va", "vb", "vc"))
    with namespaces(a, b, va, vb, vc):
        sh("ip", "link", "add", "u0", "netns", a, "type", "veth", "peer", "u0", "netns", b)
        for ns, ip in ((a, "10.77.0.1"), (b, "10.77.0.2")):
            inside(ns, "ip", "addr", "add", f"{ip}/24", "dev", "u0")
            inside(ns, "ip", "link", "set", "u0", "up")
        mac_a, mac_b, mac_c = "02:00:00:00:0a:01", "02:00:00:00:0b:01", "02:00:00:00:0c:01"
        assert carry(a, "10.77.0.1", [{"vni": 5000, "remotes": {"10.77.0.2": [mac_b]}}]) > 0
        assert carry(b, "10.77.0.2", [{"vni": 5000, "remotes": {"10.77.0.1": [mac_a]}},
                                      {"vni": 5001, "remotes": {}}]) > 0
        vm(a, va, 5000, mac_a, "10.0.0.2")
        vm(b, vb, 5000, mac_b, "10.0.0.3")
        vm(b, vc, 5001, mac_c, "10.0.0.4")  # another VE's network, the same subnet, on the same host as vb

        assert inside(va, "ping", "-c", "2", "-W", "2", "10.0.0.3").returncode == 0
        mtu = 1500 - OVERHEAD
        assert inside(va, "ping", "-c", "1", "-W", "2", "-M", "do", "-s", str(mtu - 28), "10.0.0.3").returncode == 0
        assert inside(va, "ping", "-c", "1", "-W", "2", "10.0.0.4", check=False).returncode != 0
        assert carry(a, "10.77.0.1", [{"vni": 5000, "remotes": {"10.77.0.2": [mac_b]}}]) == 0  # nothing to do

        assert carry(b, "10.77.0.2", [{"vni": 5000, "remotes": {"10.77.0.1": [mac_a]}}]) > 0  # 5001's VMs left
        links = inside(b, "ip", "-j", "link", "show").stdout
        assert {link["ifname"] for link in json.loads(links)} & {"dvb001389", "dvx001389"} == set()
        assert inside(va, "ping", "-c", "1", "-W", "2", "10.0.0.3").returncode == 0


SERVE = """
import json, sys, pathlib, trio
from agents.network.dhcp import DhcpServers, Leases
from agents.network.linux import DataPlane
from agents.network.plan import Segment
local, directory, wanted = sys.argv[1], pathlib.Path(sys.argv[2]), json.loads(sys.argv[3])
trio.run(DataPlane(local).carry, [Segment(int(v)) for v in wanted])
servers = DhcpServers(directory, "h1")
servers.carry({int(v): Leases(w["subnet"], w["hosts"]) for v, w in wanted.items()})
print("serving", flush=True)
sys.stdin.read()  # until the test is done
servers.carry({})
print("stopped", flush=True)
"""


def test_a_vm_gets_the_address_its_record_gave_it_by_dhcp_from_its_host_only(tmp_path):
    """Two VE networks with the same subnet on one host (a namespace each for their gateways), a VM on each: each
    gets its own address from its segment's server; a MAC the host does not run gets none; all gone after."""
    if not shutil.which("udhcpc"):
        pytest.skip("no udhcpc (Debian's udhcpc package) to play the guest's DHCP client")
    tag = uuid.uuid4().hex[:6]
    host, v1, v2, v3 = (f"dh{x}-{tag}" for x in ("h", "v1", "v2", "v3"))
    with namespaces(host, v1, v2, v3):
        inside(host, "ip", "link", "set", "lo", "up")
        wanted = {"5000": {"subnet": "10.0.0.0/24", "hosts": {"02:00:00:00:00:01": "10.0.0.7"}},
                  "5001": {"subnet": "10.0.0.0/24", "hosts": {"02:00:00:00:00:02": "10.0.0.9"}}}
        serving = subprocess.Popen(["ip", "netns", "exec", host, sys.executable, "-c", SERVE, "127.0.0.1",
                                    str(tmp_path), json.dumps(wanted)], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True)
        try:
            assert serving.stdout.readline().strip() == "serving"
            vm(host, v1, 5000, "02:00:00:00:00:01", None)
            vm(host, v2, 5001, "02:00:00:00:00:02", None)
            vm(host, v3, 5000, "02:00:00:00:00:03", None)  # not one of this host's VMs
            for ns, address in ((v1, "10.0.0.7"), (v2, "10.0.0.9")):
                got = inside(ns, "udhcpc", "-i", "eth0", "-n", "-q", "-f", "-t", "5", "-T", "1", "-s", "/bin/true",
                             check=False)
                assert f"lease of {address} obtained from 10.0.0.1" in got.stdout + got.stderr, got
            stranger = inside(v3, "udhcpc", "-i", "eth0", "-n", "-q", "-f", "-t", "2", "-T", "1", "-s", "/bin/true",
                              check=False)
            assert stranger.returncode != 0 and "obtained" not in stranger.stdout + stranger.stderr
        finally:
            serving.communicate("", timeout=60)
        assert not [ns for ns in sh("ip", "netns", "list").stdout.split() if ns.endswith(".h1")]


DRIVE = """
import json, sys, pathlib, trio
from agents.network.dhcp import DhcpServers, Leases
from agents.network.linux import DataPlane
from agents.network.plan import Segment
from agents.network.uplink import Forward, Uplink

async def main(local, directory):
    plane = DataPlane(local, DhcpServers(pathlib.Path(directory), "h1"))
    try:
        for line in sys.stdin:  # one wanted state a line
            w = json.loads(line)
            await plane.carry([Segment(int(v)) for v in w["leases"]],
                              {int(v): Leases(l["subnet"], l["hosts"]) for v, l in w["leases"].items()},
                              {int(v): Uplink(u["nat"], frozenset(Forward(*f) for f in u["forwards"]))
                               for v, u in w["uplinks"].items()})
            print("carried", flush=True)
        await plane.carry([], {}, {})
    finally:
        plane.close()

trio.run(main, *sys.argv[1:])
"""
ANSWER = """
import socket, sys
server = socket.create_server(("0.0.0.0", int(sys.argv[2])))
print("listening", flush=True)
while True:
    conn, peer = server.accept()
    conn.sendall(f"{sys.argv[1]} sees {peer[0]}".encode())
    conn.close()
"""
ASK = """
import socket, sys
try:
    print(socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).recv(100).decode())
except OSError as err:
    print(f"refused: {err}")
"""


@contextlib.contextmanager
def answering(ns: str, name: str, port: int) -> Iterator[None]:
    """A TCP server in namespace `ns` that tells each client `name` and the address it sees the client at."""
    server = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", ANSWER, name, str(port)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "listening"
        yield
    finally:
        server.kill()
        server.wait()


def ask(ns: str, address: str, port: int) -> str:
    return inside(ns, sys.executable, "-c", ASK, address, str(port)).stdout.strip()


def test_an_exposed_port_answers_from_outside_and_only_a_nat_d_network_gets_out(tmp_path):
    """A host (namespace) with an underlay to the outside (another namespace) carries two VE networks with the
    same subnet and a VM at the same address on each: its port 8080 reaches the first's VM, which is NAT'd out
    (the outside sees the host's address); the second's VM gets nowhere. Withdrawn, the port and the way out go."""
    if not shutil.which("nft"):
        pytest.skip("no nft (Debian's nftables package) to forward ports and NAT with")
    tag = uuid.uuid4().hex[:6]
    host, outside, v1, v2 = (f"up{x}-{tag}" for x in ("h", "o", "v1", "v2"))
    with namespaces(host, outside, v1, v2):
        sh("ip", "link", "add", "u0", "netns", host, "type", "veth", "peer", "u0", "netns", outside)
        for ns, address in ((host, "10.78.0.1"), (outside, "10.78.0.2")):
            inside(ns, "ip", "addr", "add", f"{address}/24", "dev", "u0")
            inside(ns, "ip", "link", "set", "u0", "up")
            inside(ns, "ip", "link", "set", "lo", "up")
        leases = {"5000": {"subnet": "10.0.0.0/24", "hosts": {"02:00:00:00:00:01": "10.0.0.7"}},
                  "5001": {"subnet": "10.0.0.0/24", "hosts": {"02:00:00:00:00:02": "10.0.0.7"}}}
        opened = {"5000": {"nat": True, "forwards": [["tcp", 8080, "10.0.0.7", 80]]}}
        driver = subprocess.Popen(["ip", "netns", "exec", host, sys.executable, "-c", DRIVE, "10.78.0.1",
                                   str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

        def carry_uplinks(uplinks: dict) -> None:
            driver.stdin.write(json.dumps({"leases": leases, "uplinks": uplinks}) + "\n")
            driver.stdin.flush()
            assert driver.stdout.readline().strip() == "carried"

        try:
            carry_uplinks(opened)
            for ns, mac in ((v1, "02:00:00:00:00:01"), (v2, "02:00:00:00:00:02")):
                vm(host, ns, 5000 if ns == v1 else 5001, mac, "10.0.0.7")
                inside(ns, "ip", "route", "add", "default", "via", "10.0.0.1")
            with answering(v1, "v1", 80), answering(v2, "v2", 80), answering(outside, "outside", 9000):
                assert ask(outside, "10.78.0.1", 8080) == "v1 sees 10.78.0.2"
                assert ask(host, "10.78.0.1", 8080) == "v1 sees 10.78.0.1"  # from the host itself
                assert ask(v1, "10.78.0.2", 9000) == "outside sees 10.78.0.1"  # masqueraded twice
                assert ask(v2, "10.78.0.2", 9000).startswith("refused")  # not NAT'd: no way out
                assert ask(outside, "10.78.0.1", 8081).startswith("refused")
                carry_uplinks(opened)  # nothing changed: nothing reloaded, all still there
                assert ask(outside, "10.78.0.1", 8080) == "v1 sees 10.78.0.2"

                carry_uplinks({"5000": {"nat": False, "forwards": [["tcp", 8080, "10.0.0.7", 80]]}})
                assert ask(v1, "10.78.0.2", 9000).startswith("refused")  # no more NAT out
                assert ask(outside, "10.78.0.1", 8080) == "v1 sees 10.78.0.2"  # the port still forwarded

                carry_uplinks({})
                assert ask(outside, "10.78.0.1", 8080).startswith("refused")
                links = {link["ifname"] for link in json.loads(inside(host, "ip", "-j", "link", "show").stdout)}
                assert not [name for name in links if name.startswith("dvu")]
                assert "discovery" not in inside(host, "nft", "list", "tables").stdout
        finally:
            driver.communicate("", timeout=60)
        assert driver.returncode == 0
        assert not [ns for ns in sh("ip", "netns", "list").stdout.split() if ns.endswith(".h1")]
