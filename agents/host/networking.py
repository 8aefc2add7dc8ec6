"""The segments of this host's VE networks (`agents.network`): those its VMs' interfaces are on, with the other
hosts of each and their VMs' MACs, kept in the kernel by the data plane.

Which segments: the union of the bridges the interfaces of the VMs defined here name (their domain XML, stored by
the host: a VM that arrives by any move brings its interfaces, and one that leaves takes them), so a segment is
made before the first VM on it starts and deleted once the last one is gone. Where the other hosts are (the
forwarding entries) is the VE layer's to say, from the directory (`set_remotes`); until it has, a segment
carries this host's VMs only. Each segment also gets a DHCP server handing this host's VMs on it the
addresses their domains' metadata holds (`agents.network.dhcp`), and, for those whose NICs say so, a way out
and the ports forwarded in (`agents.network.uplink`). Without a data plane (an agent sharing its
network namespace with others, see `agents.config.AgentConfig.dataplane`) the interfaces are still written,
and nothing is done in the kernel.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Mapping

import trio

from agents.host.base import HostBase
from agents.network.dhcp import Leases
from agents.network.interfaces import Interface, interfaces_of, segments_of
from agents.network.linux import DataPlane, NetworkError
from agents.network.plan import OVERHEAD, Segment
from agents.network.uplink import Uplink
from overlay.wire.rpc import RequestError

log = logging.getLogger(__name__)
DEFAULT_MTU = 1500
INCOMING_PATIENCE = 600.0
"""Seconds the segments of a VM announced by `host.incoming` are kept for it before it is defined here."""


class Networking(HostBase):
    """The data plane of this host's VMs' networks (module docstring)."""

    dataplane: DataPlane | None = None
    """Wired by the composition place where this agent carries VE networks; None: it writes interfaces only."""
    remotes: Mapping[int, Mapping[str, frozenset[str]]] = {}
    """For each VNI, the other hosts of the network (underlay address) and the MACs of the VMs there."""
    incoming: Mapping[str, tuple[frozenset[int], float]] = {}
    """The segments of VMs arriving by live migration (`host.incoming`), and until when they are kept for them:
    QEMU on this side needs their bridges before the migration starts, and until the VM is defined here (a
    migration under TCG may take minutes, longer than its reservation lives)."""

    async def expect_segments(self, name: str, vnis: set[int]) -> None:
        """VM `name` arrives by live migration with interfaces on `vnis`: carry them now."""
        self.incoming = {**self.incoming, name: (frozenset(vnis), trio.current_time() + INCOMING_PATIENCE)}
        await self.carry_segments()

    async def nic_mtu(self) -> int:
        """The MTU of a new VM's NICs: the underlay's less VXLAN's overhead."""
        underlay = await self.dataplane.underlay_mtu() if self.dataplane is not None else DEFAULT_MTU
        return underlay - OVERHEAD

    async def check_ports(self, name: str, nics: list[Interface]) -> None:
        """Refuse new VM `name` if a host port it exposes is another VM's here already (a host port is one
        host's: `agents.network.uplink`)."""
        wanted = {(f.protocol, f.host_port) for nic in nics for f in nic.forwards}
        if not wanted:
            return
        for other, xml in await self.db.rows("SELECT name, xml FROM domains WHERE name != ?", (name,)):
            for nic in interfaces_of(xml):
                for taken in sorted({(f.protocol, f.host_port) for f in nic.forwards} & wanted):
                    raise RequestError(f"host port {taken[1]}/{taken[0]} is exposed here by {other} already")

    def _made(self, name: str, nics: list[Interface]) -> list[Interface]:
        """The NICs a new VM gets here: all, unless no segment can be made for a real guest's taps to join (its
        QEMU would not start), which then runs without them (the test driver's domains have no taps)."""
        if nics and self.dataplane is None and self.domains.kind != "test":
            log.warning("host: %s runs without its %d NICs: this agent carries no VE networks (dataplane)",
                        name, len(nics))
            return []
        return nics

    async def _forget(self, name: str) -> None:
        await super()._forget(name)
        await self.carry_segments()  # the VM's segments, if it was their last one here, go

    async def set_remotes(self, remotes: Mapping[int, Mapping[str, frozenset[str]]]) -> None:
        """Where the other VMs of this host's networks are (the VE layer, from the directory); carried at once."""
        self.remotes = remotes
        await self.carry_segments()

    async def carry_segments(self) -> None:
        """Make the kernel hold the segments this host's VMs need now (module docstring). A failure is logged,
        not raised: the VMs keep running on what the kernel holds, and the next call tries again."""
        if self.dataplane is None:
            return
        vnis: set[int] = set()
        nics: list[Interface] = []
        now = trio.current_time()
        self.incoming = {name: (v, until) for name, (v, until) in self.incoming.items()
                         if until > now and name not in self.ledger.allocated}  # not arrived yet, nor given up
        for expected, _ in self.incoming.values():
            vnis |= expected
        for (xml,) in await self.db.rows("SELECT xml FROM domains"):
            vnis |= segments_of(xml)
            nics += interfaces_of(xml)
        nics = [nic for nic in nics if nic.vni in vnis]
        try:
            await self.dataplane.carry((Segment(vni, self.remotes.get(vni, {})) for vni in sorted(vnis)),
                                       _leases(nics), _uplinks(nics))
        except NetworkError as err:
            log.warning("data plane: %s", err)


def _leases(nics: list[Interface]) -> dict[int, Leases]:
    """Each segment's DHCP leases from its VMs' NICs: their subnet, MAC -> address."""
    leases: dict[int, Leases] = {}
    for nic in nics:
        subnet = str(ipaddress.IPv4Interface(nic.address).network)
        held = leases.get(nic.vni, Leases(subnet, {}))
        leases[nic.vni] = Leases(held.subnet, {**held.hosts, nic.mac: nic.address.partition("/")[0]})
    return leases


def _uplinks(nics: list[Interface]) -> dict[int, Uplink]:
    """What each segment needs of the outside: NAT if a NIC on it is NAT'd, the ports forwarded to its NICs."""
    uplinks: dict[int, Uplink] = {}
    for nic in nics:
        if nic.nat or nic.exposed:
            held = uplinks.get(nic.vni, Uplink())
            uplinks[nic.vni] = Uplink(held.nat or nic.nat, held.forwards | nic.forwards)
    return uplinks
