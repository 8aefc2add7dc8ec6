"""A VM's network interfaces in its domain XML: written when a host makes a new VM, read back to know which
segments (`agents.network.plan`) the VMs of this host need. The XML is the one truth of both: it travels with a
VM on every move, so the host a VM lands on learns its segments from what it defines, and keeps its MACs.

Each NIC is libvirt's `<interface type='bridge'>` on its segment's bridge, virtio, with the MAC the VE record
gave it and the segment's MTU (the underlay's less VXLAN's overhead), so the guest never sends a frame the
encapsulation would have to fragment. Its IPv4 address (with the subnet's prefix) is in the domain's metadata
(NET_NS), which libvirt keeps and moves with the domain: what the DHCP server of the VM's host hands out
(`agents.network.dhcp`), wherever the VM runs. So is what of the outside reaches the NIC (`Interface.nat`,
`Interface.exposed`): the host a VM runs on forwards its ports and NATs its uplink (`agents.network.uplink`).
"""

from __future__ import annotations

import contextlib
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass

from agents.network.plan import bridge_name, vni_of
from agents.network.uplink import Forward

NET_NS = "urn:discovery:network"
"""Namespace of the domain metadata that holds a VM's NICs' addresses."""


@dataclass(frozen=True)
class Port:
    """A port of the VM forwarded from its host's `host_port` (`protocol`: tcp or udp)."""

    protocol: str
    host_port: int
    port: int


@dataclass(frozen=True)
class Interface:
    """A NIC of a VM: its segment's VNI, its MAC, its IPv4 address with the subnet's prefix; whether its network
    is NAT'd out, and the ports its host forwards to it."""

    vni: int
    mac: str
    address: str
    nat: bool = False
    exposed: tuple[Port, ...] = ()

    @property
    def forwards(self) -> frozenset[Forward]:
        ip = self.address.partition("/")[0]
        return frozenset(Forward(p.protocol, p.host_port, ip, p.port) for p in self.exposed)


def with_nics(xml: str, nics: Iterable[Interface], mtu: int) -> str:
    """`xml` with an interface per NIC of `nics`, in order, added to its devices, and their addresses, NAT and
    forwarded ports to its metadata."""
    wanted = list(nics)
    if not wanted:
        return xml
    domain = ET.fromstring(xml)
    devices = domain.find("devices")
    if devices is None:
        devices = ET.SubElement(domain, "devices")
    metadata = domain.find("metadata")
    if metadata is None:
        metadata = ET.Element("metadata")
        domain.insert(2, metadata)  # after name and uuid, where libvirt puts it
    network = ET.SubElement(metadata, f"{{{NET_NS}}}network")
    for nic in wanted:
        attributes = {"vni": str(nic.vni), "mac": nic.mac, "address": nic.address}
        entry = ET.SubElement(network, f"{{{NET_NS}}}nic", attributes | ({"nat": "yes"} if nic.nat else {}))
        for port in nic.exposed:
            ET.SubElement(entry, f"{{{NET_NS}}}expose", protocol=port.protocol, host_port=str(port.host_port),
                          port=str(port.port))
        interface = ET.SubElement(devices, "interface", type="bridge")
        ET.SubElement(interface, "mac", address=nic.mac)
        ET.SubElement(interface, "source", bridge=bridge_name(nic.vni))
        ET.SubElement(interface, "model", type="virtio")
        ET.SubElement(interface, "mtu", size=str(mtu))
    return ET.tostring(domain, encoding="unicode")


def interfaces_of(xml: str) -> list[Interface]:
    """The NICs the domain's metadata holds (none for XML that does not parse; an entry that does not read is
    skipped)."""
    try:
        domain = ET.fromstring(xml)
    except ET.ParseError:
        return []
    found = []
    for nic in domain.iter(f"{{{NET_NS}}}nic"):
        with contextlib.suppress(KeyError, ValueError):
            exposed = tuple(Port(e.attrib["protocol"], int(e.attrib["host_port"]), int(e.attrib["port"]))
                            for e in nic.iter(f"{{{NET_NS}}}expose"))
            found.append(Interface(int(nic.attrib["vni"]), nic.attrib["mac"], nic.attrib["address"],
                                   nic.get("nat") == "yes", exposed))
    return found


def segments_of(xml: str) -> set[int]:
    """The VNIs of the segments the domain's interfaces are on (none for XML that does not parse)."""
    try:
        domain = ET.fromstring(xml)
    except ET.ParseError:
        return set()
    found = (vni_of(source.get("bridge", "")) for source in domain.findall("./devices/interface/source"))
    return {vni for vni in found if vni is not None}
