"""A local multi-site cluster: N real agent processes on loopback (or each in a network namespace of its own),
a generated CA, emulated WAN latency.

`up` writes everything under one directory (CA, per-node config, data, logs, `cluster.json` with the
PIDs) and `down` stops exactly the processes listed there, after checking each PID still runs that
cluster's agent, so a recycled PID is never signalled.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from agents.config import SYSTEM_LIBVIRT
from discovery.agent_config import load_agent_config
from discovery.cli.config import ClientConfig, home
from discovery.toml_config import ConfigError
from overlay.wire import tls
from overlay.wire.ca import init_ca, issue
from overlay.wire.rpc import RequestError, RpcError, Transport, free_ports
from overlay.wire.wan import SITES, rtt_matrix

STATE_FILE = "cluster.json"
HYPERVISORS = ("test", "qemu", "qemu-embed", "qemu-system")
"""libvirt's test driver; real guests on a libvirtd per node, started by its agent; real guests on the QEMU
driver embedded in each agent (no daemon, so VMs move by save → ship → restore); real guests on the system
libvirtd of each node's host (only with network namespaces: each node is then a host of its own, a mount
namespace too, where its system daemon starts before its agent)."""
MIGRATION_PORTS = 49200
"""The first node's live-migration ports (16 per node) with --hypervisor qemu."""
LIBVIRTD_PORT, SYSTEM_MIGRATION_PORTS = 16509, (49152, 49215)
"""libvirt's defaults for a system daemon: its TCP listener, and the ports its migrations arrive on."""
SYSTEM_DATA = "/var/lib/discovery"
"""Where each host of `qemu-system` keeps its agent's data: the same path on every host, as live migration
between system daemons needs (`agents.hypervisor.qemu`); outside the hosts, each node's `data` directory."""
TINY_IMAGE = "tiny"
"""The image real-guest clusters boot unless a VM names another: the tiny guest's disk (`images.tinyguest`)."""
NETNS_PORT = 7000
"""The port each agent listens on when it has a network namespace (and so an address) of its own."""


class ClusterError(Exception):
    """A one-line reason the cluster command could not do what was asked."""


def _toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)  # strings and numbers: JSON and TOML agree


