"""Time from kill -9 of a protected VE's host to the VE running again elsewhere, with no command, printed as JSON.

    python benchmarks/ha_recovery.py [--trials 20] [--nodes 4] [--sites 2]
                                     [--mode restart|standby [--replication async|sync|off]]
                                     [--hypervisor test|qemu [--snapshot-every S] [--uptime S]] [--seed 1]
                                     [--plot out.png]

With real guests, the trials start once the tiny image has the holders `cluster up` asked for (a VM rebuilt
elsewhere boots it). Each trial creates a one-VM VE with HA policy `--mode` through one node (placement keeps
it there), waits until that host's lease lists it (and, for a real guest, until the guest has booted), then
powers the host off as `discovery cluster kill` does (its agent, and with `qemu` its libvirtd and guests,
SIGKILLed) and polls the VE through another agent every POLL seconds until its VM is placed on another node
and libvirt runs it there (`running_s`); for a real guest, also until the guest printed its ready line on its
new node's console (`ready_s`: it booted). A real guest counts a heartbeat a second on its disk; the seconds
of it lost (`lost_s`) are its last heartbeat printed on the old host against the one it boots with elsewhere:
what its standby copy or shipped snapshot (`--snapshot-every`: the trial waits for one) held; a standby copy
whose disk is mirrored (`--replication`, async by default as in the policy) is waited for until the mirror
is ready; `--uptime S`
kills the host at a random moment of the S seconds that follow. The host is then started again (`cluster
start`), the trial waits until it holds a new lease (it read the old one revoked and fenced its copy), and the
VE is destroyed. Hosts rotate over the nodes.

What the time is made of: SWIM's detection (suspicion after missed probes, `suspect_timeout` 3 s), the
watcher's wait for the lease to lapse on the host's clock (term 4 s x 1.05 + 0.5 s, counted from the last
renewal it saw, so mostly overlapping the detection), the revocation (a majority write), then the VE layer's
rebuild or failover transaction. Nothing here asserts a time: it is a measurement.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
from harness import guest_dirs, local_cluster, pyplot, save, share_images  # benchmarks/, beside this
from stats import percentile

from discovery.cli import local_cluster as cluster_cli
from images import tinyguest
from overlay.wire import tls
from overlay.wire.rpc import RpcError, Transport

POLL = 0.1
"""Seconds between two looks at the VE while it recovers."""
DEADLINE = 180.0
"""Seconds a step of a trial may take before the trial counts as failed."""


class Trials:
    def __init__(self, state: dict[str, Any], identity: tls.Identity, args: argparse.Namespace) -> None:
        self.state, self.identity, self.args = state, identity, args
        self.nodes = {n["name"]: n for n in state["nodes"]}
        self.qemu = args.hypervisor == "qemu"
        self.mirrored = self.qemu and args.mode == "standby" and args.replication != "off"
        self.results: list[dict[str, Any]] = []
        self.rng = random.Random(args.seed)

    def spec(self, name: str) -> dict[str, Any]:
        vm = {"name": "a", "vcpus": 1, "memory_mb": 128, "disk_gb": 1, **({"image": "tiny"} if self.qemu else {})}
        ha: dict[str, Any] = ({"mode": "standby", "copies": 1, "replication": self.args.replication}
                              if self.args.mode == "standby" else {"mode": "restart"})
        if self.args.snapshot_every:
            ha["snapshot_every"] = self.args.snapshot_every
        return {"name": name, "vms": [vm], "ha": ha}

    async def run(self) -> None:
        names = sorted(self.nodes)
        async with Transport(self.identity, node="bench") as transport:
            if self.qemu:  # a VM rebuilt elsewhere boots its image: wait for the copies `cluster up` asked for
                await self.until(lambda: self.image_held(transport, self.nodes[names[0]]["addr"]),
                                 "the tiny image on its holders")
            for i in range(self.args.trials):
                host = names[i % len(names)]
                via = names[(i + 1) % len(names)]
                try:
                    self.results.append(await self.trial(transport, f"ha{i}", host, via))
                except (RpcError, TimeoutError) as err:
                    self.results.append({"trial": i, "host": host, "error": str(err)})
                print(json.dumps(self.results[-1]), file=sys.stderr, flush=True)

    async def trial(self, transport: Transport, name: str, host: str, via: str) -> dict[str, Any]:
        addr = self.nodes[via]["addr"]
        created = await transport.call(self.nodes[host]["addr"], "ve.create", {"spec": self.spec(name)}, timeout=600)
        if created["placement"]["a"]["node"] != host:
            raise TimeoutError(f"{name} was placed on {created['placement']['a']['node']}, not {host}")
        await self.until(lambda: self.listed(transport, addr, host, name), f"{host}'s lease listing {name}")
        if self.qemu:
            await self.until(lambda: self.ready(host, name), f"{name} booted on {host}")
        if self.mirrored:  # the standby copy follows the disk: wait until its mirror caught up once
            await self.until(lambda: self.mirror_ready(transport, addr, name), f"{name}'s disk mirrored")
        if self.args.snapshot_every:  # a shipped snapshot to restart from
            await self.until(lambda: self.ask(transport, addr, "ve.restore_point", {"name": name, "vm": "a"}),
                             f"a shipped snapshot of {name}")
        await trio.sleep(self.rng.uniform(0, self.args.uptime))  # then the kill, at a random moment
        killed = time.monotonic()
        await trio.to_thread.run_sync(cluster_cli.kill, Path(self.state["dir"]), host)
        moved = await self.until(lambda: self.running_elsewhere(transport, addr, name, host), f"{name} running again")
        running = time.monotonic() - killed
        ready = lost = None
        if self.qemu:
            await self.until(lambda: self.ready(moved, name), f"{name} booted on {moved}")
            ready = time.monotonic() - killed
            lost = self.beats(host, name)[0] - self.beats(moved, name)[1]
        self.nodes[host] = await trio.to_thread.run_sync(cluster_cli.start, Path(self.state["dir"]), host)
        await self.until(lambda: self.holds_again(transport, addr, host), f"{host} back, holding a new lease")
        await transport.call(addr, "ve.destroy", {"name": name}, timeout=120)
        return {"trial": name, "host": host, "to": moved, "running_s": round(running, 2),
                **({"ready_s": round(ready, 2), "lost_s": lost} if ready is not None else {})}

    async def until(self, check: Any, what: str) -> Any:
        end = time.monotonic() + DEADLINE
        while time.monotonic() < end:
            found = await check()
            if found:
                return found
            await trio.sleep(POLL)
        raise TimeoutError(f"{what}: not within {DEADLINE:g} s")

    async def image_held(self, transport: Transport, addr: str) -> bool:
        entry = await self.ask(transport, addr, "image.show", {"name": "tiny"})
        return entry is not None and len(entry["holders"]) >= min(entry["copies"], len(self.nodes))

    async def listed(self, transport: Transport, addr: str, host: str, name: str) -> bool:
        record = await self.ask(transport, addr, "ha.lease", {"node": host})
        return record is not None and name in record["lease"]["ves"]

    async def mirror_ready(self, transport: Transport, addr: str, name: str) -> bool:
        shown = await self.ask(transport, addr, "ve.show", {"name": name})
        copies = shown["protection"]["a"].get("copies", []) if shown else []
        return any(c.get("mirror") == "ready" for c in copies)

    async def holds_again(self, transport: Transport, addr: str, host: str) -> bool:
        record = await self.ask(transport, addr, "ha.lease", {"node": host})
        return record is not None and record["lease"]["holder"] == host

    async def running_elsewhere(self, transport: Transport, addr: str, name: str, host: str) -> str | None:
        shown = await self.ask(transport, addr, "ve.show", {"name": name})
        slot = shown["placement"]["a"] if shown else None
        return slot["node"] if slot and slot["node"] != host and slot.get("domain_state") == "running" else None

    async def ready(self, node: str, name: str) -> str | None:
        console = guest_dirs(self.state)[node] / f"{name}--a.log"
        text = console.read_text(errors="replace") if console.exists() else ""
        return node if tinyguest.READY in text else None

    def beats(self, node: str, name: str) -> tuple[int, int]:
        """The guest's heartbeats (one a second, kept on its disk) as `node`'s console shows them: the last one
        printed, and the one it booted with (`DISCOVERY-GUEST-READY heartbeat=N`, read from its disk)."""
        text = (guest_dirs(self.state)[node] / f"{name}--a.log").read_text(errors="replace")
        last = max((int(m) for m in re.findall(r"HEARTBEAT (\d+)", text)), default=0)
        booted = re.findall(tinyguest.READY + r" heartbeat=(\d+)", text)
        return last, int(booted[-1]) if booted else 0

    @staticmethod
    async def ask(transport: Transport, addr: str, method: str, args: dict[str, Any]) -> Any:
        try:
            return await transport.call(addr, method, args, timeout=5)
        except RpcError:  # the agent asked may be busy settling the failure: ask again at the next poll
            return None


def report(trials: Trials, args: argparse.Namespace, elapsed: float) -> dict[str, Any]:
    done = [r for r in trials.results if "running_s" in r]

    def summary(key: str) -> dict[str, float] | None:
        values = [r[key] for r in done if key in r]
        if not values:
            return None
        return {"p50": percentile(values, 50), "p95": percentile(values, 95), "max": max(values)}

    return {"benchmark": "ha_recovery", "nodes": args.nodes, "sites": args.sites, "mode": args.mode,
            "hypervisor": args.hypervisor, "replication": args.replication if args.mode == "standby" else None,
            "trials": args.trials, "recovered": len(done),
            "snapshot_every": args.snapshot_every, "running_s": summary("running_s"), "ready_s": summary("ready_s"),
            "lost_s": summary("lost_s"),
            "wall_seconds": round(elapsed, 1), "results": trials.results}


def plot(path: str, result: dict[str, Any]) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("running_s", "placed and running (libvirt)"), ("ready_s", "guest booted")):
        values = sorted(r[key] for r in result["results"] if key in r)
        if values:
            ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post", label=label)
    ax.set_xlabel("seconds from kill -9 of the host")
    ax.set_ylabel("share of trials")
    ax.set_title(f"HA recovery, {result['mode']}, {result['hypervisor']} ({result['recovered']} trials)")
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--mode", choices=("restart", "standby"), default="restart")
    parser.add_argument("--replication", choices=("async", "sync", "off"), default="async",
                        help="with --mode standby: the policy's replication (real guests' disks mirrored to the copy)")
    parser.add_argument("--hypervisor", choices=("test", "qemu"), default="test")
    parser.add_argument("--snapshot-every", type=int, help="the policy's snapshot_every (seconds): each trial "
                        "waits for a shipped snapshot before the kill")
    parser.add_argument("--uptime", type=float, default=0.0, help="the VE runs a random 0 to UPTIME seconds "
                        "before its host is killed (after its shipped snapshot, with --snapshot-every)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--plot", help="write a CDF of the recovery times to this PNG")
    parser.add_argument("--keep", type=Path, help="run in this directory and keep it (the agents' logs)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ha-recovery-") as scratch:
        tmp = str(args.keep) if args.keep else scratch
        started = time.monotonic()
        if args.hypervisor == "qemu":
            share_images(Path(tmp))
        with local_cluster(Path(tmp), args.nodes, args.sites, hypervisor=args.hypervisor) as (state, identity):
            trials = Trials(state, identity, args)
            trio.run(trials.run)
        result = report(trials, args, time.monotonic() - started)
    print(json.dumps(result, indent=2))
    if args.plot:
        plot(args.plot, result)


if __name__ == "__main__":
    main()
