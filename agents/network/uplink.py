"""The way out of this host's VE networks and the way in, as sans-IO plans (`agents.network.linux` runs them):
a VM's ports its host forwards (`expose`), and the NAT'd uplink of a network (`nat: true`).

Why two stages of NAT (the routers of OpenStack Neutron's `qrouter-` namespaces do the same): VEs may share a
subnet, so this host cannot route to a VM's address, and VMs of two VEs cannot share one conntrack zone. Each
segment that needs the outside gets a veth from this host (`dvu<vni>`) into its gateway's namespace (`up0`,
`agents.network.dhcp`), with a link-local /31 unique on this host (TRANSIT, one *slot* per segment):

- an exposed port: this host DNATs its host port (on any of its addresses: `fib daddr type local`) to the
  namespace's end of the veth, the namespace DNATs it on to the VM's address and port; replies go back through
  both conntracks;
- the uplink: the namespace masquerades what its VMs send out of `up0` to its transit address, and this host
  masquerades that again to the address of the interface it leaves by.

The namespace forwards nothing else (`policy drop`): without `nat`, a VM answers on its exposed ports but opens
no connection out. A connection to an exposed port from this host itself works on its addresses but not on
127.0.0.1 (the kernel does not route loopback sources; Docker answers those with a user-space proxy).

A host port is one host's: two VMs here exposing one port (VMs of two VEs, or one moved here) cannot both have
it; the first by VNI, then address, keeps it and `forwards` reports the other (`agents.host.networking` refuses
a new VM whose port is taken, so only a move can bring one).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

LINK_LOCAL = IPv4Network("169.254.0.0/16")
TRANSIT_FIRST = IPv4Address("169.254.1.0")
SLOTS = 168 * 128
"""Transit /31s from 169.254.1.0 to 169.254.168.255: link-local (never routed off the host), clear of RFC 3927's
reserved first and last /24 and of 169.254.169.254, the metadata service of clouds."""
TABLE = "discovery"
NAMESPACE_PORT = "up0"


def uplink_port(vni: int) -> str:
    return f"dvu{vni:06x}"


@dataclass(frozen=True, order=True)
class Forward:
    """A host port forwarded to a VM: `protocol` (tcp, udp) `host_port` to `address`:`port`."""

    protocol: str
    host_port: int
    address: str
    port: int


@dataclass(frozen=True)
class Uplink:
    """What one segment needs of the outside: NAT out for its VMs, and ports forwarded to them."""

    nat: bool = False
    forwards: frozenset[Forward] = frozenset()


def transit(slot: int) -> tuple[IPv4Interface, IPv4Interface]:
    """The /31 of transit `slot`: this host's end, the namespace's end."""
    host = TRANSIT_FIRST + 2 * slot
    return IPv4Interface(f"{host}/31"), IPv4Interface(f"{host + 1}/31")


def slot_of(address: str) -> int | None:
    """The slot whose host end is `address` (no prefix); None for an address outside TRANSIT's slots."""
    offset = int(IPv4Address(address)) - int(TRANSIT_FIRST)
    return offset // 2 if 0 <= offset < 2 * SLOTS and offset % 2 == 0 else None


def slots(wanted: Iterable[int], held: Mapping[int, int]) -> dict[int, int]:
    """A transit slot for each VNI of `wanted`: the one `held` (what the kernel has) if any, else the first free
    from the VNI's own (`vni % SLOTS`): stable while a segment lives, unique on this host."""
    wanted = sorted(set(wanted))
    kept = {vni: held[vni] for vni in wanted if vni in held}
    taken = set(kept.values())
    for vni in wanted:
        if vni not in kept:
            slot = vni % SLOTS
            while slot in taken:
                slot = (slot + 1) % SLOTS
            kept[vni] = slot
            taken.add(slot)
    return kept


def forwards(uplinks: Mapping[int, Uplink]) -> tuple[dict[int, frozenset[Forward]], list[tuple[int, Forward]]]:
    """The forwards each segment gets here, each (protocol, host port) once (module docstring), and those left
    out as (VNI, forward)."""
    kept: dict[int, set[Forward]] = {vni: set() for vni in uplinks}
    taken: set[tuple[str, int]] = set()
    dropped = []
    for vni, forward in sorted((vni, f) for vni, uplink in uplinks.items() for f in uplink.forwards):
        if (forward.protocol, forward.host_port) in taken:
            dropped.append((vni, forward))
        else:
            taken.add((forward.protocol, forward.host_port))
            kept[vni].add(forward)
    return {vni: frozenset(f) for vni, f in kept.items()}, dropped


