"""The data plane's kernel side: read what this host's network namespace holds (`agents.network.plan.Seen`) and
run the plan's `ip`/`bridge` commands (iproute2's JSON output in, argv lists out; no shell).

`DataPlane.carry(segments, leases)` is the whole interface: after it returns, the kernel holds exactly those
segments (the plan is recomputed from what the kernel reports, so a device someone deleted or a host's restart
is repaired by the next call) and their DHCP servers hand out those leases (`agents.network.dhcp`). Calls are
serialised: two plans made from one reading would undo each other.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import trio

from agents.network.dhcp import DhcpError, DhcpServers, Leases
from agents.network.plan import Seen, Segment, plan, seen_from, vxlan_name

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

    async def carry(self, segments: Iterable[Segment], leases: Mapping[int, Leases] | None = None) -> int:
        """Make the kernel hold exactly `segments`, and serve `leases` (by VNI) on them; how many commands it took
        (0: the kernel held them already)."""
        async with self._lock:
            commands = plan(segments, await self.seen(), self.local, await self.underlay_mtu())
            for argv in commands:
                await self._run(argv, missing_ok="del" in argv[:3])  # gone already: as wanted
            if commands:
                log.info("data plane: %d commands", len(commands))
            if self.dhcp is not None:
                try:
                    await trio.to_thread.run_sync(self.dhcp.carry, dict(leases or {}))
                except DhcpError as err:
                    raise NetworkError(str(err)) from None
            return len(commands)

    def close(self) -> None:
        """End the DHCP servers (children of the agent): a stopped agent leaves none behind."""
        if self.dhcp is not None:
            self.dhcp.stop_all()

    async def seen(self) -> Seen:
        links = await self._json("ip", "-j", "-d", "link", "show")
        first = seen_from(links, {})
        fdb = {vni: await self._json("bridge", "-j", "fdb", "show", "dev", vxlan_name(vni))
               for vni, held in first.vxlans.items() if held is not None}
        return seen_from(links, fdb)

    async def underlay_mtu(self) -> int:
        """The MTU of the interface that holds `local` (1500 if none does: VXLAN's source is then unbound)."""
        for link in await self._json("ip", "-j", "addr", "show"):
            if any(a.get("local") == self.local for a in link.get("addr_info", [])):
                return int(link.get("mtu", 1500))
        return 1500

    async def _json(self, *argv: str) -> list[dict[str, Any]]:
        out = await self._run(list(argv))
        parsed = json.loads(out or "[]")
        return parsed if isinstance(parsed, list) else []

    async def _run(self, argv: list[str], missing_ok: bool = False) -> str:
        try:
            with trio.fail_after(TIMEOUT):
                done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
        except (OSError, trio.TooSlowError) as err:
            raise NetworkError(f"{' '.join(argv)}: {err}") from None
        if done.returncode != 0:
            why = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"exit {done.returncode}"]
            if missing_ok and ("Cannot find device" in why[0] or "No such file" in why[0]):
                return ""
            raise NetworkError(f"{' '.join(argv)}: {why[0]}")
        return done.stdout.decode(errors="replace")
