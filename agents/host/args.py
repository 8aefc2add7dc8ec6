"""The limits of `host.*` requests and the checks the codec cannot make, shared by the request types of
`agents.messages` (their `__post_init__`) and the host's handlers.

A host trusts no caller's arguments: names, counts, carried XML and snapshots are checked before anything
touches the ledger, SQLite or libvirt. The codec checks each field's type; these check the values (a name
without '/', a count in range, a timeout in bounds). The VE service's stop request checks its timeout with
the same function, so both refuse the same values in the same words.
"""

from __future__ import annotations

import ipaddress
import re
import xml.etree.ElementTree as ET
from typing import Any

from agents.hypervisor.actor import SETTLED
from agents.network.interfaces import Interface, Port
from overlay.wire.rpc import RequestError

_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
RESERVATION_TTL = 10.0
MAX_XML = 64 * 1024
MAX_SNAPSHOTS = 64  # carried in one relocation message
SHUTDOWN_TIMEOUT = 30.0
"""How long `host.vm stop` waits for a guest to power off before forcing it, unless told (`timeout`)."""
MAX_SHUTDOWN_TIMEOUT = 600.0
NAME = 200
"""Longest VM (domain) name, or snapshot tag, a host accepts."""
MAX_COUNT = 2**31
MAX_NICS = 8
"""Network interfaces of one VM (the VE spec's limit)."""
MAX_EXPOSED = 64
"""Ports forwarded to one NIC (the VE spec's limit for a whole VE)."""
VNI_BITS = 24
MAX_BANDWIDTH = 100_000 << 20
"""Bytes/s a mirror's throttle may allow at most (the HA policy's `bandwidth`, 100 000 MiB/s)."""


def check_name(value: str, field: str = "name") -> None:
    """A VM's name or a snapshot's tag: a path component of the host's files, so never '/' (the ledger's
    standby keys use it) and never empty."""
    if not value or "/" in value:
        raise RequestError(f"{field} must be a non-empty string without '/'")


def check_count(value: int, field: str) -> None:
    if not 0 <= value <= MAX_COUNT:
        raise RequestError(f"{field} must be a non-negative integer")


def check_state(value: str | None, field: str = "state") -> None:
    """A state a VM can be brought to and left in (None passes: the field is optional)."""
    if value is not None and value not in SETTLED:
        raise RequestError(f"{field} must be one of {', '.join(SETTLED)}")


def check_timeout(value: float) -> None:
    """`timeout` of a stop, in seconds: more than 0, at most MAX_SHUTDOWN_TIMEOUT."""
    if not 0 < value <= MAX_SHUTDOWN_TIMEOUT:
        raise RequestError(f"timeout must be a number of seconds, more than 0 and at most {MAX_SHUTDOWN_TIMEOUT:g}")


def nics_arg(rows: list[Any] | None) -> list[Interface]:
    """A new VM's NICs: [VNI, MAC, address/prefix] each, or [VNI, MAC, address/prefix, {"nat": bool, "expose":
    [[protocol, host port, port], ...]}] for one its host NATs out or forwards ports to; the VNI of 24 bits, the
    MAC a unicast one written as libvirt writes them (six lowercase hex pairs), the IPv4 address its host's DHCP
    server hands out with its subnet's prefix length. Rows are no type the codec has: their items are checked
    here."""
    checked = []
    for row in rows or []:
        if not (isinstance(row, list) and len(row) in (3, 4)):
            raise RequestError("each NIC must be [vni, mac, address/prefix] or [vni, mac, address/prefix, options]")
        vni, mac, address = row[:3]
        if isinstance(vni, bool) or not isinstance(vni, int) or not 1 <= vni < 1 << VNI_BITS:
            raise RequestError(f"a NIC's vni must be an integer from 1 to {(1 << VNI_BITS) - 1}, got {vni!r}")
        if not (isinstance(mac, str) and _MAC.fullmatch(mac) and not int(mac[:2], 16) & 1):
            raise RequestError(f"a NIC's mac must be a unicast MAC such as 02:00:5e:10:00:01, got {mac!r}")
        try:
            interface = ipaddress.IPv4Interface(address) if isinstance(address, str) and "/" in address else None
        except ValueError:
            interface = None
        net = interface.network if interface is not None else None
        if interface is None or net is None or interface.ip in (net.network_address, net.broadcast_address):
            raise RequestError(f"a NIC's address must be an IPv4 host address with its prefix such as 10.0.0.2/24, "
                               f"got {address!r}")
        nat, exposed = _outside(row[3] if len(row) == 4 else {})
        checked.append(Interface(vni, mac, str(interface), nat, exposed))
    return checked


def _outside(options: Any) -> tuple[bool, tuple[Port, ...]]:
    """A NIC's options: `nat` (a bool) and `expose` (at most MAX_EXPOSED [protocol, host port, port])."""
    if not isinstance(options, dict) or set(options) - {"nat", "expose"}:
        raise RequestError("a NIC's options must be a map of nat and expose")
    nat, rows = options.get("nat", False), options.get("expose", [])
    if not isinstance(nat, bool):
        raise RequestError(f"a NIC's nat must be true or false, got {nat!r}")
    if not isinstance(rows, list) or len(rows) > MAX_EXPOSED:
        raise RequestError(f"a NIC's expose must list at most {MAX_EXPOSED} [protocol, host port, port]")
    exposed = []
    for row in rows:
        if not (isinstance(row, list) and len(row) == 3 and row[0] in ("tcp", "udp")
                and all(not isinstance(p, bool) and isinstance(p, int) and 1 <= p <= 65535 for p in row[1:])):
            raise RequestError(f"each exposed port must be [tcp|udp, host port, port] with ports from 1 to 65535, "
                               f"got {row!r}")
        exposed.append(Port(*row))
    return nat, tuple(exposed)


def xml_name(xml: str) -> str | None:
    try:
        return ET.fromstring(xml).findtext("name")
    except ET.ParseError:
        return None


def snapshots_arg(rows: list[Any] | None) -> list[tuple[str, str, str, float, str]]:
    """The snapshots a relocation carries: [tag, xml, state, taken, libvirt] each (libvirt: the internal
    snapshot's XML for REDEFINE, "" on the test driver; an older agent sends four fields). A row of four or
    five items is no type the codec has, so its items are checked here."""
    checked = []
    for row in rows or []:
        if not (isinstance(row, list) and len(row) in (4, 5)):
            raise RequestError("each snapshot must be [tag, xml, state, taken, libvirt]")
        tag, xml, state, taken, internal = (*row, "")[:5]
        if not (isinstance(tag, str) and len(tag) <= NAME):
            raise RequestError("tag must be a non-empty string without '/'")
        check_name(tag, "tag")
        if not (isinstance(xml, str) and len(xml) <= MAX_XML and state in SETTLED and isinstance(internal, str)
                and len(internal) <= 2 * MAX_XML and isinstance(taken, int | float) and not isinstance(taken, bool)):
            raise RequestError(f"snapshot {tag}: malformed")
        checked.append((tag, xml, state, float(taken), internal))
    return checked
