"""The RPCs an agent serves itself, below the VE layer: what it knows of the cluster (`agent.*`,
`member.ping`, `coord.*`, `spiral.*`), the overlays and `kv` (`overlay.*`), and its host (`host.*`).

Who may call what:
- agents only: membership, coordinate probes, spiral steps, the re-bind protocol's own steps, and every
  `host.*` method but `host.info` (a user acts on VMs through `ve.*`, which checks ownership);
- anyone with a certificate: read-only views (`agent.status`, `coord.list`, `spiral.search`...) and
  `overlay.get`/`overlay.put` (`kv`: each writer has its own keys, `agents.overlays`);
- operators only: `overlay.bind`, which moves the whole cluster's records to another overlay.
Operators may also call `host.*` directly, as they could run `virsh` on the node.

Handlers receive these requests decoded; the values the codec cannot judge (a VM name without '/', a
timeout in bounds, a count in range) the request types check in `__post_init__`, with `agents.host.args`.
Every method declares its answer (a frozen dataclass, or `bool`, `bytes`...): a handler returns it, and a
caller decodes it with `Endpoint.ask`. The protocols' own hops (`member.ping`, `spiral.step`) answer in the
shape their sans-IO cores always sent, each entry of a member table still checked by `overlay.membership`.
One VM's lifecycle is one method
per verb (`host.vm.start`, `host.vm.stop`...), each taking only its own fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from agents.host.args import (
    MAX_BANDWIDTH,
    MAX_NICS,
    MAX_SNAPSHOTS,
    MAX_XML,
    NAME,
    SHUTDOWN_TIMEOUT,
    check_count,
    check_name,
    check_state,
    check_timeout,
    nics_arg,
    xml_name,
)
from agents.host.capacity import Resources
from agents.hypervisor.actor import DomainInfo
from images.messages import check_image_name
from overlay.messages import NoArgs
from overlay.wire.codec import limit, sparse, wire
from overlay.wire.rpc import AGENTS, ANYONE, NODE, OPERATOR, OPERATORS, Method, RequestError

HOSTS = frozenset({NODE, OPERATOR})
MAX_VIEW = 256
"""Longest spiral view or reply: views are tens of entries."""
MAX_SPIRAL = 1000
"""Most nodes one `spiral.search` may ask for."""
MAX_KV_KEY = 512
TOKEN = 1024
IMAGE = 200
"""An image's NAME[:TAG], or its manifest digest."""
"""Longest reservation token (a VM name, or a standby's key, and a number)."""


@dataclass(frozen=True)
class Gossip:
    """A SWIM probe: the whole member table, or the piggybacked updates (each entry checked by
    `overlay.membership`)."""

    members: list[Any] | None = None
    updates: list[Any] | None = None

    def probe(self) -> dict[str, Any]:
        """The probe as `overlay.membership` reads it (as it travels): only the parts sent."""
        return {part: value for part, value in (("members", self.members), ("updates", self.updates))
                if value is not None}


@dataclass(frozen=True)
class GossipReply:
    """A SWIM probe's answer, mirroring the probe: the answerer's name and its table, or its updates."""

    name: str = field(metadata=limit(NAME))
    members: list[Any] | None = field(default=None, metadata=sparse())
    updates: list[Any] | None = field(default=None, metadata=sparse())

    def probe(self) -> dict[str, Any]:
        """The answer as `overlay.membership` reads it (as it travels)."""
        return {"name": self.name, **Gossip(self.members, self.updates).probe()}


@dataclass(frozen=True)
class Rtt:
    a: str = field(metadata=limit(NAME))
    b: str | None = field(default=None, metadata=limit(NAME))


@dataclass(frozen=True)
class Probe:
    target: str = field(metadata=limit(NAME))


@dataclass(frozen=True)
class SpiralStep:
    view: list[Any] = field(metadata=limit(MAX_VIEW))


SpiralHint = tuple[str, str, Any, int, float]
"""A view entry a spiral hop suggests (name, address, coordinate, its sequence) and its estimated distance."""


@dataclass(frozen=True)
class SpiralHop:
    """A spiral hop's answer: the entries of its view the walk should know, its site and free capacity."""

    entries: list[SpiralHint] = field(metadata=limit(MAX_VIEW))
    site: str
    free: dict[str, int]
    """The asker's spiral view, entries as `agents.spiral` writes them (each checked there)."""


