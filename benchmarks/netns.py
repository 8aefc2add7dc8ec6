"""A testbed of network namespaces for the cluster benchmarks: nodes whose uplinks are limited, on one bridge.

    with testbed(["node1", "node2"], uplink_mbit=100) as bed, bed.inside(bed.hub):
        ...  # agents started with `ip netns exec bed.nodes[i][0]`, reached at bed.nodes[i][1]

Each node gets a network namespace of its own with one interface, `eth0`, at SUBNET.<i> (i from 1), the end
of a veth pair whose other end is a port of a bridge in a hub namespace (at SUBNET.254, where the benchmark's
own client calls from: it enters the hub with `inside`). The node's egress, its uplink, is shaped by HTB to
`uplink_mbit` (this kernel has neither netem nor fq, and tbf splits every GSO packet); its ingress and the
hub are not limited, so a node pulling from three holders can receive three uplinks' worth at once. Nothing
is created in the root namespace: the addresses and the bridge exist only inside these namespaces, and
deleting them (on the way out, whatever happened) removes the veths and the bridge with them.

`throughput` checks the shaping with plain TCP flows between namespaces (a socket keeps the namespace it
was created in), so that a figure measured on the testbed can be read against what its links carry.

Needs root (`ip netns add`); never touches an interface or a process it did not create.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

SUBNET = "10.213.0"
"""The /24 the nodes' addresses are taken from (private, and only ever inside the testbed's namespaces)."""
HUB_HOST = 254
PROBE_PORT = 5201
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, stdout=subprocess.DEVNULL)


def _tc(namespace: str, *args: str) -> None:
    subprocess.run(["ip", "netns", "exec", namespace, "tc", *args], check=True, stdout=subprocess.DEVNULL)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@dataclass(frozen=True)
class Testbed:
    hub: str
    """The hub's namespace: the bridge, and SUBNET.254 to call the nodes from."""
    nodes: list[tuple[str, str]]
    """Each node's namespace and address, in the order of the names given."""
    uplink_mbit: float

    @contextlib.contextmanager
    def inside(self, namespace: str) -> Iterator[None]:
        """Run this thread in `namespace` meanwhile: the sockets it opens (and the threads it starts) are there,
        and stay there after it leaves."""
        with open("/proc/thread-self/ns/net") as back, open(f"/run/netns/{namespace}") as there:
            _setns(there.fileno())
            try:
                yield
            finally:
                _setns(back.fileno())


@contextlib.contextmanager
def testbed(names: Sequence[str], uplink_mbit: float) -> Iterator[Testbed]:
    """Build the namespaces, veths, bridge and shaping for nodes `names`; delete them all on the way out, after
    killing any process still inside one (only this benchmark starts processes there)."""
    if not 1 <= len(names) < HUB_HOST or uplink_mbit <= 0:
        raise ValueError(f"1 to {HUB_HOST - 1} nodes and a positive uplink, got {len(names)} and {uplink_mbit}")
    tag = f"dsc{os.getpid()}"
    hub = f"{tag}-hub"
    created: list[str] = []
    try:
        _ip("netns", "add", hub)
        created.append(hub)
        _ip("-n", hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", hub, "addr", "add", f"{SUBNET}.{HUB_HOST}/24", "dev", "br0")
        for dev in ("lo", "br0"):
            _ip("-n", hub, "link", "set", dev, "up")
        nodes = []
        for i, name in enumerate(names, start=1):
            ns, port, addr = f"{tag}-{name}", f"port{i}", f"{SUBNET}.{i}"
            _ip("netns", "add", ns)
            created.append(ns)
            _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", hub)
            _ip("-n", hub, "link", "set", port, "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            for dev in ("lo", "eth0"):
                _ip("-n", ns, "link", "set", dev, "up")
            _tc(ns, "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb", "default", "1")
            _tc(ns, "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:1", "htb",
                "rate", f"{uplink_mbit}mbit", "ceil", f"{uplink_mbit}mbit", "quantum", "60000")
            nodes.append((ns, addr))
        yield Testbed(hub, nodes, uplink_mbit)
    finally:
        _remove(created)


def _remove(namespaces: list[str]) -> None:
    for ns in reversed(namespaces):
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", ns], check=False)
    left = [ns for ns in namespaces if Path(f"/run/netns/{ns}").exists()]
    if left:
        raise RuntimeError(f"network namespaces left behind: {', '.join(left)}")


def throughput(bed: Testbed, senders: Sequence[int], receiver: int, seconds: float = 3.0) -> list[float]:
    """Mbit/s that each of `senders` (indices into `bed.nodes`) carries over TCP to `receiver`, all at once, as
    the receiver counts it over `seconds` after the first second (HTB's initial burst and TCP's slow start
    excluded)."""
    receiver_ns, receiver_addr = bed.nodes[receiver]
    with bed.inside(receiver_ns):
        server = socket.create_server((receiver_addr, PROBE_PORT), backlog=len(senders))
    clients = []
    try:
        for i in senders:
            with bed.inside(bed.nodes[i][0]):
                clients.append(socket.create_connection((receiver_addr, PROBE_PORT), timeout=10))
        by_addr = {a.getpeername()[0]: a for a in (server.accept()[0] for _ in senders)}
        accepted = [by_addr[bed.nodes[i][1]] for i in senders]
        begin = time.monotonic() + 1.0
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
