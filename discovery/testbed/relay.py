"""The router's delay line: every packet between two sites waits its one-way delay here (no netem in this kernel).

The router's policy rules (`plan.Plan.delay_rules`) send inter-site packets to the TUN device `plan.TUN`; this
process reads each one, holds it for half its sites' RTT, then writes it back to the TUN, where the router's
first rule routes it on to its destination. All IPv4 traffic between sites is delayed this way (TCP, UDP, ICMP);
traffic within a site and to or from the root namespace is not. Packets keep their order within a site pair (one
delay per pair, released in arrival order).

What became of the packets it read (forwarded, or dropped and why) is rewritten to COUNTS_JSON every COUNTS_EVERY
seconds, for `testbed status`; a failure to write it never stops the relay.

Run by `bed.up` inside the router namespace: `python -m discovery.testbed.relay STATE_JSON COUNTS_JSON`.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import heapq
import json
import os
import select
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from discovery.testbed.plan import TUN, Node, Plan

_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_PR_SET_TIMERSLACK = 29


HELD_LIMIT = 20_000
"""Packets held at most (about 30 MB of full frames, 2.4 s of 100 Mbit/s): past it the newest is dropped, as a
router's full queue would, instead of growing without bound when more arrives than the relay can send."""

COUNTS_FILE = "relay.json"
"""The relay's counts, in the testbed's directory beside its state."""
COUNTS_EVERY = 1.0
DROP_REASONS = ("queue_full", "refused")
"""Why the relay lost a packet it had read: HELD_LIMIT reached, or the TUN refused it back (e.g. its route gone)."""


@dataclass
class Counts:
    """What became of the packets the relay read: forwarded (written back to the TUN) or dropped, by reason."""

    forwarded: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))

    def save(self, path: Path, held: int, at: float) -> None:
        """Replace `path` whole (a reader never sees half a file)."""
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"forwarded": self.forwarded, "dropped": self.dropped, "held": held, "at": at}))
        os.replace(tmp, path)


def read_counts(path: Path) -> dict[str, Any] | None:
    """What `Counts.save` last wrote to `path` (None before the relay wrote it)."""
    try:
        counts: dict[str, Any] = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return counts


class DelayLine:
    """Sans-IO: packets in with their arrival time, packets out when their time has come."""

    def __init__(self, plan: Plan, limit: int = HELD_LIMIT) -> None:
        self._plan = plan
        self._limit = limit
        self.counts = Counts()
        self._held: list[tuple[float, int, bytes]] = []
        self._seq = 0
        self._delays: dict[tuple[bytes, bytes], float] = {}

    def push(self, packet: bytes, now: float) -> None:
        if len(self._held) >= self._limit:
            self.counts.dropped["queue_full"] += 1
            return
        if len(packet) < 20 or packet[0] >> 4 != 4:
            delay = 0.0  # not IPv4: nothing of ours, pass it on
        else:
            key = (packet[12:16], packet[16:20])
            delay = self._delays.get(key, -1.0)
            if delay < 0:
                delay = self._delays[key] = self._plan.one_way_s(*(".".join(map(str, k)) for k in key))
        self._seq += 1
        heapq.heappush(self._held, (now + delay, self._seq, packet))

    def due(self, now: float) -> list[bytes]:
        out = []
        while self._held and self._held[0][0] <= now:
            out.append(heapq.heappop(self._held)[2])
        return out

    def next_due(self) -> float | None:
        return self._held[0][0] if self._held else None

    def held(self) -> int:
        return len(self._held)


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TUN | _IFF_NO_PI))
    return fd


def plan_from_state(state: dict[str, Any]) -> Plan:
    p = state["plan"]
    return Plan(tuple(p["sites"]), tuple(tuple(r) for r in p["rtt_ms"]), p["bandwidth_mbit"],
                tuple(Node(**n) for n in p["nodes"]))


def forward(fd: int, packets: list[bytes], counts: Counts) -> None:
    for packet in packets:
        try:
            os.write(fd, packet)
        except OSError:  # refused (e.g. its route is gone): lost, as on a real link
            counts.dropped["refused"] += 1
        else:
            counts.forwarded += 1


def run(plan: Plan, fd: int, counts_path: Path) -> None:
    line = DelayLine(plan)
    save_at = time.monotonic()
    while True:
        now = time.monotonic()
        if now >= save_at:
            with contextlib.suppress(OSError):  # a full disk must not stop the testbed's traffic
                line.counts.save(counts_path, line.held(), time.time())
            save_at = now + COUNTS_EVERY
        nxt = line.next_due()
        wake = save_at if nxt is None else min(nxt, save_at)
        readable, _, _ = select.select([fd], [], [], max(0.0, wake - now))
        now = time.monotonic()
        if readable:
            for _ in range(256):  # drain a burst before releasing
                try:
                    line.push(os.read(fd, 65536), now)
                except BlockingIOError:
                    break
        forward(fd, line.due(time.monotonic()), line.counts)


def _prompt() -> None:
    """Wake on time: no timer slack (50 µs by default), and ahead of the agents when the machine is loaded (a
    real-time priority: the relay only waits for packets and timers, and the kernel's RT throttling keeps a core's
    5 % for the rest should it ever spin)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0)
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except OSError:
        with contextlib.suppress(OSError):
            os.nice(-10)


def main() -> None:
    plan = plan_from_state(json.loads(Path(sys.argv[1]).read_text()))
    _prompt()
    run(plan, open_tun(TUN), Path(sys.argv[2]))


if __name__ == "__main__":
    main()