@dataclass(frozen=True)
class SpiralQuery:
    count: int = 5
    site: str | None = field(default=None, metadata=limit(NAME))

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_SPIRAL:
            raise RequestError(f"count must be an integer from 1 to {MAX_SPIRAL}")


@dataclass(frozen=True)
class OverlayName:
    overlay: str = field(metadata=limit(NAME))
    """One of the overlays the agent runs (it checks: they depend on its config)."""


@dataclass(frozen=True)
class OverlaySwitch:
    overlay: str = field(metadata=limit(NAME))
    epoch: int


@dataclass(frozen=True)
class OverlayScan:
    overlay: str = field(metadata=limit(NAME))
    prefix: str = field(metadata=limit(1024))


def check_kv_key(key: str) -> None:
    if not key:
        raise RequestError(f"key must be a string of 1 to {MAX_KV_KEY} characters")


@dataclass(frozen=True)
class KvGet:
    key: str = field(metadata=limit(MAX_KV_KEY))
    overlay: str | None = field(default=None, metadata=limit(NAME))
    owner: str | None = field(default=None, metadata=limit(NAME))
    """Whose key (its writer's certificate name); default: the caller's own."""

    def __post_init__(self) -> None:
        check_kv_key(self.key)


@dataclass(frozen=True)
class KvPut:
    key: str = field(metadata=limit(MAX_KV_KEY))
    value: Any = None
    overlay: str | None = field(default=None, metadata=limit(NAME))

    def __post_init__(self) -> None:
        check_kv_key(self.key)


@dataclass(frozen=True)
class VmName:
    name: str = field(metadata=limit(NAME))

    def __post_init__(self) -> None:
        check_name(self.name)


@dataclass(frozen=True)
class Reserve(VmName):
    vcpus: int
    memory_mb: int
    disk_gb: int

    def __post_init__(self) -> None:
        super().__post_init__()
        for f in ("vcpus", "memory_mb", "disk_gb"):
            check_count(getattr(self, f), f)

    def need(self) -> Resources:
        return Resources(self.vcpus, self.memory_mb, self.disk_gb)


@dataclass(frozen=True)
class Ship:
    """A VM's files to fetch from the host that exported them (`host.fetch`): its disk, and with `image`
    its saved memory."""

    source: str = field(metadata=wire("from", NAME))
    image: bool = False


@dataclass(frozen=True)
class Confirm:
    token: str = field(metadata=limit(TOKEN))
    xml: str | None = field(default=None, metadata=limit(MAX_XML))
    """A carried domain (relocation); None: a new VM made from the reservation."""
    state: str = "running"
    snapshots: list[Any] | None = field(default=None, metadata=limit(MAX_SNAPSHOTS))
    """[tag, xml, state, taken, libvirt] each (`agents.host.args.snapshots_arg`)."""
    ship: Ship | None = None
    image: str | None = field(default=None, metadata=limit(IMAGE))
    """The image a new VM boots (NAME[:TAG], as its spec says); None: none. A carried domain names its own."""
    nics: list[Any] | None = field(default=None, metadata=limit(MAX_NICS))
    """A new VM's network interfaces: [VNI, MAC, address/prefix] each, and its NAT and forwarded ports if any
    (`agents.host.args.nics_arg`); a carried domain has its own."""

    def __post_init__(self) -> None:
        check_state(self.state)
        nics_arg(self.nics)


@dataclass(frozen=True)
class Release:
    token: str | None = field(default=None, metadata=limit(TOKEN))


@dataclass(frozen=True)
class Prefetch:
    """Bring image `image` into this node's store, keeping reservation `token` alive meanwhile."""

    token: str = field(metadata=limit(TOKEN))
    image: str = field(metadata=limit(IMAGE))


@dataclass(frozen=True)
class SnapshotImage(VmName):
    """`host.snapshot_image`: make image `image` (NAME:TAG) of VM `name`'s disk as it is now, owned by `owner`, in
    this node's image store (a shipped snapshot: `agents.host.snapshot_images`)."""

    image: str = field(metadata=limit(IMAGE))
    owner: str = field(metadata=limit(NAME))

    def __post_init__(self) -> None:
        super().__post_init__()
        check_image_name(self.image)


