"""Where a campaign runs and how its faults are made there: a testbed on this machine (`Testbed`, brought up
when it is not), or hosts already running agents (`Hosts`, listed by an Ansible inventory, reached over SSH).

Both give the runner the nodes (name, site, RPC address, `/metrics` address), an identity to call agents
with, and the faults: `kill` (the agent SIGKILLed; real guests live on), `poweroff` (a power cut: the agent,
with real guests its daemon and guests too), `start`, `partition` of a node or a site (both ways, from every
other node), `heal`. Their calls block (they
run commands): the runner runs them in threads.
"""

from __future__ import annotations

import contextlib
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from discovery.campaign.plan import TestbedSpec
from discovery.cli import local_cluster
from discovery.cli.config import load_client_config
from discovery.testbed import bed
from discovery.testbed.net import NetError
from discovery.testbed.plan import SpecError, make_plan, site_names, uniform_rtt
from overlay.wire import tls
from overlay.wire.rpc import split_addr

SSH_TIMEOUT = 30.0
AGENT_PORT = 7000


class TargetError(Exception):
    """The deployment could not be brought up, reached or acted on; one line."""


@dataclass(frozen=True)
class Node:
    name: str
    site: str
    addr: str
    metrics: str
    """host:port of its /metrics ('' if it serves none)."""


class Target(Protocol):
    nodes: list[Node]
    identity: tls.Identity

    def kill(self, node: str) -> None: ...
    def poweroff(self, node: str) -> None: ...
    def start(self, node: str) -> None: ...
    def partition(self, target: str) -> None: ...
    def heal(self) -> None: ...
    def close(self) -> None: ...


class Testbed:
    """The testbed in `directory`: attached to if it is up, else brought up as `spec` says (and then brought
    down by `close`, unless `keep`)."""

    def __init__(self, directory: Path, spec: TestbedSpec, keep: bool = False) -> None:
        self.directory = directory.resolve()
        self.brought_up = False
        if not (self.directory / bed.STATE_FILE).exists():
            if (self.directory / local_cluster.STATE_FILE).exists():  # its agents' data would come back to life
                raise TargetError(f"{self.directory} holds an earlier cluster's data; give a new directory")
            try:
                plan = make_plan(spec.nodes, site_names(spec.sites), uniform_rtt(spec.sites, spec.site_rtt),
                                 spec.bandwidth)
                bed.up(self.directory, plan, hypervisor=spec.hypervisor, image_copies=spec.image_copies)
            except (SpecError, bed.TestbedError, NetError, local_cluster.ClusterError) as err:
                raise TargetError(f"testbed up: {err}") from None
            self.brought_up = not keep
        state = local_cluster.load_state(self.directory)
        self.nodes = [Node(n["name"], n["site"], n["addr"], n.get("metrics", "")) for n in state["nodes"]]
        self.identity = tls.Identity(cert=self.directory / "operator.pem", key=self.directory / "operator.key",
                                     ca=self.directory / "ca" / "ca.pem")

    def kill(self, node: str) -> None:
        local_cluster.crash(self.directory, node)

    def poweroff(self, node: str) -> None:
        local_cluster.kill(self.directory, node)

    def start(self, node: str) -> None:
        local_cluster.start(self.directory, node)

    def partition(self, target: str) -> None:
        bed.partition(self.directory, target, oneway=False)

    def heal(self) -> None:
        bed.heal(self.directory)

    def close(self) -> None:
        if self.brought_up:
            bed.down(self.directory)


