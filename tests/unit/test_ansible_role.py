"""The Ansible role's static checks: ansible-lint clean, and its unit template, rendered by Ansible for each kind of
node, accepted by `systemd-analyze verify` (which warns about what systemd would ignore)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ANSIBLE = Path(__file__).resolve().parents[2] / "deploy" / "ansible"
ROLE = ANSIBLE / "roles" / "discovery_agent"
BIN = Path(sys.executable).parent


@pytest.mark.skipif(not (BIN / "ansible-lint").exists(), reason="no ansible-lint: pip install -e '.[test]'")
def test_ansible_lint_clean() -> None:
    done = subprocess.run([str(BIN / "ansible-lint"), "--offline", "--nocolor"], cwd=ANSIBLE, capture_output=True,
                          text=True, timeout=300, env={"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(Path.home())})
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(not (BIN / "ansible").exists(), reason="no ansible: pip install -e '.[test]'")
@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
@pytest.mark.parametrize("hypervisor,dataplane", [("test", "off"), ("test", "auto"), ("qemu", "linux")])
def test_unit_verifies(tmp_path: Path, hypervisor: str, dataplane: str) -> None:
    unit = tmp_path / "discovery-agent.service"
    render = subprocess.run(
        [str(BIN / "ansible"), "localhost", "-c", "local", "-i", "localhost,", "-m", "ansible.builtin.template",
         "-a", f"src={ROLE / 'templates' / 'discovery-agent.service.j2'} dest={unit}",
         "-e", f"@{ROLE / 'defaults' / 'main.yml'}", "-e", f"@{ROLE / 'vars' / 'main.yml'}",
         "-e", f"discovery_agent_venv={BIN.parent}", "-e", f"discovery_agent_hypervisor={hypervisor}",
         "-e", f"discovery_agent_dataplane={dataplane}", "-e", f"ansible_python_interpreter={sys.executable}"],
        capture_output=True, text=True, timeout=120, env={"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(Path.home())})
    assert render.returncode == 0, render.stdout + render.stderr
    text = unit.read_text()
    assert f"ExecStart={BIN}/discovery-agent --config /etc/discovery/agent.toml" in text
    assert ("CapabilityBoundingSet=\n" in text) == (dataplane == "off" and hypervisor == "test")
    # libvirt-daemon-system's unit, which a qemu node's unit requires, stands in where it is not installed
    (tmp_path / "libvirtd.service").write_text("[Service]\nExecStart=/bin/true\n")
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60,
                            env={"SYSTEMD_UNIT_PATH": f"{tmp_path}:", "PATH": "/usr/bin:/bin"})
    assert verify.returncode == 0 and not verify.stderr, verify.stderr