def _write_toml(path: Path, top: dict[str, Any], tables: dict[str, dict[str, Any]]) -> None:
    lines = [f"{k} = {_toml_value(v)}" for k, v in top.items()]
    for name, table in tables.items():
        lines += ["", f"[{name}]"] + [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")


def _running(pid: int, config: str) -> bool:
    """True if `pid` is alive and still the agent started with `config` (guards against PID reuse)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return config.encode() in cmdline


def load_state(directory: Path, what: str = "cluster", file: str = STATE_FILE) -> dict[str, Any]:
    """The state `up` wrote in `directory` (a cluster's, or another `what` kept in `file`); ClusterError in one line."""
    try:
        return json.loads((directory / file).read_text())
    except FileNotFoundError:
        raise ClusterError(f"no {what} in {directory} (no {file})") from None
    except (OSError, ValueError) as err:
        raise ClusterError(f"{directory / file}: unreadable: {err}") from None


def dvms_table(pairs: list[str]) -> dict[str, Any]:
    """`--dvms KEY=VALUE` options as a `[dvms]` table (values in TOML: 0.05, 7, true); checked by `up`."""
    table = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        try:
            if not (sep and key.strip()):
                raise ValueError("not KEY=VALUE")
            table[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
        except (ValueError, tomllib.TOMLDecodeError) as err:
            raise ClusterError(f"--dvms {pair!r}: {err}") from None
    return table


def up(directory: Path, nodes: int, sites: int, vcpus: int = 16, memory_mb: int = 32768, disk_gb: int = 500,
       wait: float = 60.0, local_rtt_ms: float = 0.0, hypervisor: str = "test",
       dvms: dict[str, Any] | None = None, netns: Sequence[tuple[str, str]] = (),
       site_names: Sequence[str] | None = None, emulate_wan: bool = True, image_copies: int = 3) -> dict[str, Any]:
    """Start the agents; with `hypervisor` "qemu", each runs real guests on a libvirtd of its own (the tiny
    guest is built and the accelerator chosen here first, once for all of them, and the tiny guest is then
    imported as image TINY_IMAGE, held by `image_copies` nodes: the others pull it when they need it).
    `dvms` is the `[dvms]` table of every agent.toml (discovery.scheduler.settings); each file is checked before
    its agent starts.
    With `netns`, node i runs inside network namespace `netns[i][0]` (`ip netns exec`, as root) and listens on its
    address `netns[i][1]`, port NETNS_PORT (its metrics on NETNS_PORT + 1); the caller must reach those addresses
    (it waits for the agents to converge), e.g. from a namespace on their bridge (`benchmarks/netns.py`) or
    through the testbed's router (`discovery.testbed`). `site_names` (default: the first `sites` of wan.SITES)
    name the sites; without `emulate_wan` the agents add no per-frame delay (the testbed's router delays the
    packets themselves)."""
    if not 1 <= nodes <= 256:
        raise ClusterError("--nodes must be between 1 and 256")
    if hypervisor not in HYPERVISORS:
        raise ClusterError(f"--hypervisor must be one of {', '.join(HYPERVISORS)}")
    if hypervisor != "test" and nodes > 16:
        raise ClusterError("--hypervisor qemu runs at most 16 nodes (one libvirtd and real guests each)")
    if site_names is None and not 1 <= sites <= min(nodes, len(SITES)):
        raise ClusterError(f"--sites must be between 1 and {min(nodes, len(SITES))}")
    if netns and (len(netns) != nodes or hypervisor not in ("test", "qemu-system")):
        raise ClusterError("network namespaces: one per node, with hypervisor test or qemu-system")
    if not 1 <= image_copies <= 16:
        raise ClusterError("--image-copies must be between 1 and 16")
    if hypervisor == "qemu-system" and not netns:
        raise ClusterError("--hypervisor qemu-system needs a host per node: the testbed ('discovery testbed up')")
    directory = directory.resolve()
    if (directory / STATE_FILE).exists():
        state = load_state(directory)
        if any(_running(n["pid"], n["config"]) for n in state["nodes"]):
            raise ClusterError(f"a cluster is already running in {directory}; 'discovery cluster down --dir "
                               f"{directory}' first")
    directory.mkdir(parents=True, exist_ok=True)
    ca_dir = directory / "ca"
    if not (ca_dir / "ca.key").exists():
        init_ca(ca_dir)
    site_names = list(site_names) if site_names is not None else SITES[:sites]
    ports = free_ports(3 * nodes)  # the agents', their libvirtds' (qemu), their metrics endpoints'
    addrs = [f"{a}:{NETNS_PORT}" for _, a in netns] or [f"127.0.0.1:{p}" for p in ports[:nodes]]
    metrics = [f"{a}:{NETNS_PORT + 1}" for _, a in netns] or [f"127.0.0.1:{p}" for p in ports[2 * nodes:]]
    qemu: dict[str, Any] = {}
    tiny = _prepare_guests() if hypervisor != "test" else None
    if not 0 <= local_rtt_ms <= 1000:
        raise ClusterError("--local-rtt-ms must be between 0 and 1000")
    matrix = rtt_matrix(site_names, local_rtt_ms) if emulate_wan else {}
    started: list[dict[str, Any]] = []
    try:
        for i in range(nodes):
            name, site = f"node{i + 1}", site_names[i % sites]
            node_dir = directory / name
            node_dir.mkdir(exist_ok=True)
            ident = issue(ca_dir, name, "node", out_dir=node_dir)
            config = node_dir / "agent.toml"
            if hypervisor == "qemu":
                low = MIGRATION_PORTS + 16 * i
                qemu = {"hypervisor": "qemu", "libvirtd_port": ports[nodes + i], "migration_ports": [low, low + 15]}
            elif hypervisor == "qemu-embed":
                qemu = {"hypervisor": "qemu", "libvirt_uri": "qemu:///embed"}  # agents.hypervisor.qemu.EMBED
            elif hypervisor == "qemu-system":
                qemu = {"hypervisor": "qemu", "libvirt_uri": SYSTEM_LIBVIRT}
            data_dir = SYSTEM_DATA if hypervisor == "qemu-system" else str(node_dir / "data")
            _write_toml(config, {
                "name": name, "site": site, "listen": addrs[i], "data_dir": data_dir,
                "join": [a for a in addrs[:3] if a != addrs[i]], "metrics": metrics[i], **qemu,
            }, {"capacity": {"vcpus": vcpus, "memory_mb": memory_mb, "disk_gb": disk_gb},
                "tls": {"ca": str(ident.ca), "cert": str(ident.cert), "key": str(ident.key)},
                **({"latency.rtt_ms": matrix} if matrix else {}), **({"dvms": dvms} if dvms else {})})
            try:
                load_agent_config(config)
            except ConfigError as err:
                raise ClusterError(str(err)) from None
            agent = [sys.executable, "-m", "discovery.agent", "--config", str(config)]
            if hypervisor == "qemu-system":
                agent = _host(node_dir / "data", netns[i][1], agent)
            where = ["ip", "netns", "exec", netns[i][0]] if netns else []  # it execs: the PID is the agent's
            started.append({"name": name, "site": site, "addr": addrs[i], "metrics": metrics[i],
                            "pid": _launch([*where, *agent], node_dir), "config": str(config),
                            "command": [*where, *agent]})
    except BaseException:
        _stop(started)
        raise
    operator = issue(ca_dir, "operator", "operator", out_dir=directory)
    state = {"dir": str(directory), "nodes": started, "sites": site_names, "rtt_ms": matrix, "hypervisor": hypervisor,
             "client_config": str(directory / "client.toml")}
    (directory / STATE_FILE).write_text(json.dumps(state, indent=2))
    client = {"agent": addrs[0]}
    tables = {"nodes": {n["name"]: n["addr"] for n in started},
              "tls": {"ca": str(operator.ca), "cert": str(operator.cert), "key": str(operator.key)}}
    _write_toml(directory / "client.toml", client, tables)
    home().mkdir(parents=True, exist_ok=True)
    _write_toml(home() / "client.toml", client, tables)
    ready = trio.run(wait_converged, _client(directory), addrs, nodes, wait)
    if not ready:
        raise ClusterError(f"agents did not agree on {nodes} members within {wait:g}s; see {directory}/node*/agent.log")
    if tiny is not None:
        trio.run(_import, _client(directory), addrs, tiny, TINY_IMAGE, min(image_copies, nodes), wait)
        state["images"] = [TINY_IMAGE]
    return state


def _host(data: Path, address: str, agent: list[str]) -> list[str]:
    """`agent` run on a host of its own, as an operator runs one: the host's system libvirtd (started first, in
    the host's mount namespace, listening on `address` at libvirt's default ports) and the agent's data at
    SYSTEM_DATA. The daemon's state is where a node's own daemon keeps it, so `down` ends it and its guests."""
    from agents.hypervisor.libvirtd import Libvirtd  # libvirt: only for real guests
    from agents.hypervisor.qemu import libvirt_root

    daemon = Libvirtd(libvirt_root(data, ""), LIBVIRTD_PORT, SYSTEM_MIGRATION_PORTS, address)
    return daemon.as_system(agent, {data: SYSTEM_DATA})


def _launch(command: list[str], node_dir: Path) -> int:
    """Start a node's agent (`command`), logging to its agent.log, in a session of its own; its PID."""
    with open(node_dir / "agent.log", "ab") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True).pid


def kill(directory: Path, name: str) -> dict[str, Any]:
    """Power node `name` off: SIGKILL its agent and, with real guests, its libvirtd and its guests (what a host
    that loses power loses; its disk stays). ClusterError if there is no such node or it is not running."""
    from agents.hypervisor.qemu import end_leftovers

    node = crash(directory, name)
    end_leftovers(Path(node["config"]).parent / "data")
    return node


def crash(directory: Path, name: str) -> dict[str, Any]:
    """SIGKILL node `name`'s agent alone, with its process group (what `systemctl kill` of its unit reaches: its
    DHCP servers too); with real guests, its libvirtd and guests live on, as on a host whose agent crashed.
    With the test driver the guests live in the agent: `kill` and `crash` end the same things."""
    state, node = _node(directory, name)
    if not _running(node["pid"], node["config"]):
        raise ClusterError(f"{name} is not running")
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(node["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while _running(node["pid"], node["config"]) and time.monotonic() < deadline:
        _reap([node])
        time.sleep(0.05)
    return node


def start(directory: Path, name: str) -> dict[str, Any]:
    """Start node `name`'s agent again, as `up` started it (its config and data kept; a host's libvirtd that
    outlived a `crash` is kept too); ClusterError if it runs."""
    state, node = _node(directory, name)
    if _running(node["pid"], node["config"]):
        raise ClusterError(f"{name} is running (pid {node['pid']})")
    if "command" not in node:
        raise ClusterError(f"{name} was started by an older 'cluster up': stop the cluster and start it again")
    node["pid"] = _launch(node["command"], Path(node["config"]).parent)
    (Path(state["dir"]) / STATE_FILE).write_text(json.dumps(state, indent=2))
    return node


def _node(directory: Path, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    state = load_state(directory.resolve())
    node = next((n for n in state["nodes"] if n["name"] == name), None)
    if node is None:
        raise ClusterError(f"no node {name!r} in {directory} (nodes: {', '.join(n['name'] for n in state['nodes'])})")
    return state, node


def _prepare_guests() -> Path:
    """Build the tiny guest and pick the accelerator once, before the agents all want them; the guest's disk."""
    from agents.hypervisor.qemu import BackendError, prepare_guest  # libvirt: only for real guests

    try:
        return prepare_guest()[0].base
    except BackendError as err:
        raise ClusterError(f"--hypervisor qemu: {err}") from None


async def _import(client: ClientConfig, addrs: list[str], disk: Path, name: str, copies: int, wait: float) -> None:
    """Catalogue `disk` as image `name` through the first agent, kept on `copies` holders, and wait until every
    agent finds it in the catalogue (a ring still settling may route a read elsewhere for a moment)."""
    from images.transfer import upload  # zstandard and the chunker: only when there is an image to import

    async with Transport(client.identity, node="cli") as transport:
        try:
            await upload(transport, addrs[0], disk, name, copies)
        except (RpcError, RequestError) as err:
            raise ClusterError(f"cannot import the tiny guest as image {name!r}: {err}") from None
        with trio.move_on_after(wait):
            while True:
                answers = await transport.call_many(addrs, "image.show", {"name": name}, 5.0)
                if all(isinstance(answer, dict) for answer in answers.values()):
                    return
                await trio.sleep(0.3)
        raise ClusterError(f"image {name!r} imported, but not every agent finds it within {wait:g}s")


def _client(directory: Path) -> ClientConfig:
    ca = directory / "ca" / "ca.pem"
    return ClientConfig(tls.Identity(cert=directory / "operator.pem", key=directory / "operator.key", ca=ca))


async def wait_converged(client: ClientConfig, addrs: list[str], nodes: int, wait: float) -> bool:
    """Wait until every agent sees every other as alive and has measured its RTT to it."""

    def converged(addr: str, members: object) -> bool:
        return isinstance(members, list) and sum(
            m["status"] == "alive" and (m["rtt_ms"] is not None or m["addr"] == addr) for m in members) == nodes

    async with Transport(client.identity, node="cli") as transport:
        with trio.move_on_after(wait):
            while True:
                answers = await transport.call_many(addrs, "agent.members", {}, 2.0)
                if all(converged(addr, members) for addr, members in answers.items()):
                    return True
                await trio.sleep(0.3)
    return False


def status(directory: Path) -> list[dict[str, Any]]:
    state = load_state(directory.resolve())
    client = _client(directory.resolve())

    async def ask() -> dict[str, Any]:
        async with Transport(client.identity, node="cli") as transport:
            return await transport.call_many([n["addr"] for n in state["nodes"]], "agent.status", {}, 3.0)

    answers = trio.run(ask)
    rows = []
    for node in state["nodes"]:
        answer = answers.get(node["addr"])
        info = answer if isinstance(answer, dict) else None  # else the error the call raised
        rows.append({**node, "process": "running" if _running(node["pid"], node["config"]) else "gone",
                     "answers": info is not None,
                     "successor": info["successors"][0] if info is not None and info["successors"] else None,
                     "records": info["records"] if info is not None else None,
                     "error": None if info is not None else str(answer)})
    return rows


def down(directory: Path) -> list[str]:
    """Stop every agent of the cluster in `directory`; returns the names that were stopped."""
    state = load_state(directory.resolve())
    stopped = _stop(state["nodes"])
    client_default = home() / "client.toml"
    with contextlib.suppress(OSError):
        if str(directory.resolve()) in client_default.read_text():
            client_default.unlink()
    return stopped


def _stop(nodes: list[dict[str, Any]], grace: float = 10.0) -> list[str]:
    """SIGTERM each agent's process group, wait, then SIGKILL what is left."""
    from agents.hypervisor.qemu import end_leftovers  # libvirt's pid files; not on the CLI's start path

    live = [n for n in nodes if _running(n["pid"], n["config"])]
    for node in live:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(node["pid"], signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_running(n["pid"], n["config"]) for n in live):
        _reap(live)
        time.sleep(0.1)
    for node in live:
        if _running(node["pid"], node["config"]):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(node["pid"], signal.SIGKILL)
    _reap(live)
    for node in nodes:  # real guests and their daemons outlive the agents, by design: end them too
        end_leftovers(Path(node["config"]).parent / "data")
    return [n["name"] for n in live]


def _reap(nodes: list[dict[str, Any]]) -> None:
    """Collect the agents that are our own exited children (when `up` and `down` share a process)."""
    for node in nodes:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(node["pid"], os.WNOHANG)
