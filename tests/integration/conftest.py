"""Real clusters for integration tests: agent processes on loopback, started and stopped by the CLI.

The suite must pass on a loaded 2-core machine (CI shares it; TCG guests are slow), so a test never sleeps
for a guessed time: it waits for the condition it needs (`wait_for`), under a deadline that bounds a
broken run rather than predicts a working one, and it waits for the right condition (a killed agent is
dead, a restarted one has rejoined: `Cluster.kill9`, `rejoined`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from overlay.membership import Member, Membership
from overlay.quorum import PINNED_REPLICAS, FixedSets
from overlay.wire import tls
from overlay.wire.rpc import RpcError, Transport

log = logging.getLogger(__name__)
DEADLINE = 90.0
"""How long `wait_for` waits by default: a bound on a broken run, far above what a working one takes."""
SETTLE_DEADLINE = 180.0
"""For an interrupted operation to be settled by another agent: more than the intent's lease
(`discovery.ve.base.MOVE_LEASE`), which frees it even if no agent ever learns that its coordinator died."""


def wait_for(predicate: Callable[[], Any], timeout: float = DEADLINE, what: str = "the condition",
             interval: float = 0.3, detail: Callable[[], str] | None = None) -> Any:
    """Poll `predicate` until it returns a true value, and return that value; AssertionError naming `what`
    (and `detail()`, if given) once `timeout` seconds pass without. How long it took goes to the log."""
    start = time.monotonic()
    while True:
        value = predicate()
        if value:
            log.info("%s: after %.1f s", what, time.monotonic() - start)
            return value
        if time.monotonic() - start > timeout:
            more = f"; {detail()}" if detail is not None else ""
            raise AssertionError(f"{what}: not within {timeout:g} s (last answer {value!r}){more}")
        time.sleep(interval)


def holds(predicate: Callable[[], Any], seconds: float, what: str, interval: float = 0.3) -> None:
    """Check that `predicate` stays true for `seconds` (that something does *not* happen needs a window)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert predicate(), f"{what}: broken after {seconds - (end - time.monotonic()):.1f} s"
        time.sleep(interval)


