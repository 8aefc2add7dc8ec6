"""Bare testbed nodes as hosts a deployment tool reaches over SSH (`discovery testbed up --bare`).

Each node runs an sshd in its network namespace and in mount and UTS namespaces of its own (its host name is the
node's), where per-node directories (D/hosts/<node>/...) are bound over HOST_PATHS: three nodes on one file system
then keep three agent.toml, three sets of certificates, pidfiles and data, as three machines would. The rest of
the file system (/usr, /opt, the dpkg database) is the machine's, shared. D/hosts.yml is an Ansible inventory of
the nodes (group AGENTS_GROUP), with a generated key; sshd and everything started through it end with the node's
namespace (`net.remove`).
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from discovery.testbed.plan import Plan

HOST_PATHS = ("/etc/discovery", "/var/lib/discovery", "/var/log/discovery", "/run/discovery",
              "/etc/systemd/system")
"""What the role writes on a node: its own copy on each testbed host."""
AGENTS_GROUP = "discovery_agents"
INVENTORY = "hosts.yml"
SSH_PORT = 22
SSHD = "/usr/sbin/sshd"
SSHD_CONFIG = """\
ListenAddress {address}:{port}
HostKey {host_key}
PidFile {pid_file}
AuthorizedKeysFile {authorized}
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
"""


class HostsError(Exception):
    """A one-line reason the nodes could not be made hosts."""


def _keygen(path: Path) -> None:
    if not path.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "discovery-testbed", "-f", str(path)],
                       check=True, capture_output=True)


def _reachable(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=1.0):
            return True
    except OSError:
        return False


def start(directory: Path, plan: Plan, wait: float = 30.0) -> dict[str, int]:
    """Start one sshd per node (its host), write the inventory; returns each node's sshd PID once all answer."""
    if not Path(SSHD).exists():
        raise HostsError(f"{SSHD} is missing: apt-get install openssh-server")
    keys = directory / "ssh"
    keys.mkdir(mode=0o700, exist_ok=True)
    _keygen(keys / "id_ed25519")
    _keygen(keys / "host_ed25519_key")
    authorized = keys / "authorized_keys"
    authorized.write_text((keys / "id_ed25519.pub").read_text())
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    for target in HOST_PATHS:
        Path(target).mkdir(parents=True, exist_ok=True)  # mount points must exist outside too
    pids = {}
    for node in plan.nodes:
        root = directory / "hosts" / node.name
        binds = []
        for target in HOST_PATHS:
            source = root / target.strip("/").replace("/", "-")
            source.mkdir(parents=True, exist_ok=True)
            binds.append(f"mount --bind {source} {target}")
        config = root / "sshd_config"
        config.write_text(SSHD_CONFIG.format(address=node.address, port=SSH_PORT, host_key=keys / "host_ed25519_key",
                                             pid_file=root / "sshd.pid", authorized=authorized))
        command = " && ".join([f"hostname {node.name}", *binds, f"exec {SSHD} -D -f {config} -E {root / 'sshd.log'}"])
        proc = subprocess.Popen(["ip", "netns", "exec", node.namespace, "unshare", "--mount", "--uts",
                                 "--propagation", "private", "sh", "-c", command], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        pids[node.name] = proc.pid
    deadline = time.monotonic() + wait
    waiting = list(plan.nodes)
    while waiting:
        waiting = [n for n in waiting if not _reachable(n.address, SSH_PORT)]
        if waiting and time.monotonic() > deadline:
            raise HostsError(f"sshd does not answer within {wait:g}s on {', '.join(n.name for n in waiting)}; "
                             f"see {directory}/hosts/*/sshd.log")
        time.sleep(0.05 if waiting else 0)
    (directory / INVENTORY).write_text(yaml.safe_dump(inventory(directory, plan), sort_keys=False))
    return pids


def inventory(directory: Path, plan: Plan) -> dict[str, Any]:
    """The nodes as an Ansible inventory: root over SSH with the generated key, each node's site; nodes share
    the machine's dpkg database and /opt, so packages are never refreshed and installs go one node at a time."""
    return {"all": {"children": {AGENTS_GROUP: {
        "hosts": {n.name: {"ansible_host": n.address, "discovery_agent_site": plan.sites[n.site]} for n in plan.nodes},
        "vars": {"ansible_user": "root",
                 "ansible_ssh_private_key_file": str(directory / "ssh" / "id_ed25519"),
                 "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
                 "ansible_python_interpreter": "/usr/bin/python3",
                 "ansible_control_path_dir": str(directory / "ssh" / "control"),
                 "discovery_agent_apt_update_cache": False,
                 "discovery_agent_install_throttle": 1}}}}}


def close_connections(directory: Path) -> None:
    """End the SSH masters Ansible keeps open to the nodes (ControlPersist), which would outlive them."""
    for socket_path in (directory / "ssh" / "control").glob("*"):
        subprocess.run(["ssh", "-O", "exit", "-o", f"ControlPath={socket_path}", "node"], capture_output=True,
                       timeout=10)