class Hosts:
    """Hosts an Ansible inventory (YAML) lists under `all.hosts` (or its groups' `hosts`), with the variables
    of the `discovery_agent` role (deploy/ansible): `discovery_agent_address` (else `ansible_host`, else the
    name), `discovery_agent_port` (7000), `discovery_agent_site`, `discovery_agent_metrics` (host:port; one on
    a loopback address cannot be scraped from here, and is not); reached over SSH as `ansible_user` (root).
    The operator's identity comes from the client config (`discovery ca issue`). A fault is a command run on
    a host: `systemctl` for kill, poweroff and start (`discovery_campaign_kill`, `discovery_campaign_poweroff`,
    `discovery_campaign_start` override them; a poweroff SIGKILLs the agent, libvirtd and every guest's QEMU,
    not the machine, so that `start` can bring it back), an nftables table dropping the other side's addresses
    for a partition, removed by heal."""

    def __init__(self, inventory: Path, client_config: str | None) -> None:
        try:
            hosts = _inventory_hosts(yaml.safe_load(inventory.read_text()))
        except (OSError, yaml.YAMLError) as err:
            raise TargetError(f"{inventory}: {err}") from None
        if not hosts:
            raise TargetError(f"{inventory}: no hosts under all.hosts or its groups")
        self.vars = hosts
        self.nodes = []
        for name, var in sorted(hosts.items()):
            host = str(var.get("discovery_agent_address", var.get("ansible_host", name)))
            metrics = str(var.get("discovery_agent_metrics", ""))
            self.nodes.append(Node(name, str(var.get("discovery_agent_site", "default")),
                                   f"{host}:{var.get('discovery_agent_port', AGENT_PORT)}",
                                   "" if metrics.startswith(("127.", "localhost", "[::1]")) else metrics))
        self.identity = load_client_config(client_config).identity
        self.cut: list[str] = []

    def kill(self, node: str) -> None:
        self._ssh(node, str(self.vars[node].get("discovery_campaign_kill",
                                                "systemctl kill --signal=SIGKILL discovery-agent")))

    def poweroff(self, node: str) -> None:
        self._ssh(node, str(self.vars[node].get("discovery_campaign_poweroff", POWEROFF)))

    def start(self, node: str) -> None:
        self._ssh(node, str(self.vars[node].get("discovery_campaign_start", START)))

    def partition(self, target: str) -> None:
        """Cut `target` (a node, or every node of a site) off the others: each side drops the other's packets."""
        inside = [n for n in self.nodes if target in (n.name, n.site)]
        if not inside:
            raise TargetError(f"no node or site {target!r}")
        outside = [n for n in self.nodes if n not in inside]
        for side, others in ((inside, outside), (outside, inside)):
            addresses = ", ".join(sorted({split_addr(n.addr)[0] for n in others}))
            for node in side:
                self._ssh(node.name, "nft -f -", stdin=_drop_table(addresses))
                self.cut.append(node.name)

    def heal(self) -> None:
        for name in sorted(set(self.cut)):
            self._ssh(name, f"nft delete table inet {PARTITION_TABLE}", check=False)
        self.cut = []

    def close(self) -> None:
        with contextlib.suppress(TargetError):
            self.heal()

    def _ssh(self, node: str, command: str, stdin: str = "", check: bool = True) -> None:
        var = self.vars.get(node)
        if var is None:
            raise TargetError(f"no host {node!r} in the inventory")
        host = str(var.get("ansible_host", node))
        argv = ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "LogLevel=ERROR", *(("-i", str(var["ansible_ssh_private_key_file"]))
                                          if "ansible_ssh_private_key_file" in var else ()),
                "-p", str(var.get("ansible_port", 22)), f"{var.get('ansible_user', 'root')}@{host}", command]
        try:
            done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=SSH_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise TargetError(f"{node}: {shlex.join(argv[-1:])}: no answer within {SSH_TIMEOUT:g} s") from None
        if check and done.returncode != 0:
            why = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
            raise TargetError(f"{node}: {command}: {why}")


PARTITION_TABLE = "discovery_campaign"
POWEROFF = "systemctl kill --signal=SIGKILL discovery-agent.service libvirtd.service 'machine-qemu*.scope'"
START = "systemctl start libvirtd.service discovery-agent.service"


def _drop_table(addresses: str) -> str:
    return (f"table inet {PARTITION_TABLE} {{\n"
            f"  chain input {{\n    type filter hook input priority 0;\n    ip saddr {{ {addresses} }} drop\n  }}\n"
            f"  chain output {{\n    type filter hook output priority 0;\n    ip daddr {{ {addresses} }} drop\n  }}\n"
            "}\n")


def _inventory_hosts(inventory: Any) -> dict[str, dict[str, Any]]:
    """Every host of a YAML inventory with its variables (the group's `vars`, then its own)."""
    found: dict[str, dict[str, Any]] = {}

    def walk(group: Any, inherited: dict[str, Any]) -> None:
        if not isinstance(group, dict):
            return
        scope = {**inherited, **(group.get("vars") or {})}
        for name, var in (group.get("hosts") or {}).items():
            found[str(name)] = {**scope, **found.get(str(name), {}), **(var or {})}
        for child in (group.get("children") or {}).values():
            walk(child, scope)

    if isinstance(inventory, dict):
        for group in inventory.values():
            walk(group, {})
    return found