class Cluster:
    def __init__(self, directory: Path, env: dict[str, str]) -> None:
        self.dir = directory
        self.env = env
        self.state: dict[str, Any] = {}

    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "discovery", "--config", str(self.dir / "client.toml"), *args],
                              capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"discovery {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def try_json(self, *args: str) -> Any:
        """`json`, or None if the command failed: for polling an answer that may be refused for a while."""
        proc = self.cli(*args, "--json", check=False)
        return json.loads(proc.stdout) if proc.returncode == 0 else None

    def call(self, node: str, method: str, args: dict[str, Any], cert_dir: Path | None = None,
             user: str = "operator", timeout: float = 10) -> Any:
        """Call an RPC of one agent directly (no CLI process), with the operator's certificate (or `user`'s)."""
        cert_dir = cert_dir or self.dir
        ident = tls.Identity(cert=cert_dir / f"{user}.pem", key=cert_dir / f"{user}.key",
                             ca=self.dir / "ca" / "ca.pem")

        async def ask() -> Any:
            async with Transport(ident, node="probe") as transport:
                return await transport.call(self.node(node)["addr"], method, args, timeout=timeout)

        return trio.run(ask)

    def up(self, nodes: int, sites: int, hypervisor: str = "test", extra: tuple[str, ...] = ()) -> None:
        proc = subprocess.run([sys.executable, "-m", "discovery", "cluster", "up", "--nodes", str(nodes),
                               "--sites", str(sites), "--dir", str(self.dir), "--hypervisor", hypervisor, *extra,
                               "--json"],
                              capture_output=True, text=True, env=self.env, timeout=180)
        if (self.dir / "cluster.json").exists():
            self.state = json.loads((self.dir / "cluster.json").read_text())
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["nodes"] == self.state["nodes"]

    def node(self, name: str) -> dict[str, Any]:
        return next(n for n in self.state["nodes"] if n["name"] == name)

    def kill9(self, name: str) -> None:
        """SIGKILL the agent and wait until it is dead: a signal is delivered, not acted on, when `kill`
        returns, and a loaded machine may run the dying process late (it would still answer meanwhile)."""
        pid = self.node(name)["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not pid_alive(pid), 30, f"{name} (pid {pid}) dead after SIGKILL", interval=0.05)

    def running(self) -> list[str]:
        """The agents whose process runs."""
        return [n["name"] for n in self.state.get("nodes", []) if pid_alive(n["pid"])]

    def pids(self) -> list[int]:
        return [n["pid"] for n in self.state.get("nodes", [])]

    def down(self) -> None:
        try:
            if self.state:
                subprocess.run([sys.executable, "-m", "discovery", "cluster", "down", "--dir", str(self.dir)],
                               capture_output=True, text=True, env=self.env, timeout=180)
        finally:
            for pid in self.pids():  # whatever `down` missed (it should miss nothing)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)


def ve_name_outliving(stem: str, nodes: list[str], down: set[str]) -> str:
    """A VE name, `stem` or `stem` and a number, whose record keeps a majority of its fixed replicas
    (`overlay.quorum`) among `nodes` with `down` dead: a test that kills two of four agents needs one, or the
    record can be neither read nor written until one returns."""
    members = Membership("test", "test", "")
    members.members = {n: Member(n, n, "") for n in nodes}
    fixed = FixedSets(members, PINNED_REPLICAS)
    for k in range(100):
        name = f"{stem}{k or ''}"
        replicas, quorum = fixed.of(f"ve/{name}")
        if sum(r not in down for r in replicas) >= quorum:
            return name
    raise AssertionError(f"no VE name from {stem!r} outlives {sorted(down)}")


def pid_alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture
def cluster_factory(tmp_path_factory):
    made: list[Cluster] = []

    def make(nodes: int, sites: int, *extra: str) -> Cluster:
        """A cluster of `nodes` agents on `sites` sites; `extra`: more `cluster up` options."""
        directory = tmp_path_factory.mktemp("cluster")
        env = {**os.environ, "DISCOVERY_HOME": str(directory / "home")}
        cluster = Cluster(directory, env)
        made.append(cluster)
        cluster.up(nodes, sites, extra=extra)
        return cluster

    yield make
    for cluster in made:
        cluster.down()


@contextlib.contextmanager
def running_cluster(tmp_path_factory, name: str, nodes: int, sites: int, extra: tuple[str, ...] = (),
                    **env: str) -> Iterator[Cluster]:
    """A cluster for the tests of one module (a module-scoped fixture), stopped whatever happens; `extra`: more
    options of `cluster up`; `env` is added to the environment of its agents (and of the CLI the tests run)."""
    directory = tmp_path_factory.mktemp(name)
    cluster = Cluster(directory, {**os.environ, "DISCOVERY_HOME": str(directory / "home"), **env})
    try:
        cluster.up(nodes, sites, extra=extra)
        yield cluster
    finally:
        cluster.down()


@pytest.fixture(scope="module")
def cluster6(tmp_path_factory):
    """A 6-node, 3-site cluster shared by the tests of one module."""
    with running_cluster(tmp_path_factory, "cluster6", 6, 3) as cluster:
        yield cluster


def restart(cluster: Cluster, name: str, **env: str) -> int:
    """Start a stopped agent again with its own config (and `env` added to its environment), recorded so
    `cluster down` stops it too. It answers soon, but has not rejoined yet: see `rejoined`."""
    node = cluster.node(name)
    output = open(Path(node["config"]).parent / "agent.log", "ab")  # noqa: SIM115 - the child keeps it open
    proc = subprocess.Popen([sys.executable, "-m", "discovery.agent", "--config", node["config"]],
                            stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, env={**cluster.env, **env})
    output.close()
    node["pid"] = proc.pid
    (cluster.dir / "cluster.json").write_text(json.dumps(cluster.state, indent=2))
    return proc.pid


def rejoined(cluster: Cluster, name: str, ve: str | None = None, timeout: float = DEADLINE) -> None:
    """Wait until restarted agent `name` is back in the cluster: it and every other running agent see each
    other alive, its ring holds them all (up to its 8 successors) and a predecessor, and (with `ve`) it
    then reads that VE's record as another agent does. Answering is not enough: for a few seconds after
    it starts (longer on a loaded machine) an agent's ring holds only part of the cluster, and its DHT
    then waits for the ring or refuses as `unavailable` (and before gossip reaches a seed, its membership
    knows nobody either): the VE is read only once the ring is whole."""
    others = [n for n in cluster.running() if n != name]

    def ask(node: str, method: str, args: dict[str, Any]) -> Any:
        try:
            return cluster.call(node, method, args)
        except RpcError:
            return None

    def sees_alive(node: str, names: list[str]) -> bool:
        members = ask(node, "agent.members", {}) or []
        return all(any(m["name"] == n and m["status"] == "alive" for m in members) for n in names)

    def ring_whole() -> bool:
        status = ask(name, "agent.status", {}) or {}
        successors = set(status.get("successors", []))
        return status.get("predecessor") in others and (successors >= set(others) or len(successors) >= 8)

    def back() -> bool:
        if not sees_alive(name, others) or not all(sees_alive(n, [name]) for n in others) or not ring_whole():
            return False
        if ve is None:
            return True
        mine = ask(name, "ve.locate", {"name": ve})
        return mine is not None and mine == ask(others[0], "ve.locate", {"name": ve})

    wait_for(back, timeout, f"{name} rejoined the cluster" + (f" and reads VE {ve}" if ve else ""))
