"""The data plane's kernel side: read what this host's network namespace holds (`agents.network.plan.Seen`) and
run the plan's `ip`/`bridge` commands (iproute2's JSON output in, argv lists out; no shell).

`DataPlane.carry(segments, leases, uplinks)` is the whole interface: after it returns, the kernel holds exactly
those segments (the plan is recomputed from what the kernel reports, so a device someone deleted or a host's
restart is repaired by the next call), their DHCP servers hand out those leases (`agents.network.dhcp`), and
their ways out and in are made (`agents.network.uplink`: transit veths, the namespaces' and this host's
nftables tables, IPv4 forwarding turned on in both, as Docker does on its hosts). A ruleset is loaded when it
differs from the one this process loaded last (nftables cannot say cheaply whether a table equals a script),
so a table someone flushed by hand comes back with the agent's restart. Calls are serialised: two plans made
from one reading would undo each other.
"""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Iterable, Mapping
from typing import Any

import trio

from agents.network.dhcp import DhcpError, DhcpServers, Leases, namespace
from agents.network.plan import Seen, Segment, plan, seen_from, vxlan_name
from agents.network.uplink import (
    TABLE,
    Uplink,
    forwards,
    held_slots,
    host_ruleset,
    link_commands,
    namespace_ruleset,
    slots,
    uplink_port,
)

log = logging.getLogger(__name__)
TIMEOUT = 10.0
"""Seconds one `ip` or `bridge` command may take."""


class NetworkError(Exception):
    """A command of the data plane failed; one line: the command and iproute2's own words."""


