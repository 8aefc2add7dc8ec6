"""What one agent is told at start: who it is, where it listens, what it runs on.

A plain record, parsed from agent.toml by `discovery.agent_config`; kept apart from `agents.node` so that
reading a configuration loads no service, libvirt or overlay code.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agents.host.capacity import Resources
from overlay.wire import tls
from overlay.wire.versions import SPOKEN, Versions

SYSTEM_LIBVIRT = "qemu:///system"
"""`libvirt_uri` of an agent whose real guests run on its host's system libvirtd (`agents.hypervisor.qemu`)."""


@dataclass
class AgentConfig:
    name: str
    site: str
    listen: str  # host:port; port 0 picks a free one
    data_dir: Path
    identity: tls.Identity
    capacity: Resources
    join: list[str] = field(default_factory=list)
    libvirt_uri: str = ""  # empty: the embedded test:/// host sized by `capacity` (qemu: the node's own libvirtd)
    migration_uri: str = ""  # qemu:///system: the URI peers migrate to; empty: qemu+tcp://HOST/system
    hypervisor: str = "test"  # or "qemu": real guests (agents.hypervisor.qemu)
    advertise: str = ""  # the host peers reach this node at (its agent, libvirtd, migrations); empty: listen's
    libvirtd_port: int = 0  # qemu: the node's libvirtd TCP port on its host address; 0 picks a free one
    migration_ports: tuple[int, int] = (0, 0)  # qemu: its migration port range; (0, 0) derives one from the port
    site_rtt_ms: dict[str, dict[str, float]] = field(default_factory=dict)  # emulated WAN latency
    replicas: int = 3
    probe_interval: float = 0.5
    suspect_timeout: float = 3.0
    ring_interval: float = 0.5
    repair_interval: float = 5.0
    kademlia: bool = True  # run a Kademlia overlay beside Chord, so records can be re-bound to it
    kad_port: int = 0  # UDP; 0 picks a free one (peers learn it over the agent's RPC)
    protocol: Versions = SPOKEN  # the protocol versions it speaks: all this build does, unless narrowed for a test
    metrics: str = "127.0.0.1:0"  # host:port of its Prometheus /metrics (agents.metrics); port 0: a free one; "": none
    dataplane: str = "auto"  # VE networks in the kernel (agents.network): "linux", "off", or "auto" (see `carries`)
    extra: dict[str, Any] = field(default_factory=dict)
    """Settings of the layers above, parsed by them and carried here unread (e.g. "dvms", by discovery.agent_config)."""

    @property
    def carries_networks(self) -> bool:
        """Whether this agent makes its VMs' network segments in the kernel (`agents.network`). "auto": unless its
        address is a loopback one: agents that share a machine's loopback share its network namespace too (a
        local cluster), where each would take the same VXLAN port and bridge names."""
        if self.dataplane != "auto":
            return self.dataplane == "linux"
        try:
            return not ipaddress.ip_address(self.host.strip("[]")).is_loopback
        except ValueError:  # a host name: VXLAN needs an address to send from
            return False

    @property
    def host(self) -> str:
        """This node's own address, without a port: where peers reach its agent, its libvirtd, its migrations."""
        return self.advertise or self.listen.rpartition(":")[0]
