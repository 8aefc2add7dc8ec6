"""What continuous replication costs a guest that writes: its write rate, its heartbeat rate, the bytes sent
and the lag, without a mirror and with each replication mode, printed as JSON.

    python benchmarks/replication_cost.py [--seconds 20] [--modes off,async,sync,async@2] [--max-lag 5]
                                          [--plot out.png]

Each mode boots the tiny guest (real QEMU through libvirt's embedded driver, KVM or TCG as the machine allows)
with `discovery.load` on its command line: beside its heartbeat (a sector a second, fsync'd), it then writes
1 MiB of random data at a time, fsync'd, over a 15 MiB stretch of its disk, and prints `LOAD <n>` after each.
Then, but for `off`, its disk is mirrored as a standby VM's is (`agents.hypervisor.mirror`, through the
agent's own `Hypervisor`) into a fresh overlay exported by qemu-nbd (`agents.host.nbd`, the agent's exports)
on loopback: `async`, `sync` (write-blocking), or `async@N` (throttled to N MiB/s). Once the mirror is ready
(or at once, for `off`), the guest's LOAD and HEARTBEAT lines are counted for `--seconds`, while the job is
sampled every 0.5 s (`agents.host.mirror_lag`: the lag bound the agent shows), the guest's writes held back
past `--max-lag` as the agents' shell does (`hold_back`). Then the guest is paused, the
job left to catch up, ended as the agent ends one, and the mirror file compared with the disk (`qemu-img
compare`: the copy must be identical).

Loopback has no network delay: `sync` pays a local round trip per write here, a WAN's RTT elsewhere. Nothing
here asserts a speed: it is a measurement.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import trio
from harness import pyplot, save, wait_ready  # beside this script
from stats import percentile

from agents.host.mirror_lag import MirrorLag, hold_back
from agents.host.nbd import NbdExports
from agents.hypervisor.actor import Hypervisor
from agents.hypervisor.qemu import prepare_guest
from agents.hypervisor.qemu_xml import domain_xml
from images import tinyguest

POLL = 0.5
DRAIN_LIMIT = 120.0
"""Seconds the mirror of a paused guest has to catch up before it is ended and compared."""
DISK = 64 << 20
LOAD_FLAG = "discovery.load"


def mode_of(text: str) -> tuple[str, int]:
    """`async@2` → ("async", 2 MiB/s); `sync` → ("sync", 0)."""
    name, _, rate = text.partition("@")
    if name not in ("off", "async", "sync") or (rate and not rate.isdigit()):
        raise argparse.ArgumentTypeError(f"a mode is off, async, sync or async@MiB/s, got {text!r}")
    return name, int(rate or 0)


def counts(console: Path) -> tuple[int, int]:
    """LOAD and HEARTBEAT lines printed so far."""
    text = console.read_text(errors="replace") if console.exists() else ""
    return len(re.findall(r"^LOAD \d+", text, re.M)), len(re.findall(r"^HEARTBEAT \d+", text, re.M))


async def measure_all(work: Path, modes: list[tuple[str, int]], seconds: float,
                      max_lag: float) -> list[dict[str, Any]]:
    """Each mode in turn, on one embedded driver (libvirt allows one per process)."""
    hypervisor = await Hypervisor.connect(f"qemu:///embed?root={work / 'embed'}")
    try:
        runs = []
        for mode, rate in modes:
            runs.append(await measure(hypervisor, work / f"{mode}-{rate}", mode, rate, seconds, max_lag))
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
        return runs
    finally:
        await hypervisor.close()


async def measure(hypervisor: Hypervisor, root: Path, mode: str, rate: int, seconds: float,
                  max_lag: float) -> dict[str, Any]:
    guest, accel, _ = prepare_guest()
    guest = replace(guest, cmdline=f"{guest.cmdline} {LOAD_FLAG}")
    root.mkdir(parents=True)
    disk = tinyguest.make_overlay(guest.base, root / "vm.qcow2", size=DISK)
    console = root / "vm.log"
    exports = NbdExports(root / "nbd")
    try:
        await hypervisor.define(domain_xml("vm", guest, disk, console, accel=accel, memory_mib=128))
        await hypervisor.start("vm")
        await trio.to_thread.run_sync(wait_ready, console)
        lag, lags, job = MirrorLag(trio.current_time()), [], None
        mirror = tinyguest.make_overlay(guest.base, root / "mirror.qcow2", size=DISK)
        if mode != "off":
            export = await trio.to_thread.run_sync(exports.start, "vm", mirror, "127.0.0.1", rate << 20)
            await hypervisor.mirror_begin("vm", export.host, export.port, export.name, mode == "sync")
            while not (job := await hypervisor.mirror_job("vm")) or not job.ready:
                await trio.sleep(POLL)
            lag = MirrorLag(trio.current_time())
            first = job.cur
        loads0, beats0 = counts(console)
        start = trio.current_time()
        held, holds = 0, 0
        while (now := trio.current_time()) - start < seconds:
            if mode != "off" and (job := await hypervisor.mirror_job("vm")) is not None:
                lag.sample(now, job.cur - first, job.end - first)
                lags.append(lag.lag(now))
                cap = hold_back(lag.lag(now), max_lag, lag.copy_rate(), held)  # as the agent's shell does
                if cap is not None:
                    await hypervisor.mirror_limit_writes("vm", cap)
                    held, holds = cap, holds + (cap > 0)
            await trio.sleep(POLL)
        elapsed = trio.current_time() - start
        loads, beats = counts(console)
        sent = lag.cur
        identical = None
        if mode != "off":  # the guest paused, the job drains what is dirty; then the copy is the disk
            await hypervisor.suspend("vm")
            with trio.move_on_after(DRAIN_LIMIT):
                while (job := await hypervisor.mirror_job("vm")) is not None and job.cur < job.end:
                    await trio.sleep(POLL)
            await hypervisor.mirror_end("vm")
            await trio.to_thread.run_sync(exports.stop, "vm")
            identical = subprocess.run(["qemu-img", "compare", "-U", "-q", str(disk), str(mirror)]).returncode == 0
        written = (loads - loads0) << 20
        return {"mode": mode, "bandwidth_mib_s": rate or None, "seconds": round(elapsed, 1),
                "written_mib_s": round(written / elapsed / (1 << 20), 2),
                "heartbeats_per_s": round((beats - beats0) / elapsed, 2),
                "sent_bytes": sent, "sent_per_written": round(sent / written, 2) if written and mode != "off" else None,
                "lag_s": ({"p50": percentile(lags, 50), "p95": percentile(lags, 95), "max": max(lags)}
                          if lags else None),
                "times_held_back": holds if mode != "off" else None, "identical_after_end": identical}
    finally:
        await trio.to_thread.run_sync(exports.stop_all)
        await hypervisor.destroy("vm")
        await hypervisor.undefine("vm")


def plot(path: str, result: dict[str, Any]) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [r["mode"] + (f"@{r['bandwidth_mib_s']}" if r["bandwidth_mib_s"] else "") for r in result["runs"]]
    ax.bar(labels, [r["written_mib_s"] for r in result["runs"]])
    ax.set_ylabel("guest writes (MiB/s, fsync'd)")
    ax.set_title(f"Continuous replication's cost to a writing guest ({result['accel']})")
    ax.grid(alpha=0.3, axis="y")
    save(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--modes", default="off,async,sync,async@2",
                        type=lambda text: [mode_of(m) for m in text.split(",")])
    parser.add_argument("--max-lag", type=float, default=5.0, help="the policy's max_lag: a mirror further behind "
                        "holds the guest's writes back, as the agents do")
    parser.add_argument("--plot", help="write a bar chart of the guest's write rate per mode to this PNG")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="replication-") as work:
        runs = trio.run(measure_all, Path(work), args.modes, args.seconds, args.max_lag)
    result = {"benchmark": "replication_cost", "accel": prepare_guest()[1], "runs": runs}
    print(json.dumps(result, indent=2))
    if args.plot:
        plot(args.plot, result)


if __name__ == "__main__":
    main()
