"""What the cluster benchmarks share: their options, a local cluster (or a testbed) that is always stopped, real
guests' image cache and consoles, and matplotlib without a display."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from discovery.cli import local_cluster as cluster
from discovery.testbed import bed, plan
from images import tinyguest
from overlay.wire import tls

BOOT_DEADLINE = 150.0
"""Seconds a tiny guest has to print its ready line (TCG on a loaded machine is slow)."""


def cluster_parser(doc: str, ves: int, plot: str) -> argparse.ArgumentParser:
    """A parser with the options of a benchmark on a local cluster of VEs; `doc`'s first line describes it."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=12)
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--ves", type=int, default=ves)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--plot", help=plot)
    return parser


@contextlib.contextmanager
def local_cluster(directory: Path, nodes: int, sites: int, **up_args: Any) -> Iterator[tuple[dict[str, Any],
                                                                                           tls.Identity]]:
    """Start `nodes` agents on `sites` sites under `directory/cluster` (`discovery.cli.local_cluster.up`, its
    emulated WAN latency included); yield the cluster state and the operator identity to call agents with. The
    agents are stopped on the way out, whatever happened, also when `up` itself failed after starting them."""
    os.environ["DISCOVERY_HOME"] = str(directory / "home")  # leave the user's client config alone
    where = directory / "cluster"
    try:
        yield cluster.up(where, nodes, sites, **up_args), _operator(where)
    finally:
        if (where / cluster.STATE_FILE).exists():
            cluster.down(where)


@contextlib.contextmanager
def testbed(directory: Path, nodes: int, sites: int, bandwidth_mbit: float, site_rtt_ms: float | None = None,
            hypervisor: str = "test") -> Iterator[tuple[dict[str, Any], tls.Identity]]:
    """`local_cluster` on `discovery testbed up` (root; default capacity): `cluster up`'s sites and RTTs (or
    `site_rtt_ms` between every two sites), but the router's relay delays every packet between sites, and HTB
    limits each node's link to `bandwidth_mbit`; `hypervisor` "qemu": each node a host with its system libvirtd.
    The cluster state's `rtt_ms` is the plan's; the testbed is torn down on the way out."""
    os.environ["DISCOVERY_HOME"] = str(directory / "home")
    where = directory / "testbed"
    names = plan.site_names(sites)
    rtt = plan.uniform_rtt(len(names), site_rtt_ms) if site_rtt_ms is not None else plan.default_rtt(names)
    spec = plan.make_plan(nodes, names, rtt, bandwidth_mbit)
    bed.up(where, spec, hypervisor=hypervisor)  # removes what it built if it fails
    try:
        state = cluster.load_state(where)
        state["rtt_ms"] = {a: dict(zip(names, row, strict=True)) for a, row in zip(names, spec.rtt_ms, strict=True)}
        yield state, _operator(where)
    finally:
        bed.down(where)


def _operator(where: Path) -> tls.Identity:
    """The identity `cluster.up(where, ...)` issued to call its agents with."""
    return tls.Identity(cert=where / "operator.pem", key=where / "operator.key", ca=where / "ca" / "ca.pem")


def cli(state: dict[str, Any], *args: str) -> Any:
    """`discovery ARGS --json` as the cluster's client, its answer decoded; SystemExit with its error line."""
    done = subprocess.run([sys.executable, "-m", "discovery", "--config", state["client_config"], *args, "--json"],
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"discovery {' '.join(args)}: {done.stderr.strip()}")
    return json.loads(done.stdout)


def share_images(directory: Path) -> None:
    """Let the agents of `local_cluster(directory, ...)` use this user's cache of guest images (the tiny guest
    is built there first if missing), so that they do not build it again under their own home."""
    images = tinyguest.build().base.parent.parent
    link = directory / "home" / "images"
    link.parent.mkdir(parents=True, exist_ok=True)
    if not (link.is_symlink() or link.exists()):
        link.symlink_to(images)


def _configs(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {node["name"]: tomllib.loads(Path(node["config"]).read_text()) for node in state["nodes"]}


def capacity(state: dict[str, Any]) -> dict[str, Any]:
    """What node 1's agent.toml offers (`[capacity]`: vcpus, memory_mb, disk_gb); these clusters' nodes are alike."""
    return _configs(state)["node1"]["capacity"]


def guest_dirs(state: dict[str, Any]) -> dict[str, Path]:
    """Where each node keeps its real guests' disks and console logs, by node name, as seen from here: its own
    libvirtd's (`cluster up --hypervisor qemu`), or its agent's (a testbed host's system daemon); the console
    of VM `vm` of VE `ve` is `<dir>/<ve>--<vm>.log`."""
    if state["hypervisor"] == "qemu-system":
        return {n["name"]: Path(n["config"]).parent / "data" / "guests" for n in state["nodes"]}
    return {name: Path(config["data_dir"]) / "libvirtd" / "guests" for name, config in _configs(state).items()}


def wait_ready(console: Path, deadline: float = BOOT_DEADLINE) -> None:
    """Block until the tiny guest writing to `console` has printed its ready line; SystemExit after `deadline` s."""
    end = time.monotonic() + deadline
    while not (console.exists() and tinyguest.READY in console.read_text(errors="replace")):
        if time.monotonic() > end:
            raise SystemExit(f"{console}: the guest did not boot within {deadline:g} s")
        time.sleep(0.2)


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (PNG files, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