@dataclass(frozen=True)
class VmStop(VmName):
    timeout: float = SHUTDOWN_TIMEOUT
    """Seconds before the guest is forced off."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_timeout(self.timeout)


@dataclass(frozen=True)
class VmSettle(VmName):
    state: str
    """running, paused or shutoff, from any state."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_state(self.state)


@dataclass(frozen=True)
class SnapshotTag(VmName):
    tag: str = field(metadata=limit(NAME))

    def __post_init__(self) -> None:
        super().__post_init__()
        check_name(self.tag, "tag")


@dataclass(frozen=True)
class Snapshot(SnapshotTag):
    state: str | None = None
    """The state to restore; default: the VM's state now."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_state(self.state)


@dataclass(frozen=True)
class Export(VmName):
    freeze: bool = False
    ship: bool = False
    copy: bool = False


@dataclass(frozen=True)
class Fetch(VmName):
    part: str = field(metadata=limit(NAME))
    """disk, image (its saved memory) or copy (of its disk, for a standby)."""
    offset: int

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count(self.offset, "offset")


MIGRATION_SCHEMES = ("qemu+tcp://", "qemu+tls://", "qemu+ssh://")
"""How one libvirt daemon reaches another's for a peer-to-peer migration."""


@dataclass(frozen=True)
class Migrate(VmName):
    uri: str = field(metadata=limit(1024))

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.uri.startswith(MIGRATION_SCHEMES):
            raise RequestError(f"uri must be the target's libvirt URI ({', '.join(MIGRATION_SCHEMES)})")


@dataclass(frozen=True)
class Standby(VmName):
    xml: str = field(metadata=limit(MAX_XML))
    """The VM's definition, as `host.export` gave it."""
    taken: float
    """When it was exported (seconds since the epoch)."""
    token: str | None = field(default=None, metadata=limit(TOKEN))
    """The reservation a new standby confirms; a refresh has none."""
    snapshots: list[Any] | None = field(default=None, metadata=limit(MAX_SNAPSHOTS))
    ship: Ship | None = None
    """A real guest's disk copy, from the VM's host."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if xml_name(self.xml) != self.name:
            raise RequestError(f"xml must be the definition of {self.name}, at most {MAX_XML} characters")


@dataclass(frozen=True)
class Promote(VmName):
    state: str

    def __post_init__(self) -> None:
        super().__post_init__()
        check_state(self.state)


# -- answers of `host.*` ------------------------------------------------------------------------------------
# A VM's own state travels as `agents.hypervisor.actor.DomainInfo` (name, uuid, state, vcpus, memory_mb).


@dataclass(frozen=True)
class VmInfo(DomainInfo):
    """`host.vm.info`: the domain, how it may leave this node, and whether it is held off since the node's start."""

    backend: str
    live: bool
    """It may migrate live (a libvirtd here, and no internal snapshots)."""
    held: bool
    image: str | None = None
    """The manifest digest of the image it boots (a real guest's: `host.incoming` needs it); None: none."""


@dataclass(frozen=True)
class HostInfo:
    """`host.info`: the node's room and domains; `busy`, the VMs with operations under way or waiting (how many)."""

    total: Resources
    free: Resources
    domains: list[DomainInfo]
    backend: str
    migration_uri: str | None
    busy: dict[str, int]
    listed_ago: float | None = None
    """How old `domains` is, in seconds: 0 if listed for this answer, more if libvirt was slow to list them
    and the last listing was answered instead (`agents.host.service.LISTING_PATIENCE`); None: never listed."""


@dataclass(frozen=True)
class Held:
    """`host.reserve_standby`: room held for `ttl` seconds, until confirmed with `token`."""

    token: str
    ttl: float


@dataclass(frozen=True)
class Reservation(Held):
    """`host.reserve`: also how the node runs VMs, and where peers migrate VMs to it (None: nowhere)."""

    backend: str
    migration_uri: str | None


@dataclass(frozen=True)
class SnapshotTaken:
    tag: str
    state: str
    taken: float


