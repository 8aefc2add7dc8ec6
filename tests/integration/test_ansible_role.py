"""The Ansible role for real: a bare testbed (3 nodes on 2 sites, each an sshd in its namespaces), site.yml run
over SSH twice (the second run changes nothing), the three agents one cluster, everything gone afterwards.

Needs root, no other testbed on the machine (waits for one to go, then skips), sshd and ansible-playbook."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from discovery.testbed import bed, deploy, hosts

from .conftest import wait_for

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(os.geteuid() != 0, reason="the testbed needs root (ip netns add)"),
              pytest.mark.skipif(not Path(hosts.SSHD).exists(), reason="no sshd: apt-get install openssh-server"),
              pytest.mark.skipif(not (Path(sys.executable).parent / "ansible-playbook").exists(),
                                 reason="no ansible-playbook: pip install -e '.[test]'")]


def _leftovers() -> dict[str, list[str]]:
    return {k: v for k, v in bed.leftovers().items() if v}


def _discovery(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "discovery", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def bare(tmp_path: Path) -> Iterator[Path]:
    """A bare testbed of 3 nodes on 2 sites; down (and checked empty: namespaces, processes, SSH masters) after."""
    try:
        wait_for(lambda: not _leftovers(), 300, "another testbed on this machine to go", interval=2)
    except AssertionError:
        pytest.skip(f"another testbed stays up on this machine: {_leftovers()}")
    directory = tmp_path / "bed"
    up = _discovery("testbed", "up", "--dir", str(directory), "--nodes", "3", "--sites", "2", "--site-rtt", "20",
                    "--bare", "--json")
    try:
        assert up.returncode == 0, up.stderr
        yield directory
    finally:
        _discovery("testbed", "down", "--dir", str(directory))
        if _leftovers():
            bed.teardown(None)
    assert not _leftovers()
    assert not list((directory / "ssh" / "control").glob("*")), "SSH masters left open"


def test_bare_nodes_are_separate_hosts(bare: Path) -> None:
    """Each node's sshd answers with the node's own name and its own /etc/discovery."""
    key = bare / "ssh" / "id_ed25519"
    for name, address in (("node1", "10.213.1.1"), ("node2", "10.213.2.1")):
        done = subprocess.run(["ssh", "-i", str(key), "-o", "StrictHostKeyChecking=no", "-o",
                               "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", f"root@{address}",
                               f"hostname; echo {name} > /etc/discovery/mine; ls /etc/discovery"],
                              capture_output=True, text=True, timeout=60)
        assert done.stdout.split() == [name, "mine"], done.stderr
    assert (bare / "hosts" / "node2" / "etc-discovery" / "mine").read_text() == "node2\n"
    assert not Path("/etc/discovery/mine").exists()


def test_role_deploys_joined_agents_idempotently(bare: Path, tmp_path: Path) -> None:
    wheels = deploy.wheelhouse(tmp_path / "wheels")
    venv = tmp_path / "opt-discovery"
    first = deploy.playbook(bare, wheels, venv)
    assert first.returncode == 0, first.stdout[-4000:]
    assert all(r["changed"] > 0 for r in deploy.recap(first.stdout).values())
    client = bare / "discovery-ca" / "client.toml"
    assert deploy.converged(client, 3, 90.0), "the deployed agents did not become one cluster"

    second = deploy.playbook(bare, wheels, venv)
    assert second.returncode == 0, second.stdout[-4000:]
    again = deploy.recap(second.stdout)
    assert sorted(again) == ["node1", "node2", "node3"]
    assert all(r["changed"] == 0 and r["failed"] == 0 for r in again.values()), again

    members = _discovery("--config", str(client), "members", "--json")
    assert members.returncode == 0, members.stderr
    assert sorted((m["name"], m["status"]) for m in json.loads(members.stdout)) == [
        ("node1", "alive"), ("node2", "alive"), ("node3", "alive")]
    unit = bare / "hosts" / "node1" / "etc-systemd-system" / "discovery-agent.service"
    if shutil.which("systemd-analyze"):
        verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
        assert verify.returncode == 0 and not verify.stderr, verify.stderr