def host_ruleset(kept: Mapping[int, frozenset[Forward]], slotted: Mapping[int, int]) -> str:
    """This host's nftables table: each forward's host port DNATed to its segment's namespace, and what leaves
    by a transit slot masqueraded. Replaces the table as a whole (`nft -f`: one transaction)."""
    dnat = [f"fib daddr type local {f.protocol} dport {f.host_port} dnat to {transit(slotted[vni])[1].ip}"
            for vni in sorted(kept) for f in sorted(kept[vni])]
    return _table({
        "prerouting": ("type nat hook prerouting priority dstnat;", dnat),
        "output": ("type nat hook output priority -100;", dnat),
        "postrouting": ("type nat hook postrouting priority srcnat;",
                        [f'ip saddr {LINK_LOCAL} oifname != "dvu*" masquerade']),
    })


def namespace_ruleset(nat: bool, kept: frozenset[Forward]) -> str:
    """A segment namespace's nftables table: forwards DNATed on to their VMs, the VMs masqueraded out of `up0`
    with `nat`, and nothing else forwarded."""
    forward = ["ct state established,related accept", f'iifname "{NAMESPACE_PORT}" ct status dnat accept']
    if nat:
        forward.append(f'iifname "eth0" oifname "{NAMESPACE_PORT}" accept')
    return _table({
        "prerouting": ("type nat hook prerouting priority dstnat;",
                       [f'iifname "{NAMESPACE_PORT}" {f.protocol} dport {f.host_port} dnat to {f.address}:{f.port}'
                        for f in sorted(kept)]),
        "postrouting": ("type nat hook postrouting priority srcnat;",
                        [f'oifname "{NAMESPACE_PORT}" masquerade'] if nat else []),
        "forward": ("type filter hook forward priority filter; policy drop;", forward),
    })


def _table(chains: Mapping[str, tuple[str, list[str]]]) -> str:
    """An `nft -f` script that replaces table ip TABLE with `chains` (name: (hook line, rules)) at once."""
    lines = [f"table ip {TABLE}", f"delete table ip {TABLE}", f"table ip {TABLE} {{"]
    for name, (hook, rules) in chains.items():
        lines += [f"  chain {name} {{", f"    {hook}", *(f"    {rule}" for rule in rules), "  }"]
    return "\n".join([*lines, "}", ""])


def link_commands(vni: int, slot: int, namespace: str) -> list[list[str]]:
    """The `ip` commands that make segment `vni`'s transit veth in `slot` into its gateway's `namespace`."""
    port, (host, inner) = uplink_port(vni), transit(slot)
    return [
        ["ip", "link", "add", port, "type", "veth", "peer", NAMESPACE_PORT, "netns", namespace],
        ["ip", "addr", "add", str(host), "dev", port],
        ["ip", "link", "set", port, "up"],
        ["ip", "-n", namespace, "addr", "add", str(inner), "dev", NAMESPACE_PORT],
        ["ip", "-n", namespace, "link", "set", NAMESPACE_PORT, "up"],
        ["ip", "-n", namespace, "route", "add", "default", "via", str(host.ip)],
        ["ip", "netns", "exec", namespace, "sysctl", "-qw", "net.ipv4.ip_forward=1"],
    ]


def held_slots(addresses: list[dict[str, object]]) -> dict[int, int]:
    """The transit slots the kernel holds, by VNI, from `ip -j addr show`: the `dvu` devices' addresses."""
    held = {}
    for link in addresses:
        vni = _vni(str(link.get("ifname", "")))
        infos = link.get("addr_info")
        for info in infos if vni is not None and isinstance(infos, list) else []:
            slot = slot_of(str(info.get("local"))) if isinstance(info, dict) and info.get("family") == "inet" else None
            if vni is not None and slot is not None:
                held[vni] = slot
    return held


def _vni(name: str) -> int | None:
    """The VNI of a transit veth named as `uplink_port` names them; None for any other name."""
    if len(name) != 9 or not name.startswith("dvu"):
        return None
    try:
        return int(name[3:], 16)
    except ValueError:
        return None
