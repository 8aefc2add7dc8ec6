"""The RPCs an agent serves itself, below the VE layer: what it knows of the cluster (`agent.*`,
`member.ping`, `coord.*`, `spiral.*`), the overlays and `kv` (`overlay.*`), and its host (`host.*`).

Who may call what:
- agents only: membership, coordinate probes, spiral steps, the re-bind protocol's own steps, and every
  `host.*` method but `host.info` (a user acts on VMs through `ve.*`, which checks ownership);
- anyone with a certificate: read-only views (`agent.status`, `coord.list`, `spiral.search`...) and
  `overlay.get`/`overlay.put` (`kv`: each writer has its own keys, `agents.overlays`);
- operators only: `overlay.bind`, which moves the whole cluster's records to another overlay.
Operators may also call `host.*` directly, as they could run `virsh` on the node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from overlay.messages import NoArgs
from overlay.wire.codec import limit
from overlay.wire.rpc import AGENTS, ANYONE, NODE, OPERATOR, OPERATORS, Method

HOSTS = frozenset({NODE, OPERATOR})
NAME = 200
"""Longest VM (domain) name a host accepts."""


@dataclass(frozen=True)
class Gossip:
    """A SWIM probe: the whole member table, or the piggybacked updates (`overlay.membership`)."""

    members: list[Any] | None = None
    updates: list[Any] | None = None


@dataclass(frozen=True)
class Rtt:
    a: str = field(metadata=limit(NAME))
    b: str | None = field(default=None, metadata=limit(NAME))


@dataclass(frozen=True)
class Probe:
    target: str = field(metadata=limit(NAME))


@dataclass(frozen=True)
class SpiralStep:
    view: Any = None


@dataclass(frozen=True)
class SpiralSearch:
    count: int = 5
    site: str | None = field(default=None, metadata=limit(NAME))


@dataclass(frozen=True)
class OverlayName:
    overlay: Any = None


@dataclass(frozen=True)
class OverlaySwitch:
    overlay: Any
    epoch: int


@dataclass(frozen=True)
class OverlayScan:
    overlay: Any
    prefix: str = field(metadata=limit(1024))


@dataclass(frozen=True)
class KvGet:
    key: Any
    overlay: str | None = None
    owner: str | None = field(default=None, metadata=limit(NAME))


@dataclass(frozen=True)
class KvPut:
    key: Any
    value: Any = None
    overlay: str | None = None


@dataclass(frozen=True)
class VmName:
    name: Any


@dataclass(frozen=True)
class Reserve:
    name: Any
    vcpus: Any
    memory_mb: Any
    disk_gb: Any


@dataclass(frozen=True)
class Confirm:
    token: Any
    xml: str | None = None
    state: Any = "running"
    snapshots: list[Any] | None = None
    ship: dict[str, Any] | None = None


@dataclass(frozen=True)
class Release:
    token: Any = None


@dataclass(frozen=True)
class Vm:
    name: Any
    action: Any
    state: Any = None
    timeout: Any = None


@dataclass(frozen=True)
class Snapshot:
    name: Any
    tag: Any
    state: Any = None


@dataclass(frozen=True)
class SnapshotTag:
    name: Any
    tag: Any


@dataclass(frozen=True)
class Export:
    name: Any
    freeze: bool = False
    ship: bool = False
    copy: bool = False


@dataclass(frozen=True)
class Fetch:
    name: Any
    part: Any
    offset: Any


@dataclass(frozen=True)
class Migrate:
    name: Any
    uri: Any


@dataclass(frozen=True)
class Standby:
    name: Any
    token: Any = None
    xml: Any = None
    taken: Any = None
    snapshots: list[Any] | None = None
    ship: dict[str, Any] | None = None


@dataclass(frozen=True)
class Promote:
    name: Any
    state: Any = None


AGENT_STATUS = Method("agent.status", NoArgs, ANYONE)
AGENT_MEMBERS = Method("agent.members", NoArgs, ANYONE)
MEMBER_PING = Method("member.ping", Gossip, AGENTS)
COORD_PING = Method("coord.ping", NoArgs, AGENTS)
COORD_LIST = Method("coord.list", NoArgs, ANYONE)
COORD_RTT = Method("coord.rtt", Rtt, ANYONE)
COORD_PROBE = Method("coord.probe", Probe, AGENTS)
SPIRAL_STEP = Method("spiral.step", SpiralStep, AGENTS)
SPIRAL_SEARCH = Method("spiral.search", SpiralSearch, ANYONE)
OVERLAY_STATUS = Method("overlay.status", NoArgs, ANYONE)
OVERLAY_CONTACT = Method("overlay.contact", NoArgs, AGENTS)
OVERLAY_SCAN = Method("overlay.scan", OverlayScan, HOSTS)  # operators may inspect a shard
OVERLAY_FREEZE = Method("overlay.freeze", OverlayName, AGENTS)
OVERLAY_SWITCH = Method("overlay.switch", OverlaySwitch, AGENTS)
OVERLAY_THAW = Method("overlay.thaw", NoArgs, AGENTS)
OVERLAY_BIND = Method("overlay.bind", OverlayName, OPERATORS)
OVERLAY_GET = Method("overlay.get", KvGet, ANYONE)
OVERLAY_PUT = Method("overlay.put", KvPut, ANYONE)
HOST_RESERVE = Method("host.reserve", Reserve, HOSTS)
HOST_CONFIRM = Method("host.confirm", Confirm, HOSTS)
HOST_RELEASE = Method("host.release", Release, HOSTS)
HOST_VM = Method("host.vm", Vm, HOSTS)
HOST_INFO = Method("host.info", NoArgs, HOSTS)
HOST_SNAPSHOT = Method("host.snapshot", Snapshot, HOSTS)
HOST_RESTORE = Method("host.restore", SnapshotTag, HOSTS)
HOST_SNAPSHOT_DELETE = Method("host.snapshot_delete", SnapshotTag, HOSTS)
HOST_EXPORT = Method("host.export", Export, HOSTS)
HOST_FETCH = Method("host.fetch", Fetch, HOSTS)
HOST_INCOMING = Method("host.incoming", VmName, HOSTS)
HOST_MIGRATE = Method("host.migrate", Migrate, HOSTS)
HOST_RESERVE_STANDBY = Method("host.reserve_standby", Reserve, HOSTS)
HOST_STANDBY = Method("host.standby", Standby, HOSTS)
HOST_UNSTANDBY = Method("host.unstandby", VmName, HOSTS)
HOST_STANDBYS = Method("host.standbys", NoArgs, HOSTS)
HOST_PROMOTE = Method("host.promote", Promote, HOSTS)
