"""Real clusters for integration tests: agent processes on loopback, started and stopped by the CLI."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


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
        os.kill(self.node(name)["pid"], signal.SIGKILL)

    def pids(self) -> list[int]:
        return [n["pid"] for n in self.state.get("nodes", [])]

    def down(self) -> None:
        if self.state:
            subprocess.run([sys.executable, "-m", "discovery", "cluster", "down", "--dir", str(self.dir)],
                           capture_output=True, text=True, env=self.env, timeout=60)
        for pid in self.pids():  # whatever `down` missed (it should miss nothing)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


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
def running_cluster(tmp_path_factory, name: str, nodes: int, sites: int) -> Iterator[Cluster]:
    """A cluster for the tests of one module (a module-scoped fixture), stopped whatever happens."""
    directory = tmp_path_factory.mktemp(name)
    cluster = Cluster(directory, {**os.environ, "DISCOVERY_HOME": str(directory / "home")})
    try:
        cluster.up(nodes, sites)
        yield cluster
    finally:
        cluster.down()


@pytest.fixture(scope="module")
def cluster6(tmp_path_factory):
    """A 6-node, 3-site cluster shared by the tests of one module."""
    with running_cluster(tmp_path_factory, "cluster6", 6, 3) as cluster:
        yield cluster


def restart(cluster: Cluster, name: str) -> int:
    """Start a stopped agent again with its own config, recorded so `cluster down` stops it too."""
    node = cluster.node(name)
    log = open(Path(node["config"]).parent / "agent.log", "ab")  # noqa: SIM115 - the child keeps it open
    proc = subprocess.Popen([sys.executable, "-m", "discovery", "agent", "run", "--config", node["config"]],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, env=cluster.env)
    log.close()
    node["pid"] = proc.pid
    (cluster.dir / "cluster.json").write_text(json.dumps(cluster.state, indent=2))
    return proc.pid