@dataclass(frozen=True)
class SnapshotImaged:
    """`host.snapshot_image`: the image made (`digest`: its manifest's), its `size` and distinct `chunks`, what
    this node's store grew by (`new_chunks`, `new_bytes` compressed), the encoded manifest's size, and how long
    the VM was paused for a consistent copy of its disk (0 for a VM that was not running, or has no disk: its
    image is then its domain XML)."""

    image: str
    digest: str
    size: int
    chunks: int
    new_chunks: int
    new_bytes: int
    manifest_bytes: int
    paused: float


@dataclass(frozen=True)
class SnapshotDeleted:
    name: str
    tag: str
    deleted: bool
    """Whether there was anything to delete."""


@dataclass(frozen=True)
class Shipped:
    image: bool
    """Whether a memory image waits beside the disk (the VM was not off)."""


@dataclass(frozen=True)
class Exported:
    """`host.export`: what a move or a standby carries. `snapshots`: [tag, xml, state, taken, libvirt] each
    (`agents.host.args.snapshots_arg`); `ship`: set with the request's `ship`; `copy`: a disk copy waits."""

    xml: str
    state: str
    snapshots: list[list[Any]]
    ship: Shipped | None = None
    copy: bool = False


@dataclass(frozen=True)
class IncomingVm(VmName):
    """`host.incoming`: get ready for VM `name`, booting image `image` (a manifest digest), by live migration;
    `nics` as `Confirm`'s: the segments its interfaces join must be here before QEMU starts on this side."""

    image: str | None = field(default=None, metadata=limit(IMAGE))
    nics: list[Any] | None = field(default=None, metadata=limit(MAX_NICS))

    def __post_init__(self) -> None:
        super().__post_init__()
        nics_arg(self.nics)


@dataclass(frozen=True)
class Incoming:
    uri: str
    """The libvirt URI to migrate the VM to."""


@dataclass(frozen=True)
class Migrated:
    seconds: float


@dataclass(frozen=True)
class StandbyKept:
    name: str
    taken: float
    snapshots: int


@dataclass(frozen=True)
class StandbyEntry:
    """One of `host.standbys`: a standby this node keeps, its room, how many snapshots, when exported."""

    name: str
    need: Resources
    snapshots: int
    taken: float
    mirror: str | None = field(default=None, metadata=sparse())
    """`syncing` or `ready` while the VM's host mirrors its disk here (`agents.host.mirrors`), else None."""


@dataclass(frozen=True)
class MirrorClose(VmName):
    """`host.mirror_close`: end the export of VM `name`'s mirror here; `keep` it as the standby's disk (the
    host ended a job that was ready: the file is a consistent copy) or drop it (it never caught up)."""

    keep: bool = False


@dataclass(frozen=True)
class MirrorOpen(VmName):
    """`host.mirror_open`: receive VM `name`'s mirrored disk, its writes throttled to `bandwidth` bytes/s (0: not)."""

    bandwidth: int = field(default=0, metadata=sparse())

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.bandwidth <= MAX_BANDWIDTH:
            raise RequestError(f"bandwidth must be 0 to {MAX_BANDWIDTH} bytes/s, got {self.bandwidth}")


@dataclass(frozen=True)
class MirrorExport:
    """`host.mirror_open`'s answer: where the standby's node serves the file a VM's disk is mirrored into."""

    host: str
    port: int
    export: str


@dataclass(frozen=True)
class MirrorStatus:
    """One of `host.mirrors`: a VM of this node whose disk is mirrored to the node of a standby copy of it.

    `state`: `syncing` (the first pass), `ready` (every write copied after it, `lag` seconds behind at most,
    `behind` bytes not yet copied), or `waiting: why` (not running now: started again shortly). `sent`: bytes
    copied since the agent started; `sync`: writes wait for the copy (no lag); `held`: the cap on the guest's
    disk writes (bytes/s) while the mirror catches up from beyond the policy's `max_lag` (0: none)."""

    name: str
    node: str
    state: str
    lag: float
    behind: int
    sent: int
    sync: bool
    held: int = field(default=0, metadata=sparse())


