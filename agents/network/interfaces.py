"""A VM's network interfaces in its domain XML: written when a host makes a new VM, read back to know which
segments (`agents.network.plan`) the VMs of this host need. The XML is the one truth of both: it travels with a
VM on every move, so the host a VM lands on learns its segments from what it defines, and keeps its MACs.

Each NIC is libvirt's `<interface type='bridge'>` on its segment's bridge, virtio, with the MAC the VE record
gave it and the segment's MTU (the underlay's less VXLAN's overhead), so the guest never sends a frame the
encapsulation would have to fragment.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable

from agents.network.plan import bridge_name, vni_of


def with_nics(xml: str, nics: Iterable[tuple[int, str]], mtu: int) -> str:
    """`xml` with an interface per (VNI, MAC) in `nics`, in order, added to its devices."""
    wanted = list(nics)
    if not wanted:
        return xml
    domain = ET.fromstring(xml)
    devices = domain.find("devices")
    if devices is None:
        devices = ET.SubElement(domain, "devices")
    for vni, mac in wanted:
        interface = ET.SubElement(devices, "interface", type="bridge")
        ET.SubElement(interface, "mac", address=mac)
        ET.SubElement(interface, "source", bridge=bridge_name(vni))
        ET.SubElement(interface, "model", type="virtio")
        ET.SubElement(interface, "mtu", size=str(mtu))
    return ET.tostring(domain, encoding="unicode")


def segments_of(xml: str) -> set[int]:
    """The VNIs of the segments the domain's interfaces are on (none for XML that does not parse)."""
    try:
        domain = ET.fromstring(xml)
    except ET.ParseError:
        return set()
    found = (vni_of(source.get("bridge", "")) for source in domain.findall("./devices/interface/source"))
    return {vni for vni in found if vni is not None}
