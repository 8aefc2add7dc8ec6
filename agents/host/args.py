"""The limits of `host.*` requests and the checks of their arguments, shared by `agents.host.service` and its mixins.

A host trusts no caller's arguments: names, counts, carried XML and snapshots are checked before anything
touches the ledger, SQLite or libvirt. The VE service checks a stop's timeout with the same function, so
both refuse the same values.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

from agents.hypervisor.actor import SETTLED
from overlay.wire.rpc import RequestError

RESERVATION_TTL = 10.0
MAX_XML = 64 * 1024
MAX_SNAPSHOTS = 64  # carried in one relocation message
SHUTDOWN_TIMEOUT = 30.0
"""How long `host.vm stop` waits for a guest to power off before forcing it, unless told (`timeout`)."""
MAX_SHUTDOWN_TIMEOUT = 600.0


def name_arg(args: dict[str, Any], field: str = "name") -> str:
    name = args.get(field)
    if not isinstance(name, str) or not 0 < len(name) <= 200 or "/" in name:
        raise RequestError(f"{field} must be a non-empty string without '/'")
    return name


def count_arg(args: dict[str, Any], field: str) -> int:
    value = args.get(field)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 2**31:
        raise RequestError(f"{field} must be a non-negative integer")
    return value


def xml_name(xml: str) -> str | None:
    try:
        return ET.fromstring(xml).findtext("name")
    except ET.ParseError:
        return None


def snapshots_arg(args: dict[str, Any]) -> list[tuple[str, str, str, float, str]]:
    """The snapshots a relocation carries: [tag, xml, state, taken, libvirt] each (libvirt: the internal
    snapshot's XML for REDEFINE, "" on the test driver; an older agent sends four fields)."""
    rows = args.get("snapshots") or []
    if not isinstance(rows, list) or len(rows) > MAX_SNAPSHOTS:
        raise RequestError(f"snapshots must be a list of at most {MAX_SNAPSHOTS}")
    checked = []
    for row in rows:
        if not (isinstance(row, list) and len(row) in (4, 5)):
            raise RequestError("each snapshot must be [tag, xml, state, taken, libvirt]")
        tag, xml, state, taken, internal = (*row, "")[:5]
        name_arg({"tag": tag}, "tag")
        if not (isinstance(xml, str) and len(xml) <= MAX_XML and state in SETTLED and isinstance(internal, str)
                and len(internal) <= 2 * MAX_XML and isinstance(taken, int | float) and not isinstance(taken, bool)):
            raise RequestError(f"snapshot {tag}: malformed")
        checked.append((tag, xml, state, float(taken), internal))
    return checked


def shutdown_timeout(args: dict[str, Any]) -> float:
    """`timeout` of a stop, in seconds: more than 0, at most MAX_SHUTDOWN_TIMEOUT (default SHUTDOWN_TIMEOUT)."""
    timeout = args.get("timeout", SHUTDOWN_TIMEOUT)
    if (not isinstance(timeout, int | float) or isinstance(timeout, bool)
            or not 0 < timeout <= MAX_SHUTDOWN_TIMEOUT):
        raise RequestError(f"timeout must be a number of seconds, more than 0 and at most {MAX_SHUTDOWN_TIMEOUT:g}")
    return float(timeout)
