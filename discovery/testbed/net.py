"""What runs `ip` and `tc`, enters namespaces and probes links: the testbed's (and the benchmarks') I/O.

Never touches a namespace, interface or process that a caller did not name; needs root.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import signal
import socket
import statistics
import struct
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

PROBE_PORT = 5201
_TCPI_RTT = 68
"""Offset of tcpi_rtt (µs) in struct tcp_info: 8 one-byte fields, then 15 u32 before it."""
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class NetError(Exception):
    """A one-line reason an `ip`/`tc` command failed."""


def ip(*args: str, check: bool = True) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise NetError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def in_ns(namespace: str, *command: str) -> None:
    done = subprocess.run(["ip", "netns", "exec", namespace, *command], capture_output=True, text=True)
    if done.returncode != 0:
        raise NetError(f"{namespace}: {' '.join(command)}: {done.stderr.strip()}")


def shape(namespace: str, dev: str, mbit: float) -> None:
    """Limit what `dev` sends to `mbit` with HTB (this kernel has neither netem nor fq, and tbf splits every GSO
    packet)."""
    in_ns(namespace, "tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "1")
    in_ns(namespace, "tc", "class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb",
          "rate", f"{mbit}mbit", "ceil", f"{mbit}mbit", "quantum", "60000")


def join_segment(host: str, bridge: str, name: str, address: str | None, mac: str | None = None) -> None:
    """Make namespace `name` (which exists) a VM stand-in on bridge `bridge` of namespace `host` (a VE network's
    segment, `agents.network.plan`): its eth0 is a veth from a port of that bridge, at the bridge's MTU as a
    guest's NIC is, with `mac` (None: the kernel's) and `address` (CIDR; None: none, to get one by DHCP)."""
    port = "vs" + hashlib.sha1(name.encode()).hexdigest()[:10]  # unique on the host, under 15 characters
    size = str(json.loads(ip("-n", host, "-j", "link", "show", "dev", bridge))[0]["mtu"])
    ip("link", "add", port, "netns", host, "type", "veth", "peer", "eth0", "netns", name)
    ip("-n", host, "link", "set", port, "master", bridge, "mtu", size, "up")
    ip("-n", name, "link", "set", "eth0", "mtu", size, *(("address", mac) if mac else ()), "up")
    if address is not None:
        ip("-n", name, "addr", "add", address, "dev", "eth0")


def namespaces() -> list[str]:
    return sorted(p.name for p in Path("/run/netns").glob("*")) if Path("/run/netns").is_dir() else []


def remove(names: Sequence[str], grace: float = 10.0) -> None:
    """End every process inside each namespace (only ours run there) and their children elsewhere, then delete
    it: its veths and bridges go with it. Raises if one is still there. The processes get SIGTERM and `grace`
    seconds first: an agent a deployment tool started (a bare node's) then stops as it would on its host, with
    its DHCP servers, which run in namespaces of their own; what is left gets SIGKILL."""
    inside = {int(pid) for ns in names for pid in ip("netns", "pids", ns, check=False).split()}
    doomed = family(inside)
    _signal(doomed, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(Path(f"/proc/{pid}").exists() for pid in doomed) and time.monotonic() < deadline:
        time.sleep(0.1)
    _signal(family(doomed), signal.SIGKILL)
    for ns in reversed(names):
        ip("netns", "del", ns, check=False)
    left = [ns for ns in names if Path(f"/run/netns/{ns}").exists()]
    if left:
        raise NetError(f"network namespaces left behind: {', '.join(left)}")


def family(pids: set[int]) -> set[int]:
    """`pids` and every descendant of theirs (wherever they run: a child may be in another namespace)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            parents[int(stat.parent.name)] = int(stat.read_text().rpartition(")")[2].split()[1])
    found = set(pids)
    while more := {pid for pid, parent in parents.items() if parent in found} - found:
        found |= more
    return found


def _signal(pids: set[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def inside(namespace: str) -> Iterator[None]:
    """Run this thread in `namespace` meanwhile: the sockets it opens (and the threads it starts) are there, and
    stay there after it leaves."""
    with open("/proc/thread-self/ns/net") as back, open(f"/run/netns/{namespace}") as there:
        _setns(there.fileno())
        try:
            yield
        finally:
            _setns(back.fileno())


def connect_rtt_ms(namespace: str, addr: str, port: int, samples: int = 9) -> float:
    """Median RTT of TCP connects from `namespace` to a listening `addr:port`, as the kernel timed each SYN to its
    SYN-ACK (TCP_INFO's first sample): the path's RTT, relay included, without this process's own wake-ups."""
    times = []
    for _ in range(samples):
        with inside(namespace):
            sock = socket.socket()
        try:
            sock.settimeout(5.0)
            sock.connect((addr, port))
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
            times.append(struct.unpack_from("I", info, _TCPI_RTT)[0] / 1000)
        finally:
            sock.close()
    return statistics.median(times)


def throughput(senders: Sequence[tuple[str, str]], receiver: tuple[str, str], seconds: float = 3.0,
               warmup: float = 1.0) -> list[float]:
    """Mbit/s that each of `senders` (namespace, address) carries over TCP to `receiver`, all at once, as the
    receiver counts it over `seconds` after `warmup` seconds (HTB's initial burst and TCP's slow start
    excluded)."""
    receiver_ns, receiver_addr = receiver
    with inside(receiver_ns):
        server = socket.create_server((receiver_addr, PROBE_PORT), backlog=len(senders))
    clients = []
    try:
        for ns, _ in senders:
            with inside(ns):
                clients.append(socket.create_connection((receiver_addr, PROBE_PORT), timeout=10))
        by_addr = {a.getpeername()[0]: a for a in (server.accept()[0] for _ in senders)}
        accepted = [by_addr[addr] for _, addr in senders]
        begin = time.monotonic() + warmup
        end = begin + seconds
        counts = [0] * len(accepted)

        def send(sock: socket.socket) -> None:
            data = bytes(1 << 16)
            with contextlib.suppress(OSError):
                while time.monotonic() < end:
                    sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)

        def receive(k: int, sock: socket.socket) -> None:
            sock.settimeout(10.0)
            with contextlib.suppress(OSError):
                while got := len(sock.recv(1 << 20)):
                    if begin <= time.monotonic() < end:
                        counts[k] += got

        threads = [threading.Thread(target=send, args=(c,)) for c in clients]
        threads += [threading.Thread(target=receive, args=(k, a)) for k, a in enumerate(accepted)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for a in accepted:
            a.close()
    finally:
        for c in clients:
            c.close()
        server.close()
    return [round(c * 8 / seconds / 1e6, 1) for c in counts]
