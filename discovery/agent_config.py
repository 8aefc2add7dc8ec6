"""An agent's configuration file, `agent.toml`, read into `agents.config.AgentConfig`.

agent.toml:
    name = "node1"
    site = "rennes"
    listen = "127.0.0.1:7001"           # where it binds; a wildcard (0.0.0.0) needs advertise
    advertise = "10.0.0.5"              # optional: the host peers reach it at (agent, libvirtd, migrations)
    join = ["127.0.0.1:7002"]
    data_dir = "/var/lib/discovery"
    libvirt_uri = ""                    # empty: embedded test:/// host sized by [capacity]
    hypervisor = "test"                 # or "qemu": real guests, on the host's system libvirtd (libvirt_uri =
                                        # "qemu:///system"), the node's own (empty) or embedded ("qemu:///embed")
    migration_uri = ""                  # qemu:///system: the URI peers migrate to (qemu+tcp|tls|ssh://);
                                        # empty: qemu+tcp://ADVERTISE/system
    libvirtd_port = 0                   # qemu: its libvirtd's TCP port on the node's host (0: a free one)
    migration_ports = [49200, 49215]    # qemu: its live-migration port range (omitted: derived)
    kademlia = true                     # run Kademlia beside Chord (`discovery overlay bind`)
    kad_port = 0                        # its UDP port; 0 picks a free one
    dataplane = "auto"                  # VE networks in the kernel: "linux", "off", or "auto": linux unless the
                                        # agent's address is a loopback one (agents sharing a namespace)
    metrics = "127.0.0.1:9464"          # Prometheus /metrics over plain HTTP, unauthenticated (agents.metrics):
                                        # port 0 picks a free one (written to data_dir/metrics.addr), "" serves
                                        # none; omitted: 127.0.0.1:0. Bind a routable address only for a scraper.
    [capacity]  vcpus = 16, memory_mb = 32768, disk_gb = 500
    [tls]       ca = "...", cert = "...", key = "..."
    [latency.rtt_ms]                    # optional emulated WAN: site -> site -> RTT in ms
    rennes = { lyon = 12.0 }
    [dvms]                              # optional: DVMS's injector and thresholds (discovery.scheduler.settings)
    [ha]        lease_term = 4.0        # optional: seconds a renewal of this host's HA lease holds
                                        # (discovery.ha.lease); the VMs freeze once it lapses unrenewed

For tests of mixed-version clusters, $DISCOVERY_PROTOCOL ("1" or "1..2") narrows the protocol versions the
agent speaks to part of what this build speaks (`overlay.wire.versions`): an agent narrowed to version 1
is, on the wire, an agent released before version ranges. It is read at start, never widens the range,
and is no agent.toml field: an operator has no reason to set it.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

from agents.config import SYSTEM_LIBVIRT, AgentConfig
from agents.host.capacity import Resources
from agents.messages import MIGRATION_SCHEMES
from discovery.ha.lease import TERM
from discovery.scheduler.settings import dvms_settings
from discovery.toml_config import ConfigError, address, field, identity, read_toml
from overlay.wire.versions import SPOKEN, Versions

PROTOCOL_ENV = "DISCOVERY_PROTOCOL"


WILDCARDS = ("0.0.0.0", "::", "")


def load_agent_config(path: Path) -> AgentConfig:
    data = read_toml(path)
    cap = field(data, "capacity", dict, path)
    capacity = Resources(*(field(cap, k, int, path, where="capacity.") for k in ("vcpus", "memory_mb", "disk_gb")))
    if capacity.vcpus < 1 or capacity.memory_mb < 64 or capacity.disk_gb < 0:
        raise ConfigError(f"{path}: capacity must have at least 1 vCPU and 64 MiB")
    joins = field(data, "join", list, path, [])
    rtt = field(field(data, "latency", dict, path, {}), "rtt_ms", dict, path, {}, where="latency.")
    try:
        site_rtt = {a: {b: float(ms) for b, ms in row.items()} for a, row in rtt.items()}
    except (AttributeError, TypeError, ValueError):
        raise ConfigError(f"{path}: latency.rtt_ms must map site -> site -> milliseconds") from None
    data_dir = Path(field(data, "data_dir", str, path))
    hypervisor = field(data, "hypervisor", str, path, "test")
    if hypervisor not in ("test", "qemu"):
        raise ConfigError(f"{path}: field 'hypervisor' must be \"test\" or \"qemu\", got {hypervisor!r}")
    migration = field(data, "migration_ports", list, path, [0, 0])
    if not (len(migration) == 2 and all(isinstance(p, int) and 0 <= p < 65536 for p in migration)
            and migration[0] <= migration[1]):
        raise ConfigError(f"{path}: field 'migration_ports' must be [low, high] TCP ports, got {migration!r}")
    libvirt_uri = field(data, "libvirt_uri", str, path, "")
    migration_uri = field(data, "migration_uri", str, path, "")
    if migration_uri and not (libvirt_uri == SYSTEM_LIBVIRT and migration_uri.startswith(MIGRATION_SCHEMES)
                              and urlsplit(migration_uri).hostname):
        raise ConfigError(f"{path}: field 'migration_uri' goes with libvirt_uri {SYSTEM_LIBVIRT!r} and names the "
                          f"host's daemon ({', '.join(MIGRATION_SCHEMES)}HOST/system), got {migration_uri!r}")
    dvms = dvms_settings(field(data, "dvms", dict, path, {}), path)
    listen = address(field(data, "listen", str, path), path, "listen")
    advertise = field(data, "advertise", str, path, "")
    if not advertise and listen.rpartition(":")[0].strip("[]") in WILDCARDS:
        raise ConfigError(f"{path}: listen {listen!r} binds every address: set advertise to the one peers reach")
    if advertise and (advertise.strip("[]") in WILDCARDS or (":" in advertise and not advertise.startswith("["))):
        raise ConfigError(f"{path}: field 'advertise' is a host peers can reach (no port, no wildcard; an IPv6 "
                          f"address in brackets), got {advertise!r}")
    lease_term = field(data, "ha", dict, path, {}).get("lease_term", TERM)
    if isinstance(lease_term, bool) or not isinstance(lease_term, (int, float)) or not 1 <= lease_term <= 60:
        raise ConfigError(f"{path}: field 'ha.lease_term' must be seconds between 1 and 60, got {lease_term!r}")
    dataplane = field(data, "dataplane", str, path, "auto")
    if dataplane not in ("auto", "linux", "off"):
        raise ConfigError(f"{path}: field 'dataplane' must be \"auto\", \"linux\" or \"off\", got {dataplane!r}")
    if dvms.injector_rate > 0 and hypervisor != "test":
        raise ConfigError(f"{path}: field 'dvms.injector_rate' needs hypervisor \"test\": the demand of real "
                          "guests is measured")
    return AgentConfig(
        name=field(data, "name", str, path),
        site=field(data, "site", str, path, "default"),
        listen=listen,
        advertise=advertise,
        data_dir=data_dir if data_dir.is_absolute() else path.parent / data_dir,
        identity=identity(data, path),
        capacity=capacity,
        join=[address(j, path, "join") for j in joins],
        libvirt_uri=libvirt_uri,
        migration_uri=migration_uri,
        hypervisor=hypervisor,
        libvirtd_port=field(data, "libvirtd_port", int, path, 0),
        migration_ports=(migration[0], migration[1]),
        site_rtt_ms=site_rtt,
        replicas=field(data, "replicas", int, path, 3),
        kademlia=field(data, "kademlia", bool, path, True),
        kad_port=field(data, "kad_port", int, path, 0),
        protocol=protocol_versions(os.environ.get(PROTOCOL_ENV)),
        metrics=metrics_address(field(data, "metrics", str, path, "127.0.0.1:0"), path),
        dataplane=dataplane,
        extra={"dvms": dvms, "ha_lease_term": float(lease_term)},
    )


def protocol_versions(text: str | None) -> Versions:
    """The versions $DISCOVERY_PROTOCOL narrows the agent to (all this build speaks when unset)."""
    if not text:
        return SPOKEN
    try:
        versions = Versions.parse(text)
    except ValueError as err:
        raise ConfigError(f"${PROTOCOL_ENV}: {err}") from None
    if versions.oldest < SPOKEN.oldest or versions.newest > SPOKEN.newest:
        raise ConfigError(f"${PROTOCOL_ENV}: {versions} is not within what this build speaks ({SPOKEN})")
    return versions


def metrics_address(value: str, path: Path) -> str:
    """agent.toml's `metrics`: "" (no endpoint) or host:port, where port 0 picks a free one."""
    host, sep, port = value.rpartition(":")
    if value and not (sep and host and port.isdigit() and int(port) < 65536):
        raise ConfigError(f"{path}: field 'metrics' must be host:port (port 0: a free one) or \"\", got {value!r}")
    return value
