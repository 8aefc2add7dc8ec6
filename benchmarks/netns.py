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
was created in), so that a figure measured on the testbed can be read against what its links carry. The
commands, namespace entry and probes are the product testbed's (`discovery.testbed.net`); this file keeps only
the benchmarks' one-bridge layout (`discovery testbed` joins several sites' bridges through a router).

Needs root (`ip netns add`); never touches an interface or a process it did not create.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from discovery.testbed import net

SUBNET = "10.213.0"
"""The /24 the nodes' addresses are taken from (private, and only ever inside the testbed's namespaces)."""
HUB_HOST = 254


@dataclass(frozen=True)
class Testbed:
    hub: str
    """The hub's namespace: the bridge, and SUBNET.254 to call the nodes from."""
    nodes: list[tuple[str, str]]
    """Each node's namespace and address, in the order of the names given."""
    uplink_mbit: float

    def inside(self, namespace: str) -> contextlib.AbstractContextManager[None]:
        """Run this thread in `namespace` meanwhile (`discovery.testbed.net.inside`)."""
        return net.inside(namespace)


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
        net.ip("netns", "add", hub)
        created.append(hub)
        net.ip("-n", hub, "link", "add", "br0", "type", "bridge")
        net.ip("-n", hub, "addr", "add", f"{SUBNET}.{HUB_HOST}/24", "dev", "br0")
        for dev in ("lo", "br0"):
            net.ip("-n", hub, "link", "set", dev, "up")
        nodes = []
        for i, name in enumerate(names, start=1):
            ns, port, addr = f"{tag}-{name}", f"port{i}", f"{SUBNET}.{i}"
            net.ip("netns", "add", ns)
            created.append(ns)
            net.ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", hub)
            net.ip("-n", hub, "link", "set", port, "master", "br0", "up")
            net.ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            for dev in ("lo", "eth0"):
                net.ip("-n", ns, "link", "set", dev, "up")
            net.shape(ns, "eth0", uplink_mbit)
            nodes.append((ns, addr))
        yield Testbed(hub, nodes, uplink_mbit)
    finally:
        net.remove(created)


def throughput(bed: Testbed, senders: Sequence[int], receiver: int, seconds: float = 3.0) -> list[float]:
    """Mbit/s that each of `senders` (indices into `bed.nodes`) carries over TCP to `receiver`, all at once
    (`discovery.testbed.net.throughput`)."""
    return net.throughput([bed.nodes[i] for i in senders], bed.nodes[receiver], seconds)
