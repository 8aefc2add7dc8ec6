"""Configuration files: `agent.toml` for an agent, `client.toml` for the CLI.

agent.toml:
    name = "node1"
    site = "rennes"
    listen = "127.0.0.1:7001"
    join = ["127.0.0.1:7002"]
    data_dir = "/var/lib/discovery"
    libvirt_uri = ""                    # empty: embedded test:/// host sized by [capacity]
    hypervisor = "test"                 # or "qemu": real tiny guests, on the node's own libvirtd
                                        # (libvirt_uri empty) or embedded (libvirt_uri = "qemu:///embed")
    libvirtd_port = 0                   # qemu: its libvirtd's TCP port on 127.0.0.1 (0: a free one)
    migration_ports = [49200, 49215]    # qemu: its live-migration port range (omitted: derived)
    kademlia = true                     # run Kademlia beside Chord (`discovery overlay bind`)
    kad_port = 0                        # its UDP port; 0 picks a free one
    [capacity]  vcpus = 16, memory_mb = 32768, disk_gb = 500
    [tls]       ca = "...", cert = "...", key = "..."
    [latency.rtt_ms]                    # optional emulated WAN: site -> site -> RTT in ms
    rennes = { lyon = 12.0 }
    [dvms]                              # optional; the defaults below (discovery.dvms_service)
    injector_rate = 0.0                 # λ: CPU demand changes per VM per second (test driver); 0: none
    injector_mean = 70.0                # each change draws from N(mean, std), percent of one vCPU
    injector_std = 30.0
    seed = 0                            # of the injector's per-VM streams
    overload = 1.0                      # node overloaded above this fraction of its capacity ...
    overload_clear = 0.9                # ... until below this one (a plan must bring it there)
    underload = 0.0                     # consolidation: a node below this (0: never) for underload_dwell
    underload_clear = 0.3               #   seconds is emptied onto others; it is normal again from here
    underload_dwell = 60.0
    retry = 5.0                         # seconds before a node still in trouble starts a partition again

client.toml (written by `discovery cluster up`, or by hand):
    agent = "127.0.0.1:7001"            # default agent
    [nodes]  node1 = "127.0.0.1:7001"   # lets `--agent node1` name an agent
    [tls]    ca = "...", cert = "...", key = "..."

The CLI finds its client config at --config, else $DISCOVERY_CONFIG, else
$DISCOVERY_HOME/client.toml (default ~/.config/discovery/client.toml). An agent.toml works too.
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from agents.capacity import Resources
from agents.node import AgentConfig
from dvms.monitor import Thresholds
from dvms.workload import MEAN, STD
from overlay import tls
from overlay.rpc import split_addr


class ConfigError(Exception):
    """A configuration file is missing, unreadable or wrong; the message names file and field."""


def home() -> Path:
    return Path(os.environ.get("DISCOVERY_HOME", Path.home() / ".config" / "discovery"))


def _read(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror or err}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None


def _field(data: dict[str, Any], key: str, kind: type, path: Path, default: Any = ..., where: str = "") -> Any:
    name = f"{where}{key}"
    if key not in data:
        if default is ...:
            raise ConfigError(f"{path}: missing field {name!r}")
        return default
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{path}: field {name!r} must be {kind.__name__}, got {value!r}")
    return value


def _address(value: Any, path: Path, name: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{path}: field {name!r}: expected a host:port string, got {value!r}")
    try:
        split_addr(value)
    except ValueError as err:
        raise ConfigError(f"{path}: field {name!r}: {err}") from None
    return value


def _identity(data: dict[str, Any], path: Path) -> tls.Identity:
    section = _field(data, "tls", dict, path)
    base = path.parent
    files = {k: base / _field(section, k, str, path, where="tls.") for k in ("ca", "cert", "key")}
    return tls.Identity(cert=files["cert"], key=files["key"], ca=files["ca"])


@dataclass(frozen=True)
class DvmsSettings:
    """The `[dvms]` table of agent.toml (module doc): the load injector and the monitor's thresholds."""

    injector_rate: float = 0.0
    injector_mean: float = MEAN
    injector_std: float = STD
    seed: int = 0
    overload: float = Thresholds.overload
    overload_clear: float = Thresholds.overload_clear
    underload: float = 0.0  # consolidation moves VMs for no overload: off unless asked for
    underload_clear: float = Thresholds.underload_clear
    underload_dwell: float = Thresholds.underload_dwell
    retry: float = 5.0

    def thresholds(self) -> Thresholds:
        return Thresholds(overload=self.overload, overload_clear=self.overload_clear, underload=self.underload,
                          underload_clear=self.underload_clear, underload_dwell=self.underload_dwell)


