"""Addresses for this host's VMs by DHCP: one `dnsmasq` per segment, in a network namespace of its own.

Why a namespace per segment (OpenStack Neutron's `qdhcp-` namespaces): two VEs may use the same subnet, and a
host that runs VMs of both would otherwise hold one gateway address twice. The namespace `dvn<vni>` holds the
gateway: its `eth0` is the far end of a veth whose near end, `dvg<vni>`, is a port of the segment's bridge, with
the subnet's first host as its address and a MAC drawn from the VNI, the same on every host of the network (a
VM's ARP reply from any of them says the same thing, and the bridge never learns the gateway behind the VXLAN
port: learning is off there, `agents.network.plan`).

Each host's dnsmasq knows only the MACs of the VMs it runs (`dhcp-range=...,static`: a client it does not know
gets no answer from it), so a VM's broadcast DHCPDISCOVER, which reaches every host of the network, is answered
by its own host with the address the VE record gave its NIC. dnsmasq serves no DNS (`--port=0`) and touches no
file once it runs (it drops to `nobody`, who may not read the agent's data directory): the hosts are on its
command line, its leases in memory (`--leasefile-ro`: a lease is the record's address, not dnsmasq's choice),
so a change of the VMs restarts it, in the namespace it keeps. It runs as a child of the agent, its pid in
`<dir>/<vni>.pid`, so an agent that died leaves no server behind once it carries its segments again.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from agents.network.plan import bridge_name

STOP_PATIENCE = 5.0


class DhcpError(Exception):
    """A DHCP server could not be set up; one line."""


@dataclass(frozen=True)
class Leases:
    """What one segment's DHCP server hands out here: its subnet (CIDR) and each local VM's MAC and address."""

    subnet: str
    hosts: Mapping[str, str]

    @property
    def gateway(self) -> ipaddress.IPv4Interface:
        net = ipaddress.IPv4Network(self.subnet)
        return ipaddress.IPv4Interface(f"{net.network_address + 1}/{net.prefixlen}")


def namespace(vni: int, tag: str) -> str:
    """The namespace of segment `vni`'s gateway on the host `tag` names: namespace names are the machine's, not
    a network namespace's, so hosts sharing a machine (the testbed's) each need their own."""
    return f"dvn{vni:06x}.{tag}"


def gateway_port(vni: int) -> str:
    return f"dvg{vni:06x}"


def gateway_mac(vni: int) -> str:
    """The gateway's MAC on segment `vni`: locally administered, unicast, the same on every host."""
    return "02:d5:00:" + ":".join(f"{b:02x}" for b in vni.to_bytes(3, "big"))


class DhcpServers:
    """The DHCP servers of this host's segments; `directory` keeps their hosts files, leases and pid files, `tag`
    (the node's name) tells its namespaces from other hosts' on one machine. Blocking (call it off the loop)."""

    def __init__(self, directory: Path, tag: str) -> None:
        self.directory, self.tag = directory, tag
        self._running: dict[int, tuple[subprocess.Popen[bytes], Leases]] = {}

    def carry(self, wanted: Mapping[int, Leases]) -> None:
        """Serve exactly the segments of `wanted`, each with its leases; end the others (an earlier run's too)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for vni in set(self._running) - set(wanted):
            self._stop(vni)
        for pid_file in self.directory.glob("*.pid"):  # left by an agent that died
            if _vni(pid_file.stem) not in self._running:
                _end_pid(pid_file)
        suffix = f".{self.tag}"
        for line in _run("ip", "netns", "list").splitlines():
            name = line.split()[0] if line.strip() else ""
            if name.startswith("dvn") and name.endswith(suffix) and _vni(name[3:9]) not in wanted:
                _run("ip", "netns", "del", name)
        for vni, leases in wanted.items():
            running = self._running.get(vni)
            if running is not None and running[0].poll() is None and running[1] == leases:
                continue
            if running is not None and running[1].subnet == leases.subnet:
                self._end(vni)  # other VMs: a new dnsmasq in the namespace it has
            else:
                self._stop(vni)
                self._namespace(vni, leases)
            self._serve(vni, leases)

    def stop_all(self) -> None:
        for vni in list(self._running):
            self._stop(vni)

    def _namespace(self, vni: int, leases: Leases) -> None:
        """The segment's gateway: its namespace, and a veth from the bridge into it holding the address."""
        ns, port, gateway = namespace(vni, self.tag), gateway_port(vni), leases.gateway
        _run("ip", "netns", "del", ns, check=False)
        _run("ip", "netns", "add", ns)
        _run("ip", "link", "add", port, "type", "veth", "peer", "eth0", "netns", ns)
        _run("ip", "link", "set", port, "master", bridge_name(vni), "up")
        for argv in (("link", "set", "lo", "up"), ("link", "set", "eth0", "address", gateway_mac(vni), "up"),
                     ("addr", "add", str(gateway), "dev", "eth0")):
            _run("ip", "-n", ns, *argv)

    def _serve(self, vni: int, leases: Leases) -> None:
        gateway, base = leases.gateway, self.directory / f"{vni:06x}"
        with base.with_suffix(".log").open("wb") as log:
            process = subprocess.Popen(
                ["ip", "netns", "exec", namespace(vni, self.tag), "dnsmasq", "--keep-in-foreground",
                 "--conf-file=/dev/null", "--port=0", "--interface=eth0", "--bind-interfaces", "--no-hosts",
                 "--no-resolv", "--leasefile-ro", "--pid-file=",
                 f"--dhcp-range={gateway.network.network_address},static,{gateway.netmask},12h",
                 f"--dhcp-option=option:router,{gateway.ip}",
                 *(f"--dhcp-host={mac},{address}" for mac, address in sorted(leases.hosts.items()))],
                stdout=subprocess.DEVNULL, stderr=log)
        base.with_suffix(".pid").write_text(str(process.pid))
        self._running[vni] = (process, leases)

    def _stop(self, vni: int) -> None:
        """End the segment's dnsmasq and its namespace."""
        self._end(vni)
        _run("ip", "netns", "del", namespace(vni, self.tag), check=False)  # the veth goes with its far end

    def _end(self, vni: int) -> None:
        process, _ = self._running.pop(vni, (None, None))
        if process is not None:
            process.terminate()
            try:
                process.wait(STOP_PATIENCE)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        (self.directory / f"{vni:06x}.pid").unlink(missing_ok=True)


def _vni(text: str) -> int | None:
    try:
        return int(text, 16)
    except ValueError:
        return None


def _end_pid(pid_file: Path) -> None:
    """End the dnsmasq a pid file names (a pid that is no dnsmasq, or gone, is left alone), then the file."""
    with contextlib.suppress(ValueError, OSError):
        pid = int(pid_file.read_text())
        if b"dnsmasq" in Path(f"/proc/{pid}/cmdline").read_bytes():
            os.kill(pid, signal.SIGTERM)
    pid_file.unlink(missing_ok=True)


def _run(*argv: str, check: bool = True) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    if check and done.returncode != 0:
        why = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        raise DhcpError(f"{' '.join(argv)}: {why}")
    return done.stdout