class DataPlane:
    """The VE networks' devices in this namespace; `local` is this host's underlay address (VXLAN's source);
    `dhcp`, the segments' DHCP servers (None: no DHCP)."""

    def __init__(self, local: str, dhcp: DhcpServers | None = None) -> None:
        self.local, self.dhcp = local, dhcp
        self._lock = trio.Lock()
        self._loaded: dict[int | None, str] = {}
        """The nftables script last loaded, by VNI (None: this host's own table)."""

    async def carry(self, segments: Iterable[Segment], leases: Mapping[int, Leases] | None = None,
                    uplinks: Mapping[int, Uplink] | None = None) -> int:
        """Make the kernel hold exactly `segments`, serve `leases` (by VNI) on them and give them `uplinks`; how
        many commands the segments took (0: the kernel held them already)."""
        async with self._lock:
            addresses = await self._json("ip", "-j", "addr", "show")
            commands = plan(segments, await self.seen(), self.local, _mtu_of(addresses, self.local))
            for argv in commands:
                await self._run(argv, missing_ok="del" in argv[:3])  # gone already: as wanted
            if commands:
                log.info("data plane: %d commands", len(commands))
            if self.dhcp is not None:
                try:
                    await trio.to_thread.run_sync(self.dhcp.carry, dict(leases or {}))
                except DhcpError as err:
                    raise NetworkError(str(err)) from None
                wanted = {vni: u for vni, u in (uplinks or {}).items() if vni in (leases or {})}
                if wanted or held_slots(addresses) or self._loaded:  # else nothing to make or undo
                    await self._outside(wanted, self.dhcp.tag)
            return len(commands)

    async def _outside(self, uplinks: Mapping[int, Uplink], tag: str) -> None:
        """Give the segments of `uplinks` (each with its gateway's namespace, made by the DHCP servers) their
        transit veths and rulesets, and take them from the others (`agents.network.uplink`). The kernel is read
        again: a namespace the DHCP servers just made again took its veth with it."""
        held = held_slots(await self._json("ip", "-j", "addr", "show"))
        slotted = slots(uplinks, held)
        for vni in sorted(set(held) - set(uplinks)):
            await self._run(["ip", "link", "del", uplink_port(vni)], missing_ok=True)  # its peer goes with it
            if self._loaded.pop(vni, None) is not None:
                await self._run(["ip", "netns", "exec", namespace(vni, tag), "nft", "delete", "table", "ip", TABLE],
                                missing_ok=True)
        for vni, slot in slotted.items():
            if held.get(vni) != slot:
                if vni in held:
                    await self._run(["ip", "link", "del", uplink_port(vni)], missing_ok=True)
                for argv in link_commands(vni, slot, namespace(vni, tag)):
                    await self._run(argv)
                self._loaded.pop(vni, None)
        kept, dropped = forwards(uplinks)
        for vni, uplink in sorted(uplinks.items()):
            await self._load(vni, namespace_ruleset(uplink.nat, kept[vni]), "ip", "netns", "exec", namespace(vni, tag))
        script = host_ruleset(kept, slotted)
        if uplinks and self._loaded.get(None) != script:
            await self._run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
            await self._load(None, script)
            for vni, forward in dropped:
                log.warning("data plane: host port %d/%s is taken here; not forwarded to %s:%d (VNI %d)",
                            forward.host_port, forward.protocol, forward.address, forward.port, vni)
        elif not uplinks and self._loaded.pop(None, None) is not None:
            await self._run(["nft", "delete", "table", "ip", TABLE], missing_ok=True)

    async def _load(self, key: int | None, script: str, *prefix: str) -> None:
        """Load nftables `script` (run under `prefix`, e.g. in a namespace) unless it was the last loaded for
        `key`."""
        if self._loaded.get(key) != script:
            await self._run([*prefix, "nft", "-f", "-"], stdin=script.encode())
            self._loaded[key] = script

    def close(self) -> None:
        """End the DHCP servers (children of the agent) and with them their namespaces and transit veths: a
        stopped agent leaves none behind, nor this host's forwarded ports."""
        if self.dhcp is not None:
            self.dhcp.stop_all()
        if self._loaded.pop(None, None) is not None:
            subprocess.run(["nft", "delete", "table", "ip", TABLE], capture_output=True, timeout=TIMEOUT, check=False)
        self._loaded.clear()

    async def seen(self) -> Seen:
        """What the kernel holds, in two reads whatever the number of segments (every link, every forwarding
        entry): the periodic pass costs the same with one segment or thirty."""
        links = await self._json("ip", "-j", "-d", "link", "show")
        devices = {vxlan_name(vni): vni for vni, held in seen_from(links, {}).vxlans.items() if held is not None}
        fdb: dict[int, list[dict[str, Any]]] = {vni: [] for vni in devices.values()}
        for row in await self._json("bridge", "-j", "fdb", "show") if devices else []:
            if (vni := devices.get(str(row.get("ifname")))) is not None:
                fdb[vni].append(row)
        return seen_from(links, fdb)

    async def underlay_mtu(self) -> int:
        """The MTU of the interface that holds `local` (1500 if none does: VXLAN's source is then unbound)."""
        return _mtu_of(await self._json("ip", "-j", "addr", "show"), self.local)

    async def _json(self, *argv: str) -> list[dict[str, Any]]:
        out = await self._run(list(argv))
        parsed = json.loads(out or "[]")
        return parsed if isinstance(parsed, list) else []

    async def _run(self, argv: list[str], missing_ok: bool = False, stdin: bytes = b"") -> str:
        try:
            with trio.fail_after(TIMEOUT):
                done = await trio.run_process(argv, stdin=stdin, capture_stdout=True, capture_stderr=True,
                                              check=False)
        except (OSError, trio.TooSlowError) as err:
            raise NetworkError(f"{' '.join(argv)}: {err}") from None
        if done.returncode != 0:
            why = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"exit {done.returncode}"]
            if missing_ok and any(gone in why[0] for gone in ("Cannot find device", "No such file", "Cannot open")):
                return ""
            raise NetworkError(f"{' '.join(argv)}: {why[0]}")
        return done.stdout.decode(errors="replace")


def _mtu_of(addresses: list[dict[str, Any]], local: str) -> int:
    """The MTU of the interface that holds `local` in `ip -j addr show`'s output; 1500 if none does."""
    for link in addresses:
        if any(a.get("local") == local for a in link.get("addr_info", [])):
            return int(link.get("mtu", 1500))
    return 1500
