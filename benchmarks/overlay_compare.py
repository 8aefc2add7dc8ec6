"""Chord vs Kademlia on a local cluster of real agent processes: record reads, latency and success under churn.

    python benchmarks/overlay_compare.py --nodes 64 --rtt-ms 4 [--churn-seconds 60] [--plot out.png]

Both overlays run in every agent (Chord's DHT with r = 3 replicas over mutual TLS; Kademlia, k = 20,
over UDP). The benchmark writes `--keys` records on each through random agents, then times reads of
random keys through random agents: first one at a time, alternating overlays, with every agent up;
then while agents are killed with SIGKILL and restarted (`--churn-every` seconds one is killed; each
comes back after `--downtime` seconds), with `--readers` concurrent readers per overlay, so both see
the same churn and a slow overlay does not reduce the other's sample. Latency is timed inside the agent that serves
the read (`overlay.get`), so the client's own connection set-up is not counted. A read *succeeds*
when it returns the value written; a read whose entry agent is killed while serving it is not
counted (`entry_agent_killed`), since no overlay could answer it.

`--rtt-ms R` gives every pair of agents an emulated RTT of R ms, for both overlays alike: the agents'
TLS transport delays each frame by R/2, and Kademlia each datagram it sends (one site, so the delay
is the same for every peer). This machine's kernel has no `netem`, so the delay is emulated in the
agents rather than on the wire.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
from stats import summary_ms

from discovery.cli import local_cluster as cluster
from overlay.wire import tls
from overlay.wire.rpc import RpcError, Transport

OVERLAYS = ("chord", "kademlia")


class Bench:
    def __init__(self, state: dict[str, Any], identity: tls.Identity, rng: random.Random) -> None:
        self.nodes = state["nodes"]
        self.identity = identity
        self.rng = rng
        self.down: dict[str, float] = {}  # node name -> when it was killed
        self.starting: dict[str, float] = {}  # node name -> when it was restarted, until it serves again
        self.values: dict[str, dict[str, int]] = {o: {} for o in OVERLAYS}
        self.samples: dict[str, dict[str, list[float]]] = {p: {o: [] for o in OVERLAYS} for p in ("steady", "churn")}
        self.failures: dict[str, dict[str, list[str]]] = {p: {o: [] for o in OVERLAYS} for p in ("steady", "churn")}
        self.kills = 0
        self.aborted = dict.fromkeys(OVERLAYS, 0)  # reads whose entry agent was killed while it served them

    def live(self) -> list[dict[str, Any]]:
        """Agents the client may ask: neither killed nor still starting (an agent writes agent.addr once
        it has joined, so a read never hits one that is not serving yet)."""
        for node in self.nodes:
            since = self.starting.get(node["name"])
            addr_file = Path(node["config"]).parent / "data" / "agent.addr"
            if since is not None and addr_file.exists() and addr_file.stat().st_mtime >= since:
                del self.starting[node["name"]]
        return [n for n in self.nodes if n["name"] not in self.down and n["name"] not in self.starting]

    async def call(self, transport: Transport, node: dict[str, Any], method: str, args: dict[str, Any]) -> Any:
        return await transport.call(node["addr"], method, args, timeout=30)

    async def settle(self, transport: Transport, timeout: float = 180.0) -> None:
        """Wait until every agent sees every member alive and knows Kademlia contacts."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                members = [await self.call(transport, n, "agent.members", {}) for n in self.live()]
                statuses = [await self.call(transport, n, "overlay.status", {}) for n in self.live()]
            except RpcError:
                await trio.sleep(2)
                continue
            alive = [sum(m["status"] == "alive" for m in table) for table in members]
            if min(alive) == len(self.nodes) and all((s["kademlia"] or {}).get("neighbours") for s in statuses):
                return
            await trio.sleep(2)
        raise SystemExit("the cluster did not settle")

    async def write(self, transport: Transport, keys: int) -> None:
        for overlay in OVERLAYS:
            for i in range(keys):
                key = f"bench-{i}"
                await self.call(transport, self.rng.choice(self.live()), "overlay.put",
                                {"key": key, "value": i, "overlay": overlay})
                self.values[overlay][key] = i

    async def read(self, transport: Transport, phase: str, overlay: str) -> None:
        key, value = self.rng.choice(sorted(self.values[overlay].items()))
        node = self.rng.choice(self.live())
        try:
            got = await self.call(transport, node, "overlay.get", {"key": key, "overlay": overlay})
        except RpcError as err:
            if node["name"] in self.down:  # the agent we asked was killed mid-read: the client's bad luck
                self.aborted[overlay] += 1
                return
            self.failures[phase][overlay].append(f"{node['name']}: {err}")
            return
        if got["found"] and got["value"] == value:
            self.samples[phase][overlay].append(got["ms"] / 1000)
        else:
            self.failures[phase][overlay].append(f"{node['name']}: {key} -> {got['value']!r}")

    def kill_one(self) -> None:
        victim = self.rng.choice(self.live()[3:] or self.live())
        os.kill(victim["pid"], signal.SIGKILL)
        self.down[victim["name"]] = time.monotonic()
        self.kills += 1

    def restart_due(self, downtime: float) -> None:
        for name, since in list(self.down.items()):
            if time.monotonic() - since >= downtime:
                node = next(n for n in self.nodes if n["name"] == name)
                with open(Path(node["config"]).parent / "agent.log", "ab") as log:
                    proc = subprocess.Popen([sys.executable, "-m", "discovery.agent", "--config",
                                             node["config"]], stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
                node["pid"] = proc.pid
                del self.down[name]
                self.starting[name] = time.time()

    async def run(self, args: argparse.Namespace) -> None:
        async with Transport(self.identity, node="bench") as transport:
            await self.settle(transport)
            await self.write(transport, args.keys)
            for _ in range(args.reads):
                for overlay in OVERLAYS:
                    await self.read(transport, "steady", overlay)
            end = time.monotonic() + args.churn_seconds
            async with trio.open_nursery() as nursery:
                for overlay in OVERLAYS:  # each overlay its own readers: a slow one does not starve the other
                    for _ in range(args.readers):
                        nursery.start_soon(self.read_until, transport, overlay, end)
                while time.monotonic() < end:
                    self.kill_one()
                    for _ in range(int(args.churn_every * 10)):
                        self.restart_due(args.downtime)
                        await trio.sleep(0.1)
            self.restart_due(0)

    async def read_until(self, transport: Transport, overlay: str, end: float) -> None:
        while time.monotonic() < end:
            await self.read(transport, "churn", overlay)


def report(bench: Bench, args: argparse.Namespace, elapsed: float) -> dict[str, Any]:
    phases: dict[str, dict[str, Any]] = {}
    for phase, by_overlay in bench.samples.items():
        phases[phase] = {}
        for overlay, samples in by_overlay.items():
            failed = bench.failures[phase][overlay]
            total = len(samples) + len(failed)
            phases[phase][overlay] = {"reads": total, "success": round(len(samples) / total, 4) if total else None,
                                      "latency_ms": summary_ms(samples), "failures": failed[:5]}
            if phase == "churn":
                phases[phase][overlay]["entry_agent_killed"] = bench.aborted[overlay]
    return {"benchmark": "overlay_compare", "nodes": args.nodes, "rtt_ms": args.rtt_ms, "keys": args.keys,
            "seed": args.seed, "churn": {"seconds": args.churn_seconds, "kill_every_s": args.churn_every,
                                         "downtime_s": args.downtime, "kills": bench.kills},
            "phases": phases, "wall_seconds": round(elapsed, 1)}


def plot(path: str, bench: Bench) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, phase in zip(axes, ("steady", "churn"), strict=True):
        for overlay in OVERLAYS:
            ms = sorted(s * 1000 for s in bench.samples[phase][overlay])
            if ms:
                ax.plot(ms, [(i + 1) / len(ms) for i in range(len(ms))], label=overlay)
        ax.set_xscale("log")
        ax.set_xlabel("read latency inside the agent (ms, log scale)")
        ax.set_title("all agents up" if phase == "steady" else "under churn (kill -9, restart)")
        ax.grid(True, alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("fraction of successful reads")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=64)
    parser.add_argument("--keys", type=int, default=200)
    parser.add_argument("--reads", type=int, default=500, help="reads per overlay with every agent up")
    parser.add_argument("--churn-seconds", type=float, default=60.0)
    parser.add_argument("--churn-every", type=float, default=5.0, help="seconds between two kills")
    parser.add_argument("--downtime", type=float, default=20.0, help="seconds a killed agent stays down")
    parser.add_argument("--readers", type=int, default=4, help="concurrent readers per overlay under churn")
    parser.add_argument("--rtt-ms", type=float, default=4.0, help="emulated RTT between any two agents")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--plot", help="write latency CDFs to this PNG")
    args = parser.parse_args()
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="discovery-bench-") as tmp:
        directory = Path(tmp)
        os.environ["DISCOVERY_HOME"] = str(directory / "home")  # leave the user's client config alone
        state = cluster.up(directory / "cluster", args.nodes, 1, local_rtt_ms=args.rtt_ms, wait=600)
        bench = Bench(state, tls.Identity(cert=directory / "cluster" / "operator.pem",
                                          key=directory / "cluster" / "operator.key",
                                          ca=directory / "cluster" / "ca" / "ca.pem"), random.Random(args.seed))
        try:
            trio.run(bench.run, args)
        finally:
            (directory / "cluster" / "cluster.json").write_text(json.dumps(state))  # restarted PIDs included
            cluster.down(directory / "cluster")
    result = report(bench, args, time.monotonic() - start)
    if args.plot:
        plot(args.plot, bench)
        result["plot"] = args.plot
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
