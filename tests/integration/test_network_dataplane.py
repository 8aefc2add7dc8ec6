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
