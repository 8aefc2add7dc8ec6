"""Latency of `host.info` on one agent while four long operations run on that node, printed as JSON.

    python benchmarks/host_latency.py [--runs 3] [--hypervisor qemu] [--dir D] [--plot out.png]

Every `host.*` request to an agent goes through one node-wide mailbox (`agents.host.service.HostService`, an
`agents.runtime.Actor`), so a long operation on one VM holds up every other request to that host,
`host.info` included. This measures by how much. A 3-node, 1-site cluster (no emulated WAN delay;
`--hypervisor qemu`: a libvirtd per node and real tiny guests, 1 vCPU, 128 MiB) holds four one-VM VEs,
created on node1. Each run has four windows:

1. idle: `host.info` on node1 with nothing else going on (`--idle` seconds);
2. out: the four VEs relocated at once from node1 to node2 and node3, by live migration
   (`ve.relocate --method live`): node1's `host.migrate` drives each migration (~2 s alone under TCG);
3. idle again;
4. in: the four relocated back at once to node1 by save → ship → restore (`--method ship`): node1's
   `host.confirm` of each pulls the guest's memory image and disk from its source over RPC, then
   restores it (~3 s alone).

Each relocation is sent to the other node of the move (never node1, whose agent then does only host
work) and gets the CLI's timeout. A relocation that fails is part of the measure: it is counted and
reported with its error, and a VE it left away from node1 is brought back (untimed, one at a time)
before the next run.

While the four run, a prober calls `host.info` on node1 every `--interval` seconds, each call in its own
task with its own timer whether or not the earlier ones have answered, over one mutual-TLS connection of
`overlay.wire.rpc.Transport` (what the CLI's `discovery.cli.client.call` uses, without its new connection per
command). A call counts as under load if it was sent while at least one of the four ran. The idle
windows, between the loaded ones, see the same guests and machine load, without operations.

`--hypervisor test` runs the same moves on libvirt's test driver, where a relocation carries the VM's
XML in tens of milliseconds: no long operation, only a check that the benchmark works. The whole run is
bounded (`--budget`); the cluster, its daemons and guests are stopped whatever happens. Nothing here
asserts a time: it is a measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import trio
from harness import guest_dirs, local_cluster, pyplot, save, share_images, wait_ready  # beside this script
from stats import summary_ms

from agents.hypervisor.qemu import prepare_guest
from overlay.wire import tls
from overlay.wire.rpc import RpcError, Transport

GUESTS = 4
NODES = 3
MEMORY_MB = 128
MOVE_TIMEOUT = 600.0  # the CLI's `ve relocate`
PROBE_TIMEOUT = 120.0
METHODS = {"qemu": {"out": "live", "in": "ship"}, "test": {"out": "auto", "in": "auto"}}
WINDOWS = ("idle", "out", "idle", "in")


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of the four windows (idle, out, idle, in)")
    parser.add_argument("--hypervisor", choices=sorted(METHODS), default="qemu")
    parser.add_argument("--dir", type=Path, help="work here (cluster in DIR/cluster) instead of a temporary "
                                                 "directory; kept afterwards, its cluster stopped")
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between two host.info calls")
    parser.add_argument("--idle", type=float, default=3.0, help="seconds of each idle window")
    parser.add_argument("--budget", type=float, help="seconds the measurement may take (default 240 + 180 a run)")
    parser.add_argument("--plot", help="PNG: host.info latency over time, with the operations' spans")
    args = parser.parse_args()
    if args.runs < 1 or args.interval <= 0 or args.idle <= 0:
        parser.error("--runs, --interval and --idle must be positive")
    return args


class Bench:
    def __init__(self, state: dict[str, Any], identity: tls.Identity, args: argparse.Namespace) -> None:
        self.addr = {n["name"]: n["addr"] for n in state["nodes"]}
        self.probed, *self.others = list(self.addr)
        self.identity = identity
        self.hypervisor = args.hypervisor
        self.consoles = guest_dirs(state) if args.hypervisor == "qemu" else None
        self.interval, self.idle = args.interval, args.idle
        self.ves = [f"lat-{i}" for i in range(GUESTS)]
        self.where = dict.fromkeys(self.ves, self.probed)
        self.runs: list[list[dict[str, Any]]] = []  # per run, its windows

    async def setup(self, ops: Transport) -> None:
        """The four VEs, on node1 (placement puts a VE on the agent that creates it when it has room). With
        real guests, also one guest on each other node, destroyed once booted: a daemon's first QEMU costs
        it seconds (it probes QEMU's capabilities), which would land on the first run's first migrations."""
        warm = {f"warm-{node}": node for node in self.others} if self.consoles is not None else {}
        for ve, node in [(ve, self.probed) for ve in self.ves] + list(warm.items()):
            spec = {"name": ve, "vms": [{"name": "vm", "vcpus": 1, "memory_mb": MEMORY_MB, "disk_gb": 1}]}
            created = await ops.call(self.addr[node], "ve.create", {"spec": spec}, timeout=60.0)
            if created["placement"]["vm"]["node"] != node:
                raise SystemExit(f"{ve} was placed on {created['placement']['vm']['node']}, not {node}")
        if self.consoles is not None:
            for ve, node in [(ve, self.probed) for ve in self.ves] + list(warm.items()):
                await trio.to_thread.run_sync(wait_ready, self.consoles[node] / f"{ve}--vm.log")
        for ve, node in warm.items():
            await ops.call(self.addr[node], "ve.destroy", {"name": ve}, timeout=60.0)

    async def teardown(self) -> None:
        """Destroy the VEs, best effort (stopping the cluster ends their guests anyway)."""
        with trio.move_on_after(60.0) as scope:
            scope.shield = True
            async with Transport(self.identity, node="bench") as ops:
                for ve in self.ves:
                    with contextlib.suppress(RpcError):
                        await ops.call(self.addr[self.others[0]], "ve.destroy", {"name": ve}, timeout=30.0)

    async def measure(self, runs: int) -> None:
        async with Transport(self.identity, node="bench") as ops, Transport(self.identity, node="bench") as probe:
            await self.setup(ops)
            await probe.call(self.addr[self.probed], "host.info", {}, timeout=PROBE_TIMEOUT)  # connection open
            for _ in range(runs):
                await self.rehome(ops)
                origin = time.perf_counter()
                windows = []
                for kind in WINDOWS:
                    windows.append(await self.window(ops, probe, kind, origin))
                self.runs.append(windows)

    async def window(self, ops: Transport, probe: Transport, kind: str, origin: float) -> dict[str, Any]:
        """Probe node1 through one window: `idle` seconds of nothing, or the four moves of `kind` at once."""
        samples: list[tuple[float, float | None]] = []  # (sent, seconds or None: failed), from the run's origin
        errors: list[str] = []
        moves: list[dict[str, Any]] = []
        done = trio.Event()

        async def one() -> None:
            sent = time.perf_counter()
            try:
                await probe.call(self.addr[self.probed], "host.info", {}, timeout=PROBE_TIMEOUT)
            except RpcError as err:
                samples.append((sent - origin, None))
                errors.append(str(err))
                return
            samples.append((sent - origin, time.perf_counter() - sent))

        async def prober() -> None:
            async with trio.open_nursery() as calls:  # waits for the calls still out when `done` is set
                next_at = trio.current_time()
                while not done.is_set():
                    calls.start_soon(one)
                    next_at = max(next_at + self.interval, trio.current_time())  # late: on, but no burst
                    with trio.move_on_at(next_at):
                        await done.wait()

        start = time.perf_counter() - origin
        async with trio.open_nursery() as nursery:
            nursery.start_soon(prober)
            if kind == "idle":
                await trio.sleep(self.idle)
            else:
                async with trio.open_nursery() as moving:
                    for i, ve in enumerate(self.ves):
                        if (self.where[ve] == self.probed) == (kind == "out"):  # one whose move out failed stays
                            moving.start_soon(self.move, ops, ve, kind, i, origin, moves)
            done.set()
        if kind == "idle" or not moves:
            span = (start, start + self.idle if kind == "idle" else start)
        else:
            span = (min(m["start"] for m in moves), max(m["end"] for m in moves))
        return {"kind": kind, "span": span, "moves": sorted(moves, key=lambda m: m["start"]), "errors": errors,
                "samples": [(sent, s) for sent, s in sorted(samples) if span[0] <= sent <= span[1]]}

    async def rehome(self, ops: Transport) -> None:
        """Bring back to node1, one after the other and untimed, the VEs whose move in failed."""
        for ve in [ve for ve in self.ves if self.where[ve] != self.probed]:
            args = {"name": ve, "vm": "vm", "to": self.probed, "site": None, "method": "auto"}
            try:
                answer = await ops.call(self.addr[self.where[ve]], "ve.relocate", args, timeout=MOVE_TIMEOUT)
            except RpcError as err:
                raise SystemExit(f"cannot bring {ve} back to {self.probed}: {err}") from None
            self.where[ve] = answer["placement"]["vm"]["node"]
            await trio.sleep(1.0)

    async def move(self, ops: Transport, ve: str, kind: str, i: int, origin: float,
                   moves: list[dict[str, Any]]) -> None:
        source = self.where[ve]
        target = self.others[i % len(self.others)] if kind == "out" else self.probed
        via = target if kind == "out" else source  # the other node of the move: node1 only serves host.*
        args = {"name": ve, "vm": "vm", "to": target, "site": None, "method": METHODS[self.hypervisor][kind]}
        started = time.perf_counter()
        entry: dict[str, Any] = {"ve": ve, "from": source, "to": target, "via": via, "start": started - origin}
        try:
            answer = await ops.call(self.addr[via], "ve.relocate", args, timeout=MOVE_TIMEOUT)
        except RpcError as err:  # part of the measure: counted, and the VE is brought home before the next run
            moves.append({**entry, "end": time.perf_counter() - origin, "error": str(err)})
            return
        entry["end"] = time.perf_counter() - origin
        slot = answer["placement"]["vm"]
        # no `transfer`: a step failed and the coordinator's recovery finished the move (`Relocation._move`)
        moves.append({**entry, "how": slot["transfer"]["how"] if "transfer" in slot else "recovered"})
        self.where[ve] = slot["node"]


def latency(windows: list[dict[str, Any]]) -> dict[str, Any]:
    seconds = [s for w in windows for _, s in w["samples"] if s is not None]
    return {"samples": len(seconds), "errors": sum(len(w["errors"]) for w in windows), **summary_ms(seconds)}


def report(bench: Bench, args: argparse.Namespace, accel: str | None, elapsed: float,
           load: tuple[float, ...]) -> dict[str, Any]:
    windows = [w for run in bench.runs for w in run]
    by_kind = {kind: [w for w in windows if w["kind"] == kind] for kind in ("idle", "out", "in")}
    operations = {}
    for kind in ("out", "in"):
        moves = [m for w in by_kind[kind] for m in w["moves"] if "error" not in m]
        failed = [f"{m['ve']} {m['from']} -> {m['to']}: {m['error']}" for w in by_kind[kind] for m in w["moves"]
                  if "error" in m]
        what = (f"{GUESTS} relocations at once, node1 -> node2/node3" if kind == "out"
                else f"{GUESTS} relocations at once, node2/node3 -> node1")
        operations[kind] = {"what": f"{what}, method {METHODS[args.hypervisor][kind]}",
                            "how": dict(sorted(Counter(m["how"] for m in moves).items())),
                            "count": len(moves) + len(failed),
                            "failed": len(failed), "failures": failed,
                            "each_ms": summary_ms([m["end"] - m["start"] for m in moves]),
                            "window_ms": summary_ms([w["span"][1] - w["span"][0] for w in by_kind[kind]])}
    per_run = []
    for run in bench.runs:
        entry: dict[str, Any] = {"idle": latency([w for w in run if w["kind"] == "idle"])}
        for w in run:
            if w["kind"] != "idle":
                entry[w["kind"]] = {"host_info_ms": latency([w]),
                                    "window_ms": round((w["span"][1] - w["span"][0]) * 1000),
                                    "moves_ms": [round((m["end"] - m["start"]) * 1000) for m in w["moves"]],
                                    "failed": sum("error" in m for m in w["moves"])}
        per_run.append(entry)
    return {
        "benchmark": "host_latency",
        "hypervisor": args.hypervisor, "accel": accel, "nodes": NODES, "sites": 1, "probed": bench.probed,
        "guests": {"count": GUESTS, "vcpus": 1, "memory_mb": MEMORY_MB},
        "runs": args.runs, "interval_ms": args.interval * 1000, "idle_seconds_per_window": args.idle,
        "host_info_ms": {kind: latency(ws) for kind, ws in by_kind.items()},
        "operations": operations, "per_run": per_run, "wall_seconds": round(elapsed, 1),
        "load_average_1min": {"before": round(load[0], 2), "after": round(os.getloadavg()[0], 2)},
    }


def plot(bench: Bench, path: str, title: str) -> None:
    plt = pyplot()
    runs = len(bench.runs)
    fig, axes = plt.subplots(2 * runs, 1, figsize=(10, 3.4 * runs + 0.6), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1] * runs})
    colours = {"idle": "tab:green", "out": "tab:red", "in": "tab:blue"}
    labels = {"idle": "idle", "out": f"while {GUESTS} VMs leave node1 ({METHODS[bench.hypervisor]['out']})",
              "in": f"while {GUESTS} VMs come into node1 ({METHODS[bench.hypervisor]['in']})"}
    for r, run in enumerate(bench.runs):
        ax, spans = axes[2 * r, 0], axes[2 * r + 1, 0]
        spans.sharex(ax)
        shown = set()
        for w in run:
            points = [(sent, s * 1000) for sent, s in w["samples"] if s is not None]
            if points:
                label = labels[w["kind"]] if w["kind"] not in shown else None
                shown.add(w["kind"])
                ax.scatter(*zip(*points, strict=True), s=4, color=colours[w["kind"]], label=label)
            for k, m in enumerate(w["moves"]):
                spans.plot([m["start"], m["end"]], [k, k], color=colours[w["kind"]], lw=4, solid_capstyle="butt",
                           alpha=0.3 if "error" in m else 1.0)
                if "error" in m:
                    spans.annotate("failed", (m["end"], k), xytext=(3, 0), textcoords="offset points", fontsize=6,
                                   va="center")
        ax.set_yscale("log")
        ax.set_ylabel("host.info (ms)")
        ax.set_title(f"run {r + 1}" if r else f"{title}\nrun 1", fontsize=10, pad=20 if r == 0 else 6)
        ax.grid(True, axis="y", alpha=0.3)
        ax.tick_params(labelbottom=False)
        if r == 0:  # above the first run's axes, clear of the dots
            ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize=8, markerscale=3, frameon=False)
        spans.set_yticks(range(GUESTS), [f"VM {k + 1}" for k in range(GUESTS)], fontsize=7)
        spans.set_ylim(-0.7, GUESTS - 0.3)
        spans.invert_yaxis()
        spans.set_ylabel("moves", fontsize=8)
    axes[-1, 0].set_xlabel("seconds since the run began (dots: each host.info by the time it was sent)")
    save(fig, path)


def main() -> None:
    args = parse()
    budget = args.budget or 240.0 + 180.0 * args.runs
    with tempfile.TemporaryDirectory(prefix="discovery-hostlat-") as tmp:
        directory = (args.dir or Path(tmp)).resolve()
        if args.hypervisor == "qemu":
            share_images(directory)
        with local_cluster(directory, NODES, 1, hypervisor=args.hypervisor) as (state, identity):
            accel = prepare_guest()[1] if args.hypervisor == "qemu" else None
            bench = Bench(state, identity, args)

            async def bounded() -> None:
                try:
                    with trio.fail_after(budget):
                        await bench.measure(args.runs)
                except trio.TooSlowError:
                    raise SystemExit(f"not done within {budget:g} s; the cluster is being stopped") from None
                finally:
                    await bench.teardown()

            start, load = time.perf_counter(), os.getloadavg()
            trio.run(bounded)
            elapsed = time.perf_counter() - start
    result = report(bench, args, accel, elapsed, load)
    if args.plot:
        plot(bench, args.plot, f"host.info on node1 every {args.interval * 1000:g} ms, {GUESTS} guests, "
                               f"{args.hypervisor} ({'TCG' if accel == 'qemu' else accel or 'test driver'})")
        result["plot"] = args.plot
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