def dvms_settings(table: dict[str, Any], path: Path | str) -> DvmsSettings:
    """A `[dvms]` table checked field by field; ConfigError naming the first bad one (also for unknown keys,
    so that a misspelt threshold is not silently the default)."""
    known = [f.name for f in fields(DvmsSettings)]
    for key in table:
        if key not in known:
            raise ConfigError(f"{path}: unknown field 'dvms.{key}' (known: {', '.join(known)})")
    values: dict[str, Any] = {}
    for key, value in table.items():
        integer = key == "seed"
        if (isinstance(value, bool) or not isinstance(value, int if integer else int | float)
                or not math.isfinite(value)):
            raise ConfigError(f"{path}: field 'dvms.{key}' must be {'an integer' if integer else 'a number'}, "
                              f"got {value!r}")
        values[key] = value if integer else float(value)
    s = DvmsSettings(**values)
    rules = [  # (field, holds, what it must be); ordered so that the field named is the one to fix
        ("injector_rate", s.injector_rate >= 0, ">= 0 (0: no injector)"),
        ("injector_mean", s.injector_mean >= 0, ">= 0"),
        ("injector_std", s.injector_std > 0, "> 0"),
        ("overload", s.overload > 0, "> 0"),
        ("overload_clear", 0 < s.overload_clear <= s.overload, f"in (0, overload = {s.overload:g}]"),
        ("underload", 0 <= s.underload <= s.underload_clear,
         f"in [0, underload_clear = {s.underload_clear:g}] (0: no consolidation)"),
        ("underload_clear", s.underload_clear <= s.overload_clear, f"<= overload_clear = {s.overload_clear:g}"),
        ("underload_dwell", s.underload_dwell >= 0, ">= 0 (seconds)"),
        ("retry", s.retry > 0, "> 0 (seconds)"),
    ]
    for key, holds, must in rules:
        if not holds:
            raise ConfigError(f"{path}: field 'dvms.{key}' must be {must}, got {getattr(s, key)!r}")
    return s


def load_agent_config(path: Path) -> AgentConfig:
    data = _read(path)
    cap = _field(data, "capacity", dict, path)
    capacity = Resources(*(_field(cap, k, int, path, where="capacity.") for k in ("vcpus", "memory_mb", "disk_gb")))
    if capacity.vcpus < 1 or capacity.memory_mb < 64 or capacity.disk_gb < 0:
        raise ConfigError(f"{path}: capacity must have at least 1 vCPU and 64 MiB")
    joins = _field(data, "join", list, path, [])
    rtt = _field(_field(data, "latency", dict, path, {}), "rtt_ms", dict, path, {}, where="latency.")
    try:
        site_rtt = {a: {b: float(ms) for b, ms in row.items()} for a, row in rtt.items()}
    except (AttributeError, TypeError, ValueError):
        raise ConfigError(f"{path}: latency.rtt_ms must map site -> site -> milliseconds") from None
    data_dir = Path(_field(data, "data_dir", str, path))
    hypervisor = _field(data, "hypervisor", str, path, "test")
    if hypervisor not in ("test", "qemu"):
        raise ConfigError(f"{path}: field 'hypervisor' must be \"test\" or \"qemu\", got {hypervisor!r}")
    migration = _field(data, "migration_ports", list, path, [0, 0])
    if not (len(migration) == 2 and all(isinstance(p, int) and 0 <= p < 65536 for p in migration)
            and migration[0] <= migration[1]):
        raise ConfigError(f"{path}: field 'migration_ports' must be [low, high] TCP ports, got {migration!r}")
    dvms = dvms_settings(_field(data, "dvms", dict, path, {}), path)
    if dvms.injector_rate > 0 and hypervisor != "test":
        raise ConfigError(f"{path}: field 'dvms.injector_rate' needs hypervisor \"test\": the demand of real "
                          "guests is measured")
    return AgentConfig(
        name=_field(data, "name", str, path),
        site=_field(data, "site", str, path, "default"),
        listen=_address(_field(data, "listen", str, path), path, "listen"),
        data_dir=data_dir if data_dir.is_absolute() else path.parent / data_dir,
        identity=_identity(data, path),
        capacity=capacity,
        join=[_address(j, path, "join") for j in joins],
        libvirt_uri=_field(data, "libvirt_uri", str, path, ""),
        hypervisor=hypervisor,
        libvirtd_port=_field(data, "libvirtd_port", int, path, 0),
        migration_ports=(migration[0], migration[1]),
        site_rtt_ms=site_rtt,
        replicas=_field(data, "replicas", int, path, 3),
        kademlia=_field(data, "kademlia", bool, path, True),
        kad_port=_field(data, "kad_port", int, path, 0),
        extra={"dvms": dvms},
    )


@dataclass
class ClientConfig:
    identity: tls.Identity
    agent: str = ""
    nodes: dict[str, str] = field(default_factory=dict)

    def resolve(self, agent: str | None) -> str:
        """An agent given as host:port or as a node name known to this config."""
        target = agent or self.agent
        if not target:
            raise ConfigError("no agent given: use --agent HOST:PORT (or NODE) or set 'agent' in the client config")
        if target in self.nodes:
            return self.nodes[target]
        try:
            split_addr(target)
        except ValueError:
            known = ", ".join(sorted(self.nodes)) or "none"
            raise ConfigError(f"unknown agent {target!r}: not host:port nor a known node ({known})") from None
        return target


def client_config_path(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    if os.environ.get("DISCOVERY_CONFIG"):
        return Path(os.environ["DISCOVERY_CONFIG"])
    return home() / "client.toml"


def load_client_config(explicit: str | None) -> ClientConfig:
    path = client_config_path(explicit)
    if not path.exists():
        raise ConfigError(f"{path}: no client config; start a cluster with 'discovery cluster up' "
                          "or pass --config FILE")
    data = _read(path)
    nodes = _field(data, "nodes", dict, path, {})
    agent = _field(data, "agent", str, path, "") or _field(data, "listen", str, path, "")
    return ClientConfig(identity=_identity(data, path), agent=agent,
                        nodes={k: v for k, v in nodes.items() if isinstance(v, str)})
