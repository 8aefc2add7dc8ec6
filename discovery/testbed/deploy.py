"""Deploying agents on a bare testbed (`testbed up --bare`) with the Ansible role, as an operator would: what the
role's test and the deployment benchmark share.

The nodes have no route to a package index, and they share the machine's file system: pip installs from a
wheelhouse built here (the working tree's package and its dependencies) through `--no-index --find-links`, into a
virtualenv that the caller places (a fresh one is a deployment from nothing).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import trio

from discovery.cli.config import load_client_config
from discovery.cli.local_cluster import wait_converged

SOURCE = Path(__file__).resolve().parents[2]
PLAYBOOK = SOURCE / "deploy" / "ansible" / "site.yml"
_RECAP = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def wheelhouse(out: Path) -> Path:
    """The package of this source tree and its dependencies as wheels in `out` (pip's cache makes a second
    build quick). setuptools builds in the tree's `build/`, removed again unless it was there before: a copy
    of the modules in the tree would be read as the code's own."""
    ours = not (SOURCE / "build").exists()
    try:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "-w", str(out), str(SOURCE)], check=True,
                       capture_output=True)
    finally:
        if ours:
            shutil.rmtree(SOURCE / "build", ignore_errors=True)
    return out


def playbook(inventory: Path, wheels: Path, venv: Path, timeout: float = 600.0,
             more: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run deploy/ansible/site.yml on the hosts of `inventory` (a bare testbed's hosts.yml, or one written from
    it), with `more` variables; the controller's `discovery` is this interpreter's, so the CA is made by the
    code under test."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SOURCE), os.environ.get("PYTHONPATH")])),
           "ANSIBLE_PYTHON_WARNINGS": "0", "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORKS": "20",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    extra = {**variables(wheels, venv), **(more or {})}
    args = [arg for key, value in extra.items() for arg in ("-e", f"{key}={value!r}")]
    return subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(inventory), *args,
                           str(PLAYBOOK)], capture_output=True, text=True, env=env, timeout=timeout)


def variables(wheels: Path, venv: Path) -> dict[str, str]:
    """The role's variables for testbed hosts: the package from the wheelhouse `wheels` into `venv`, the CA
    made by this interpreter's `discovery`."""
    return {"discovery_agent_venv": str(venv), "discovery_agent_controller_cli": f"{sys.executable} -m discovery",
            "discovery_agent_pip_extra_args": f"--no-index --find-links {wheels}"}


def recap(output: str) -> dict[str, dict[str, int]]:
    """The PLAY RECAP of a playbook's output: host -> ok, changed, unreachable, failed."""
    return {m[1]: dict(zip(("ok", "changed", "unreachable", "failed"), map(int, m.groups()[1:]), strict=True))
            for m in _RECAP.finditer(output)}


def converged(client_toml: Path, nodes: int, wait: float) -> bool:
    """Whether the deployed agents (the role's client.toml lists them) all see each other alive within `wait`."""
    client = load_client_config(str(client_toml))
    return trio.run(wait_converged, client, list(client.nodes.values()), nodes, wait)