# -- answers of the views ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AgentStatus:
    """`agent.status`: where this agent is on the ring, what it holds, how its services and connections fare."""

    name: str
    site: str
    addr: str
    successors: list[str]
    predecessor: str | None
    records: int
    dht: dict[str, int]
    """What anti-entropy sent and moved (`overlay.dht.STATS`)."""
    overlay: str
    restarts: dict[str, int]
    hypervisor: str
    accel: str
    rejected_connections: int
    protocol: ProtocolVersions | None = field(default=None, metadata=sparse())
    """Left out for a caller of a version before `ProtocolVersions.SINCE` (it would refuse an unknown field)."""


@dataclass(frozen=True)
class ProtocolVersions:
    """`agent.status`'s protocol: the versions the agent speaks, and the version it speaks with each peer
    node it has a connection to (`overlay.wire.versions`): during a rolling upgrade, who is still old."""

    SINCE: ClassVar[int] = 2
    """The protocol version that brought this field."""
    oldest: int
    newest: int
    peers: dict[str, int]


@dataclass(frozen=True)
class MemberRow:
    """One of `agent.members`: a member as gossip carries it (`overlay.membership.Member.to_wire`), with the
    RTT measured to it."""

    name: str
    addr: str
    site: str
    status: str
    incarnation: int
    coord: Any
    cseq: int
    rtt_ms: float | None


@dataclass(frozen=True)
class CoordinateRow:
    """A member's network coordinate (milliseconds), and the RTT to it estimated from it and measured."""

    name: str
    site: str
    status: str
    vec: list[float]
    height_ms: float
    error: float
    estimated_rtt_ms: float | None
    bound_ms: float | None
    measured_rtt_ms: float | None
    me: bool = field(metadata=wire("self"))
    """The answering agent itself."""


@dataclass(frozen=True)
class Coordinates:
    """`coord.list`."""

    node: str
    dimensionality: int
    nodes: list[CoordinateRow]


@dataclass(frozen=True)
class RttEstimate:
    """`coord.rtt`: estimated (with its bound) and measured RTT between two members, milliseconds."""

    a: str
    b: str
    estimated_ms: float
    bound_ms: float
    measured_ms: float


@dataclass(frozen=True)
class SpiralNode:
    name: str
    site: str | None
    rtt_ms: float | None
    free: dict[str, int] | None


@dataclass(frozen=True)
class SpiralFound:
    """`spiral.search`: the nearest nodes found, nearest first, and what the walk cost."""

    origin: str
    hops: int
    messages: int
    failures: int
    nodes: list[SpiralNode]


@dataclass(frozen=True)
class KademliaStatus:
    port: int
    neighbours: int


@dataclass(frozen=True)
class OverlayStatus:
    """`overlay.status`: the overlay the records are bound to, at which epoch, and whether a re-bind holds writes."""

    node: str
    overlay: str
    epoch: int
    frozen: bool
    overlays: list[str]
    kademlia: KademliaStatus | None


@dataclass(frozen=True)
class Rebound(OverlayStatus):
    """`overlay.bind`: the binding after, how many records were copied, and (when it changed) how many
    members were told and which missed the switch (they adopt it from their peers)."""

    copied: int
    changed: bool
    members: int | None = field(default=None, metadata=sparse())
    missed: list[str] | None = field(default=None, metadata=sparse())


@dataclass(frozen=True)
class KademliaContact:
    kad_port: int


@dataclass(frozen=True)
class KvRead:
    """`overlay.get` (`discovery kv get`): the value if found, and how long the read took here."""

    key: str
    found: bool
    value: Any
    version: int | None
    overlay: str
    ms: float


@dataclass(frozen=True)
class KvWritten:
    key: str
    version: int
    overlay: str
    ms: float


