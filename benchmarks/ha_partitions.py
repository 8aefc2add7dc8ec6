"""Randomised partitions on the network-namespace testbed: double runs and recoveries per failure, on real agents.

    sudo python benchmarks/ha_partitions.py [--trials 100] [--nodes 6] [--sites 3] [--ves 3] [--seed 1]
                                            [--plot out.png]

The testbed (`discovery testbed up`, libvirt test:///, 10 ms between sites) runs `--ves` one-VM VEs with HA
policy `restart`, each created through another node. Each trial draws a fault, cuts at the router for 3 to 25
seconds (`testbed partition`), heals, and waits until every VE runs exactly once again with nothing under way:

- `isolate`: a host of a VE cut off both ways; `oneway`: only what such a host sends is lost (it still hears
  the others: it keeps learning it is suspected, and cannot answer); `site`: a whole site cut off both ways;
  `flap`: a host cut and healed every other second.

Double runs are looked for by a poller per node, started inside the node's namespace (so it sees its agent
whatever the partition): it asks its agent for `host.info` every POLL seconds and writes down, with the
machine's clock, which VMs run there. A VM seen running on two nodes in overlapping stretches (from its first
to its last sample running in each) is a double run; one that may have (up to the first sample each was seen
not running: a busy agent's answers may be seconds apart) is reported apart; an overlap shorter than POLL
would be missed. A
recovery is a VE's VM started on another node than its host's before the cut; recoveries per failure are
counted per VE whose host was cut off in the trial (0 for a cut shorter than detection and the lease's term,
at most 1 for any). A VE not running once 120 s after the heal is *left down* (a liveness failure, listed in
`left_down`); the campaign repairs it as an operator would (`ve rebuild --force`) and goes on. Nothing here
asserts a result: it is a measurement; the exit status is 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import trio
from harness import pyplot, save, testbed  # benchmarks/, beside this

from discovery.cli.config import load_client_config
from discovery.testbed import bed
from overlay.wire import tls
from overlay.wire.rpc import RpcError, Transport

POLL = 0.1
KINDS = ("isolate", "oneway", "site", "flap")
SETTLE = 120.0
"""Seconds a trial waits, after healing, for every VE to run once again."""


def poll(addr: str, config: str, out: str) -> None:
    """The poller (run inside a node's namespace): what runs on the agent at `addr`, one JSON line per change."""
    identity = load_client_config(config).identity

    async def run() -> None:
        last, written = None, 0.0
        async with Transport(identity, node="poller") as transport:
            with open(out, "a") as sink:
                while True:
                    try:
                        info = await transport.call(addr, "host.info", {}, timeout=1.0)
                        running = sorted(d["name"] for d in info["domains"] if d["state"] == "running")
                    except RpcError:
                        running = None  # unknown: neither running nor not
                    now = time.time()
                    if running != last or now - written >= 1.0:  # a line a second at least: gaps show
                        sink.write(json.dumps({"t": now, "running": running}) + "\n")
                        sink.flush()
                        last, written = running, now
                    await trio.sleep(POLL)

    trio.run(run)


class Campaign:
    def __init__(self, state: dict[str, Any], identity: tls.Identity, directory: Path,
                 args: argparse.Namespace) -> None:
        self.state, self.identity, self.dir, self.args = state, identity, directory, args
        self.rng = random.Random(args.seed)
        self.nodes = {n["name"]: n for n in state["nodes"]}
        plan = json.loads((directory / "testbed.json").read_text())["plan"]
        self.namespace = {n["name"]: n["namespace"] for n in plan["nodes"]}
        self.site = {n["name"]: plan["sites"][n["site"]] for n in plan["nodes"]}
        self.ves = [f"part{i}" for i in range(args.ves)]
        self.trials: list[dict[str, Any]] = []
        self.pollers: list[subprocess.Popen[bytes]] = []

    def cli(self, *args: str) -> Any:
        done = subprocess.run([sys.executable, "-m", "discovery", "--config", self.state["client_config"], *args,
                               "--json"], capture_output=True, text=True, timeout=120)
        return json.loads(done.stdout) if done.returncode == 0 else None

    def start_pollers(self) -> None:
        for name, node in self.nodes.items():
            out = self.dir / f"poll-{name}.jsonl"
            self.pollers.append(subprocess.Popen(
                ["ip", "netns", "exec", self.namespace[name], sys.executable, __file__, "--poll", node["addr"],
                 "--config", self.state["client_config"], "--out", str(out)], start_new_session=True))

    def stop_pollers(self) -> None:
        for proc in self.pollers:
            proc.terminate()
            proc.wait(timeout=10)

    def where(self) -> dict[str, tuple[str, bool]] | None:
        """VE -> (its VM's node, settled: running there, nothing under way), through any node that answers."""
        return trio.run(self._where)

    async def _where(self) -> dict[str, tuple[str, bool]] | None:
        found = {}
        async with Transport(self.identity, node="bench") as transport:
            for ve in self.ves:
                for node in self.nodes.values():
                    try:
                        shown = await transport.call(node["addr"], "ve.show", {"name": ve}, timeout=5)
                        break
                    except RpcError:
                        continue
                else:
                    return None
                slot = shown["placement"]["a"]
                settled = slot.get("domain_state") == "running" and not any(
                    k in slot for k in ("moving_to", "failing_over", "rebuilding"))
                found[ve] = (slot["node"], settled)
        return found

    def create(self) -> None:
        names = sorted(self.nodes)
        for i, ve in enumerate(self.ves):
            spec = self.dir / f"{ve}.yaml"
            spec.write_text(f"name: {ve}\nvms:\n  - {{name: a, vcpus: 1, memory_mb: 256}}\nha: {{mode: restart}}\n")
            via = names[(2 * i) % len(names)]
            if self.cli("--agent", via, "ve", "create", str(spec)) is None:
                raise SystemExit(f"cannot create {ve} through {via}")

    def settle(self, repair: bool = True) -> tuple[dict[str, tuple[str, bool]], float, list[str]]:
        """Wait until every VE runs once again with nothing under way; half-way through the wait, have every agent
        log what its tasks await (SIGUSR1, `agents.tasks`), for the post-mortem of one that never does. VEs left
        unsettled after SETTLE seconds are repaired as an operator would (`ve rebuild --force`), once: the third
        value names them (a liveness failure, counted), and the campaign goes on."""
        start, dumped = time.monotonic(), False
        while time.monotonic() - start < SETTLE:
            found = self.where()
            if found and all(settled for _, settled in found.values()):
                return found, time.monotonic() - start, []
            if not dumped and time.monotonic() - start > SETTLE / 2:
                for node in self.nodes.values():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(node["pid"], signal.SIGUSR1)
                dumped = True
            time.sleep(0.5)
        found = self.where() or {}
        left = [ve for ve in self.ves if not found.get(ve, ("", False))[1]]
        if not repair:
            raise SystemExit(f"the VEs did not settle within {SETTLE:g} s even after a repair: {found}; the agents' "
                             f"tasks are in their logs under {self.dir}")
        print(f"left down: {left} ({found}); repairing with ve rebuild --force", file=sys.stderr, flush=True)
        for ve in left:
            for node in sorted(self.nodes):
                if self.cli("--agent", node, "ve", "rebuild", ve, "--force") is not None:
                    break
        found, _, _ = self.settle(repair=False)
        return found, time.monotonic() - start, left

    def trial(self, i: int) -> dict[str, Any]:
        before, _, _ = self.settle()
        kind = self.rng.choice(KINDS)
        hosts = sorted({node for node, _ in before.values()})
        host = self.rng.choice(hosts)
        target = self.site[host] if kind == "site" else host
        lasts = round(self.rng.uniform(3, 25), 1)
        cut = {n for n in self.nodes if self.site[n] == target} if kind == "site" else {host}
        started = time.time()
        if kind == "flap":
            end = time.monotonic() + lasts
            while time.monotonic() < end:
                bed.partition(self.dir, target, False)
                time.sleep(1.0)
                bed.heal(self.dir)
                time.sleep(1.0)
        else:
            bed.partition(self.dir, target, kind == "oneway")
            time.sleep(lasts)
            bed.heal(self.dir)
        healed = time.time()
        after, settle_s, left = self.settle()
        moved = {ve: (before[ve][0], after[ve][0]) for ve in self.ves if before[ve][0] != after[ve][0]}
        affected = [ve for ve in self.ves if before[ve][0] in cut]
        return {"trial": i, "kind": kind, "target": target, "lasts_s": lasts, "from": started, "healed": healed,
                "settled_at": time.time(), "hosts": {ve: node for ve, (node, _) in before.items()},
                "affected": affected, "moved": moved, "settle_s": round(settle_s, 1), "left_down": left}


Span = tuple[str, float, float, float]
"""(node, first sample seen running, last sample seen running, first sample seen not running)."""


def intervals(directory: Path, nodes: list[str]) -> dict[str, list[Span]]:
    """VM -> each stretch it was seen running on a node (`Span`); an unanswered sample keeps a stretch open."""
    found: dict[str, list[Span]] = {}
    now = time.time()
    for node in nodes:
        path = directory / f"poll-{node}.jsonl"
        since: dict[str, tuple[float, float]] = {}
        for line in path.read_text().splitlines() if path.exists() else []:
            sample = json.loads(line)
            if sample["running"] is None:
                continue
            running = set(sample["running"])
            for vm in running:
                since[vm] = (since.get(vm, (sample["t"], 0.0))[0], sample["t"])
            for vm in [v for v in since if v not in running]:
                first, last = since.pop(vm)
                found.setdefault(vm, []).append((node, first, last, sample["t"]))
        for vm, (first, last) in since.items():
            found.setdefault(vm, []).append((node, first, last, now))
    return found


def overlaps(spans: dict[str, list[Span]], certain: bool) -> list[dict[str, Any]]:
    """Every VM seen running on two nodes at once: `certain`, both seen running in overlapping stretches (first to
    last sample running); else possibly, up to the first sample each was seen not running (the samples of a busy
    agent may be seconds apart)."""
    found = []
    for vm, seen in spans.items():
        for a in range(len(seen)):
            for b in range(a + 1, len(seen)):
                (na, sa, la, ea), (nb, sb, lb, eb) = seen[a], seen[b]
                end_a, end_b = (la, lb) if certain else (ea, eb)
                if na != nb and sa <= end_b and sb <= end_a and (not certain or max(sa, sb) < min(end_a, end_b)):
                    found.append({"vm": vm, "nodes": [na, nb], "from": max(sa, sb), "to": min(end_a, end_b)})
    return found


def recoveries(trial: dict[str, Any], spans: dict[str, list[Span]]) -> dict[str, int]:
    """Affected VE -> on how many other nodes its VM started running between the cut and the settling."""
    counts = {}
    for ve in trial["affected"]:
        started = {node for node, since, _, _ in spans.get(f"{ve}:a", [])
                   if trial["from"] <= since <= trial["settled_at"] and node != trial["hosts"][ve]}
        counts[ve] = len(started)
    return counts


def report(campaign: Campaign, spans: dict[str, list[Span]], elapsed: float) -> dict[str, Any]:
    per_failure: Counter[int] = Counter()
    for trial in campaign.trials:
        trial["recoveries"] = recoveries(trial, spans)
        per_failure.update(trial["recoveries"].values())
    settle = sorted(t["settle_s"] for t in campaign.trials)
    return {"benchmark": "ha_partitions", "trials": len(campaign.trials), "nodes": len(campaign.nodes),
            "ves": len(campaign.ves), "kinds": dict(Counter(t["kind"] for t in campaign.trials)),
            "double_runs": overlaps(spans, certain=True), "possible_double_runs": overlaps(spans, certain=False),
            "affected_ves_by_recoveries": dict(sorted(per_failure.items())),
            "left_down": [{"trial": t["trial"], "kind": t["kind"], "ves": t["left_down"]}
                          for t in campaign.trials if t["left_down"]],
            "settle_s_max": settle[-1] if settle else None, "poll_s": POLL, "wall_seconds": round(elapsed, 1),
            "results": campaign.trials}


def plot(path: str, result: dict[str, Any]) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for kind in KINDS:
        pts = [(t["lasts_s"], len(t["moved"])) for t in result["results"] if t["kind"] == kind]
        if pts:
            ax.scatter(*zip(*pts, strict=True), label=kind, s=18)
    ax.set_xlabel("seconds cut off")
    ax.set_ylabel("VEs recovered elsewhere")
    ax.set_title(f"{result['trials']} partitions on the testbed: {len(result['double_runs'])} double runs")
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--nodes", type=int, default=6)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--ves", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--plot", help="write recoveries against the cut's length to this PNG")
    parser.add_argument("--keep", type=Path, help="run in this directory and keep it: agents' logs, polls")
    parser.add_argument("--poll", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.poll:
        poll(args.poll, args.config, args.out)
        return
    with tempfile.TemporaryDirectory(prefix="ha-partitions-") as scratch:
        tmp = str(args.keep) if args.keep else scratch
        started = time.monotonic()
        with testbed(Path(tmp), args.nodes, args.sites, 100.0, site_rtt_ms=10.0) as (state, identity):
            campaign = Campaign(state, identity, Path(tmp) / "testbed", args)
            campaign.create()
            campaign.start_pollers()
            try:
                for i in range(args.trials):
                    campaign.trials.append(campaign.trial(i))
                    print(json.dumps(campaign.trials[-1]), file=sys.stderr, flush=True)
            finally:
                campaign.stop_pollers()
            result = report(campaign, intervals(Path(tmp) / "testbed", sorted(campaign.nodes)),
                            time.monotonic() - started)
    print(json.dumps(result, indent=2))
    if args.plot:
        plot(args.plot, result)


if __name__ == "__main__":
    main()
