"""The Ansible role for real: a bare testbed (3 nodes on 3 sites, each an sshd in its namespaces), where
deploy/g5k/campaign.py's Static path (EnOSlib, in a venv of its own) deploys the agents with the role over SSH
and runs the CI campaign on them; site.yml run again changes nothing, the three agents are one cluster, and
everything is gone afterwards.

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
import yaml

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
    """A bare testbed of 3 nodes on 3 sites; down (and checked empty: namespaces, processes, SSH masters) after."""
    try:
        wait_for(lambda: not _leftovers(), 300, "another testbed on this machine to go", interval=2)
    except AssertionError:
        pytest.skip(f"another testbed stays up on this machine: {_leftovers()}")
    directory = tmp_path / "bed"
    up = _discovery("testbed", "up", "--dir", str(directory), "--nodes", "3", "--sites", "3", "--site-rtt", "20",
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


ENOSLIB_VENV = Path.home() / ".cache" / "discovery" / "enoslib-venv"
"""EnOSlib's own venv (its pins are old), kept across runs: pip's cache makes it once per machine."""
G5K_SCRIPT = Path(__file__).parents[2] / "deploy" / "g5k" / "campaign.py"
CI_CAMPAIGN = Path(__file__).parents[2] / "examples" / "campaigns" / "ci.yaml"
NO_SYSTEMD = {  # the role's start-stop-daemon path, for the campaign's faults on nodes without systemd
    "discovery_campaign_kill": "start-stop-daemon --stop --signal KILL --pidfile /run/discovery/agent.pid "
                               "--name discovery-agent --remove-pidfile",
    "discovery_campaign_start": "start-stop-daemon --start --background --make-pidfile --output "
                                "/var/log/discovery/agent.log --pidfile /run/discovery/agent.pid "
                                "--name discovery-agent --startas {venv}/bin/discovery-agent -- "
                                "--config /etc/discovery/agent.toml"}


def enoslib_python() -> Path:
    """The venv's python with EnOSlib importable, made if need be; skips the test, with pip's reason, if it
    cannot be."""
    python = ENOSLIB_VENV / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import enoslib"], capture_output=True).returncode == 0:
        return python
    made = subprocess.run(f"python3 -m venv {ENOSLIB_VENV} && {python} -m pip install -q -r "
                          f"{G5K_SCRIPT.parent / 'requirements.txt'}", shell=True, capture_output=True, text=True,
                          timeout=900)
    if made.returncode != 0:
        pytest.skip(f"cannot install EnOSlib: {(made.stderr.strip().splitlines() or ['?'])[-1]}")
    return python


def test_the_role_deploys_through_the_g5k_script_runs_the_ci_campaign_and_changes_nothing_again(
        bare: Path, tmp_path: Path) -> None:
    """deploy/g5k/campaign.py's Static path (EnOSlib) over the bare testbed's nodes: the role deploys them, the CI
    campaign runs on them through `--hosts` (DVMS's hooks over RPC, a node killed and started over SSH, a site
    cut off and healed by nftables on the hosts), and the results folder and every agent's log come back. Then
    the role, run again on the script's inventory, changes nothing, and the three agents are one cluster."""
    python = enoslib_python()
    inventory = yaml.safe_load((bare / "hosts.yml").read_text())["all"]["children"]["discovery_agents"]
    machines = [{"alias": name, "address": var["ansible_host"], "site": var["discovery_agent_site"], "user": "root",
                 "keyfile": inventory["vars"]["ansible_ssh_private_key_file"]}
                for name, var in inventory["hosts"].items()]
    (tmp_path / "machines.yaml").write_text(yaml.safe_dump(machines))
    wheels, venv = deploy.wheelhouse(tmp_path / "wheels"), tmp_path / "opt-discovery"
    faults = {k: v.format(venv=venv) for k, v in NO_SYSTEMD.items()}
    variables = {**inventory["vars"], **deploy.variables(wheels, venv), **faults}
    out = tmp_path / "out"
    done = subprocess.run([str(python), str(G5K_SCRIPT), "static", "--machines", str(tmp_path / "machines.yaml"),
                           "--campaign", str(CI_CAMPAIGN), "--out", str(out),
                           "--discovery", f"{sys.executable} -m discovery",
                           *(arg for k, v in variables.items() for arg in ("--var", f"{k}={v}"))],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORKS": "20"})
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    raw = json.loads((out / "results" / "raw.json").read_text())
    assert [(a["kind"], a["target"], a["ok"]) for a in raw["actions"]] == [
        ("capacity", "", True), ("load", "", True), ("kill", "node2", True), ("start", "node2", True),
        ("partition", "nancy", True), ("heal", "", True)]  # the CI campaign: the same file as on the testbed
    assert sum(op["ok"] for op in raw["operations"] if op["op"] == "create") >= 15
    assert all(sample["metrics"] for sample in raw["samples"])  # every node's /metrics scraped over the underlay
    assert (out / "results" / "summary.md").read_text().startswith("# Campaign ci")
    for node in ("node1", "node2", "node3"):
        assert (out / "logs" / node / "var" / "log" / "discovery" / "agent.log").stat().st_size > 0

    again = deploy.playbook(out / "inventory.yml", wheels, venv)
    assert again.returncode == 0, again.stdout[-4000:]
    recap = deploy.recap(again.stdout)
    assert sorted(recap) == ["node1", "node2", "node3"]
    assert all(r["changed"] == 0 and r["failed"] == 0 for r in recap.values()), recap
    client = out / "discovery-ca" / "client.toml"
    assert deploy.converged(client, 3, 90.0), "the deployed agents are not one cluster"
    unit = bare / "hosts" / "node1" / "etc-systemd-system" / "discovery-agent.service"
    if shutil.which("systemd-analyze"):
        verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
        assert verify.returncode == 0 and not verify.stderr, verify.stderr