AGENT_STATUS = Method("agent.status", NoArgs, ANYONE, AgentStatus)
AGENT_MEMBERS = Method("agent.members", NoArgs, ANYONE, list[MemberRow])
MEMBER_PING = Method("member.ping", Gossip, AGENTS, GossipReply)
COORD_PING = Method("coord.ping", NoArgs, AGENTS, bool)
COORD_LIST = Method("coord.list", NoArgs, ANYONE, Coordinates)
COORD_RTT = Method("coord.rtt", Rtt, ANYONE, RttEstimate)
COORD_PROBE = Method("coord.probe", Probe, AGENTS, float)
SPIRAL_STEP = Method("spiral.step", SpiralStep, AGENTS, SpiralHop)
SPIRAL_SEARCH = Method("spiral.search", SpiralQuery, ANYONE, SpiralFound)
OVERLAY_STATUS = Method("overlay.status", NoArgs, ANYONE, OverlayStatus)
OVERLAY_CONTACT = Method("overlay.contact", NoArgs, AGENTS, KademliaContact)
OVERLAY_SCAN = Method("overlay.scan", OverlayScan, HOSTS, list[list[Any]])  # operators may inspect a shard
OVERLAY_FREEZE = Method("overlay.freeze", OverlayName, AGENTS, bool)
OVERLAY_SWITCH = Method("overlay.switch", OverlaySwitch, AGENTS, bool)
OVERLAY_THAW = Method("overlay.thaw", NoArgs, AGENTS, bool)
OVERLAY_BIND = Method("overlay.bind", OverlayName, OPERATORS, Rebound)
OVERLAY_GET = Method("overlay.get", KvGet, ANYONE, KvRead)
OVERLAY_PUT = Method("overlay.put", KvPut, ANYONE, KvWritten)
HOST_RESERVE = Method("host.reserve", Reserve, HOSTS, Reservation)
HOST_PREFETCH = Method("host.prefetch", Prefetch, HOSTS, bool)
HOST_CONFIRM = Method("host.confirm", Confirm, HOSTS, DomainInfo)
HOST_RELEASE = Method("host.release", Release, HOSTS, bool)
HOST_VM_START = Method("host.vm.start", VmName, HOSTS, DomainInfo)
HOST_VM_STOP = Method("host.vm.stop", VmStop, HOSTS, DomainInfo)
HOST_VM_DESTROY: Method[VmName, DomainInfo | None] = Method("host.vm.destroy", VmName, HOSTS, DomainInfo | None)
HOST_VM_SUSPEND = Method("host.vm.suspend", VmName, HOSTS, DomainInfo)
HOST_VM_RESUME = Method("host.vm.resume", VmName, HOSTS, DomainInfo)
HOST_VM_SETTLE = Method("host.vm.settle", VmSettle, HOSTS, DomainInfo)
HOST_VM_RELEASE = Method("host.vm.release", VmName, HOSTS, DomainInfo)
HOST_VM_UNDEFINE = Method("host.vm.undefine", VmName, HOSTS, type(None))
HOST_VM_INFO = Method("host.vm.info", VmName, HOSTS, VmInfo)
HOST_INFO = Method("host.info", NoArgs, HOSTS, HostInfo)
HOST_SNAPSHOT = Method("host.snapshot", Snapshot, HOSTS, SnapshotTaken)
HOST_RESTORE = Method("host.restore", SnapshotTag, HOSTS, DomainInfo)
HOST_SNAPSHOT_DELETE = Method("host.snapshot_delete", SnapshotTag, HOSTS, SnapshotDeleted)
HOST_SNAPSHOT_IMAGE = Method("host.snapshot_image", SnapshotImage, HOSTS, SnapshotImaged)
HOST_EXPORT = Method("host.export", Export, HOSTS, Exported)
HOST_FETCH = Method("host.fetch", Fetch, HOSTS, bytes)
HOST_INCOMING = Method("host.incoming", IncomingVm, HOSTS, Incoming)
HOST_MIGRATE = Method("host.migrate", Migrate, HOSTS, Migrated)
HOST_RESERVE_STANDBY = Method("host.reserve_standby", Reserve, HOSTS, Held)
HOST_STANDBY = Method("host.standby", Standby, HOSTS, StandbyKept)
HOST_UNSTANDBY = Method("host.unstandby", VmName, HOSTS, bool)
HOST_STANDBYS = Method("host.standbys", NoArgs, HOSTS, list[StandbyEntry])
HOST_PROMOTE = Method("host.promote", Promote, HOSTS, DomainInfo)
HOST_MIRROR_OPEN = Method("host.mirror_open", MirrorOpen, HOSTS, MirrorExport)
HOST_MIRROR_READY = Method("host.mirror_ready", VmName, HOSTS, bool)
HOST_MIRROR_CLOSE = Method("host.mirror_close", MirrorClose, HOSTS, bool)
HOST_MIRRORS = Method("host.mirrors", NoArgs, HOSTS, list[MirrorStatus])
