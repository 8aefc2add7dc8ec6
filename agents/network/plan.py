"""The VE networks' data plane on one host, as a sans-IO reconciler: what the kernel should hold, what it holds,
and the `ip`/`bridge` commands that take one to the other (`agents.network.linux` runs them).

One VE network on a host that runs VMs on it is a *segment*, the data plane of OpenStack Neutron's Linux-bridge
agent and of Docker's overlay networks:

- a Linux bridge, `dvb<vni>` (the VNI in 6 hex digits: names stay under the kernel's 15 characters and are
  the same on every host), which the VMs' taps join (libvirt's `<interface type='bridge'>`);
- a VXLAN device, `dvx<vni>`, on the bridge: the network's VNI, this host's underlay address as its source,
  UDP 4789, no learning, neither by the VXLAN device nor by the bridge on its port (the agents know every
  MAC: they are in the VE record; and the gateway's MAC, the same on every host, `agents.network.dhcp`, must
  only ever be learnt on the local port);
- forwarding entries on the VXLAN device: for each other host of the network, the all-zero MAC to it (the
  head-end replication of broadcasts: ARP and DHCP reach every host of the network, with no multicast) and
  each MAC of its VMs to it (unicast goes straight to the VM's host).

The MTU of both is the underlay's less VXLAN's 50 bytes (outer IPv4, UDP, VXLAN and Ethernet headers), and the
VMs' NICs get the same (`<mtu>`), so an encapsulated frame never needs fragmenting. A VE's VMs can reach only
their own segments: each network has its own bridge and VNI, and nothing on this host joins two bridges.

`plan` compares `Segment`s (wanted) with what the kernel reports (`Seen`) and lists the commands; a segment no
longer wanted (its last VM left) is deleted with its bridge, which takes its forwarding entries with it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

VXLAN_PORT = 4789
OVERHEAD = 50
"""Bytes VXLAN over IPv4 adds to a frame: outer IPv4 (20), UDP (8), VXLAN (8) and the inner Ethernet (14)."""
FLOOD = "00:00:00:00:00:00"
"""The forwarding entry VXLAN sends broadcasts, multicasts and unknown unicasts by (to every host listed)."""
PREFIXES = ("dvb", "dvx")


def bridge_name(vni: int) -> str:
    return f"dvb{vni:06x}"


def vxlan_name(vni: int) -> str:
    return f"dvx{vni:06x}"


@dataclass(frozen=True)
class Segment:
    """A VE network as this host must carry it: its VNI and, for each other host of the network (its underlay
    address), the MACs of the VMs there."""

    vni: int
    remotes: Mapping[str, frozenset[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Seen:
    """What the kernel holds of the data plane: the segments' devices (by VNI: the VXLAN device's source address
    and MTU, None when the bridge or the VXLAN device is missing), and each VXLAN device's forwarding entries
    (MAC, destination)."""

    vxlans: Mapping[int, tuple[str, int] | None] = field(default_factory=dict)
    fdb: Mapping[int, frozenset[tuple[str, str]]] = field(default_factory=dict)


def plan(wanted: Iterable[Segment], seen: Seen, local: str, underlay_mtu: int) -> list[list[str]]:
    """The commands (argv) that make the kernel hold exactly `wanted`, this host's underlay address being
    `local` and its MTU `underlay_mtu`; empty when it already does."""
    mtu = underlay_mtu - OVERHEAD
    by_vni = {segment.vni: segment for segment in wanted}
    commands: list[list[str]] = []
    for vni in sorted(set(seen.vxlans) - set(by_vni)):
        commands += [["ip", "link", "del", vxlan_name(vni)], ["ip", "link", "del", bridge_name(vni)]]
    for vni, segment in sorted(by_vni.items()):
        kept = seen.vxlans.get(vni) == (local, mtu)
        if not kept:
            commands += _devices(vni, vni in seen.vxlans, local, mtu)
        commands += _forwarding(vni, segment, seen.fdb.get(vni, frozenset()) if kept else frozenset())
    return commands


def _devices(vni: int, leftover: bool, local: str, mtu: int) -> list[list[str]]:
    """The bridge and VXLAN device of a segment, made (again, if a `leftover` differs: its entries go with it)."""
    bridge, vxlan = bridge_name(vni), vxlan_name(vni)
    commands = []
    if leftover:  # another address or MTU, or half missing
        commands += [["ip", "link", "del", vxlan], ["ip", "link", "del", bridge]]
    return commands + [
        ["ip", "link", "add", bridge, "mtu", str(mtu), "type", "bridge"],
        ["ip", "link", "add", vxlan, "mtu", str(mtu), "type", "vxlan", "id", str(vni), "local", local,
         "dstport", str(VXLAN_PORT), "nolearning"],
        ["ip", "link", "set", vxlan, "master", bridge, "up"],
        ["bridge", "link", "set", "dev", vxlan, "learning", "off"],
        ["ip", "link", "set", bridge, "up"],
    ]


def _forwarding(vni: int, segment: Segment, held: frozenset[tuple[str, str]]) -> list[list[str]]:
    """The forwarding entries of a segment: added where missing, deleted where no longer wanted."""
    vxlan = vxlan_name(vni)
    wanted = {(FLOOD, host) for host in segment.remotes} | {
        (mac, host) for host, macs in segment.remotes.items() for mac in macs}
    commands = [["bridge", "fdb", "del", mac, "dev", vxlan, "dst", host] for mac, host in sorted(held - wanted)]
    return commands + [["bridge", "fdb", "append" if mac == FLOOD else "replace", mac, "dev", vxlan, "dst", host]
                       for mac, host in sorted(wanted - held)]


def seen_from(links: list[dict[str, object]], fdb: Mapping[int, list[dict[str, object]]]) -> Seen:
    """`Seen` from `ip -j -d link show` (every link) and each VNI's VXLAN device's rows of `bridge -j fdb show`:
    only the devices named as this module names them count; the bridge's own entries (no `dst`) are not
    forwarding."""
    bridges: set[int] = set()
    tunnels: dict[int, tuple[str, int]] = {}
    for link in links:
        name = str(link.get("ifname", ""))
        vni = vni_of(name)
        info = link.get("linkinfo")
        data = info.get("info_data") if isinstance(info, dict) else None
        if vni is not None and name.startswith("dvx") and isinstance(data, dict):
            tunnels[vni] = (str(data.get("local", "")), int(str(link.get("mtu", 0))))
        elif vni is not None:
            bridges.add(vni)
    vxlans = {vni: tunnels.get(vni) if vni in bridges else None for vni in bridges | set(tunnels)}
    entries = {vni: frozenset((str(e["mac"]), str(e["dst"])) for e in rows if "dst" in e)
               for vni, rows in fdb.items()}
    return Seen(vxlans, entries)


def vni_of(name: str) -> int | None:
    """The VNI a device named as this module names them carries; None for any other name."""
    if len(name) != 9 or not name.startswith(PREFIXES):
        return None
    try:
        return int(name[3:], 16)
    except ValueError:
        return None
