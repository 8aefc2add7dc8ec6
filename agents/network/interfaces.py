"""A VM's network interfaces in its domain XML: written when a host makes a new VM, read back to know which
segments (`agents.network.plan`) the VMs of this host need. The XML is the one truth of both: it travels with a
VM on every move, so the host a VM lands on learns its segments from what it defines, and keeps its MACs.

Each NIC is libvirt's `<interface type='bridge'>` on its segment's bridge, virtio, with the MAC the VE record
gave it and the segment's MTU (the underlay's less VXLAN's overhead), so the guest never sends a frame the
encapsulation would have to fragment. Its IPv4 address (with the subnet's prefix) is in the domain's metadata
(NET_NS), which libvirt keeps and moves with the domain: what the DHCP server of the VM's host hands out
(`agents.network.dhcp`), wherever the VM runs.
"""

from __future__ import annotations

import contextlib
import xml.etree.ElementTree as ET
from collections.abc import Iterable

from agents.network.plan import bridge_name, vni_of

NET_NS = "urn:discovery:network"
"""Namespace of the domain metadata that holds a VM's NICs' addresses."""


def with_nics(xml: str, nics: Iterable[tuple[int, str, str]], mtu: int) -> str:
    """`xml` with an interface per (VNI, MAC, address/prefix) in `nics`, in order, added to its devices, and the
    addresses to its metadata."""
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
    for vni, mac, address in wanted:
        ET.SubElement(network, f"{{{NET_NS}}}nic", vni=str(vni), mac=mac, address=address)
        interface = ET.SubElement(devices, "interface", type="bridge")
        ET.SubElement(interface, "mac", address=mac)
        ET.SubElement(interface, "source", bridge=bridge_name(vni))
        ET.SubElement(interface, "model", type="virtio")
        ET.SubElement(interface, "mtu", size=str(mtu))
    return ET.tostring(domain, encoding="unicode")


def addresses_of(xml: str) -> dict[int, dict[str, str]]:
    """The NICs' addresses the domain's metadata holds: for each VNI, MAC -> address/prefix."""
    try:
        domain = ET.fromstring(xml)
    except ET.ParseError:
        return {}
    found: dict[int, dict[str, str]] = {}
    for nic in domain.iter(f"{{{NET_NS}}}nic"):
        with contextlib.suppress(KeyError, ValueError):
            found.setdefault(int(nic.attrib["vni"]), {})[nic.attrib["mac"]] = nic.attrib["address"]
    return found


def segments_of(xml: str) -> set[int]:
    """The VNIs of the segments the domain's interfaces are on (none for XML that does not parse)."""
    try:
        domain = ET.fromstring(xml)
    except ET.ParseError:
        return set()
    found = (vni_of(source.get("bridge", "")) for source in domain.findall("./devices/interface/source"))
    return {vni for vni in found if vni is not None}
