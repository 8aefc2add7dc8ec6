"""The VE record: what the directory (the DHT, key `ve/<name>`) holds about one VE, as frozen dataclasses
with one encoding, the type-driven codec's (`overlay.wire.codec`).

A record is the truth about a VE (its spec with its HA policy, owner, state, where each VM runs, its standby
copies and snapshots, why the copies its policy asks for fell short) and the log of the operations that must
survive a crash: a VM's slot carries the intent of a move (`moving_to`), a failover (`failing_over`) or a
rebuild (`rebuilding`) under way, the record the marker of a snapshot being taken (`snapshotting`). A
change is a read, a `dataclasses.replace` and a write of the whole record; a record read is never changed in
place.

**Versions.** A record carries `version`, the format it was written in; this code writes VERSION. Agents
before this module wrote plain maps without the field: that format is version 1, so `read` takes a map without
`version` as version 1. Optional parts (intents, the snapshot marker, standby copies, snapshots, a move's
transfer, the spec's HA policy, a shortfall) are left off while empty (`codec.sparse`): a record stored today
has the shape older agents wrote, and `view`, what `ve show --json` prints, is that shape.

**Unknown fields are refused**, in one line naming the field, and so is a record of a version newer than
VERSION (the line says to upgrade this agent). Skipping them instead would be unsafe: every change is a
read-modify-write of the whole record, and the record is the log of the operations in flight, so an agent
that dropped a field it did not know would erase it at its next write (an intent of a newer kind, say),
and with it what makes that operation recoverable. An agent that refuses a VE until it is upgraded leaves
the VE intact. So a change of format raises VERSION and teaches `read` to upgrade the versions before it.
Only `uid` is read without decoding (`incarnation`), by the directory's index, which must not unlist a VE
because its record is of a newer format.

This module is sans-IO (the transaction cores use it): it must never import trio, the agent or the
transport.
"""

from __future__ import annotations

import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Network
from typing import Any, Literal, Protocol

from discovery.ve.spec import VESpec
from overlay.wire import codec
from overlay.wire.codec import CodecError, sparse, wire

VERSION = 2
"""The format this code writes. 2 added the VE's networks and NICs (`networks`, `nics`); a record of format 1,
which has neither, reads as a VE whose VMs have no interface."""

VEState = Literal["creating", "running", "stopped", "suspended"]
VMState = Literal["running", "paused", "shutoff"]
"""The states a VM is moved, failed over and brought back in (`agents.hypervisor.actor.SETTLED`)."""
STEADY: tuple[VMState, ...] = typing.get_args(VMState)


class RecordError(ValueError):
    """A stored value that is no VE record this agent can read; one line naming the VE and the fault."""


class Place(Protocol):
    """Anything that names a host: a slot, an intent, a standby copy."""

    @property
    def node(self) -> str: ...

    @property
    def addr(self) -> str: ...


How = Literal["live", "ship", "carry"]
"""How a move gets a VM there (`discovery.ve.moves.Move._reserved`)."""


@dataclass(frozen=True)
class Transfer:
    """How the VM's last move got it to its node, and in how many seconds."""

    how: How
    seconds: float


@dataclass(frozen=True)
class MoveIntent:
    """A move under way (`discovery.ve.moves`): the target and why it was chosen, how far the move got, the
    state to bring the VM to, and who coordinates it since when (wall-clock seconds)."""

    node: str
    addr: str
    site: str
    rtt_ms: float | None
    why: str
    phase: Literal["prepare", "started"]
    state: VMState
    coordinator: str
    since: float


@dataclass(frozen=True)
class FailoverIntent:
    """A failover under way (`discovery.ve.failovers`): the standby's node, the VM's old host (`from` on the
    wire), why it failed over, the state to bring the VM to, and who coordinates it since when."""

    node: str
    addr: str
    site: str
    source: str = field(metadata=wire("from"))
    why: str
    state: VMState
    coordinator: str
    since: float


@dataclass(frozen=True)
class RebuildIntent:
    """A rebuild under way (`discovery.ve.rebuilding`): the node the VM is made again on (reserved there;
    `rtt_ms` from the coordinator), the VM's old host (`from` on the wire), why it is rebuilt, what it boots
    (`image`: an image's name, or a shipped snapshot's; None: none), the state to bring it to, and who
    coordinates it since when."""

    node: str
    addr: str
    site: str
    rtt_ms: float | None
    source: str = field(metadata=wire("from"))
    why: str
    image: str | None
    state: VMState
    coordinator: str
    since: float


@dataclass(frozen=True)
class Slot:
    """Where a VM runs and why there (`rtt_ms`: from the agent that placed it); with the move, failover or
    rebuild under way, if any."""

    node: str
    addr: str
    site: str
    rtt_ms: float | None
    why: str
    transfer: Transfer | None = field(default=None, metadata=sparse())
    moving_to: MoveIntent | None = field(default=None, metadata=sparse())
    failing_over: FailoverIntent | None = field(default=None, metadata=sparse())
    rebuilding: RebuildIntent | None = field(default=None, metadata=sparse())

    def intents(self) -> list[MoveIntent | FailoverIntent | RebuildIntent]:
        """The operations under way on this VM (at most one, but the record does not forbid more)."""
        return [i for i in (self.moving_to, self.failing_over, self.rebuilding) if i is not None]

    def named(self) -> list[str]:
        """The nodes the slot names: the VM's host, and the target of the operation under way."""
        return [self.node] + [i.node for i in self.intents()]


@dataclass(frozen=True)
class Standby:
    """A standby copy of a VM (`discovery.ve.replicas`): the node that keeps it, and when it was taken."""

    node: str
    addr: str
    site: str
    taken: float


@dataclass(frozen=True)
class SnapshotVM:
    """A VM in a snapshot: where it was and in which state."""

    node: str
    state: str


@dataclass(frozen=True)
class SnapshotEntry:
    """A snapshot the VE's hosts all stored: its tag, when, the VE's state then, and each VM."""

    tag: str
    time: float
    state: VEState
    vms: Mapping[str, SnapshotVM]


@dataclass(frozen=True)
class SnapshotMarker:
    """A snapshot being taken (`discovery.ve.snapshotting`): the VMs it paused, who coordinates it since when."""

    tag: str
    paused: tuple[str, ...]
    coordinator: str
    since: float


@dataclass(frozen=True)
class Shortfall:
    """Why the last attempt to make the standby copies the VE's HA policy asks for fell short, and when
    (`discovery.ve.policy`): what `ve show` gives as the reason a VM is degraded."""

    why: str
    since: float


@dataclass(frozen=True)
class NetState:
    """A VE network as created: its VXLAN identifier (unique in the cluster) and its subnet (CIDR)."""

    vni: int
    subnet: str

    @property
    def gateway(self) -> str:
        """The subnet's first host: where the VM's host answers (DHCP, the NAT'd uplink)."""
        return str(IPv4Network(self.subnet).network_address + 1)


@dataclass(frozen=True)
class Nic:
    """A VM's interface as created: its network, MAC and IPv4 address (a lease DHCP hands out, or fixed)."""

    network: str
    mac: str
    address: str


Intent = MoveIntent | FailoverIntent | RebuildIntent | SnapshotMarker


@dataclass(frozen=True)
class VERecord:
    """One VE (module docstring). `coordinator` and `created`: the agent that created it, and when."""

    name: str
    spec: VESpec
    owner: str
    state: VEState
    placement: Mapping[str, Slot]
    coordinator: str
    created: float
    uid: str = ""
    """The incarnation: a VE destroyed and created again under its name has another (`discovery.ve.index`)."""
    copies: int | None = field(default=None, metadata=sparse())
    """The standby copies asked per VM (`ve replicate`); None if never asked."""
    standbys: Mapping[str, tuple[Standby, ...]] = field(default_factory=dict, metadata={**wire("replicas"), **sparse()})
    """Each VM's standby copies (`replicas` on the wire, as agents before this module named them)."""
    snapshots: tuple[SnapshotEntry, ...] = field(default=(), metadata=sparse())
    snapshotting: SnapshotMarker | None = field(default=None, metadata=sparse())
    shortfall: Shortfall | None = field(default=None, metadata=sparse())
    """Set while the standby copies of the HA policy (`spec.ha`) could not all be made; None once they were."""
    networks: Mapping[str, NetState] = field(default_factory=dict, metadata=sparse())
    """Each network of the spec as created (`discovery.ve.addressing`); none in a VE created before networks."""
    nics: Mapping[str, tuple[Nic, ...]] = field(default_factory=dict, metadata=sparse())
    """Each VM's NICs as created, by VM: kept through every move, failover and rebuild."""
    version: int = VERSION

    def with_slot(self, vm: str, slot: Slot) -> VERecord:
        return replace(self, placement={**self.placement, vm: slot})

    def snapshot(self, tag: str) -> SnapshotEntry | None:
        return next((s for s in self.snapshots if s.tag == tag), None)

    def no_snapshot(self, tag: str) -> str:
        """The line that says this VE has no snapshot `tag`, naming those it has."""
        known = "snapshots: " + ", ".join(s.tag for s in self.snapshots) if self.snapshots else "it has none"
        return f"VE {self.name!r} has no snapshot {tag!r} ({known})"

    def standbys_of(self, vm: str) -> tuple[Standby, ...]:
        return self.standbys.get(vm, ())

    def with_standbys(self, vm: str, copies: Iterable[Standby]) -> VERecord:
        """The record listing `copies` as the standbys of `vm` (none: `vm` leaves `standbys`)."""
        entries = tuple(copies)
        standbys = {v: c for v, c in self.standbys.items() if v != vm} | ({vm: entries} if entries else {})
        return replace(self, standbys=standbys)

    def nic_args(self, vm: str) -> dict[str, list[list[Any]]]:
        """What a host making VM `vm` anew (`host.confirm`) is told of its NICs: [VNI, MAC, address/prefix] each
        (the address its DHCP server hands out, in the network's subnet), with {nat, expose} for one whose network
        is NAT'd or that ports are forwarded to (the spec's `expose`, to the VM's first NIC); none: {}."""
        nat = {network.name for network in self.spec.networks if network.nat}
        nics = []
        for index, nic in enumerate(self.nics.get(vm, ())):
            net = self.networks[nic.network]
            row: list[Any] = [net.vni, nic.mac, f"{nic.address}/{IPv4Network(net.subnet).prefixlen}"]
            exposed = [[e.protocol, e.host_port, e.port] for e in self.spec.expose if e.vm == vm] if index == 0 else []
            if nic.network in nat or exposed:
                row.append({"nat": nic.network in nat, "expose": exposed})
            nics.append(row)
        return {"nics": nics} if nics else {}

    def intents(self) -> list[Intent]:
        """What operations left unfinished: moves, failovers and rebuilds (by VM), then a snapshot."""
        found: list[Intent] = [i for vm in sorted(self.placement) for i in self.placement[vm].intents()]
        return found + ([self.snapshotting] if self.snapshotting is not None else [])


def domain_name(ve: str, vm: str) -> str:
    """The libvirt domain of a VM; ':' cannot appear in VE or VM names, so names never collide."""
    return f"{ve}:{vm}"


def read(value: Any) -> VERecord:
    """The record a directory value holds (what `write` stored, or a map an older agent wrote); RecordError
    if this agent cannot read it (module docstring)."""
    name = value.get("name") if isinstance(value, Mapping) else None
    what = f"VE record {name!r}" if isinstance(name, str) else "VE record"
    if not isinstance(value, Mapping):
        raise RecordError(f"{what}: expected a map, got {type(value).__name__}")
    version = value.get("version", 1)
    if type(version) is not int or not 1 <= version <= VERSION:
        if type(version) is int and version > VERSION:
            raise RecordError(f"{what} is of format {version}, written by a newer agent (this one reads up to "
                              f"{VERSION}): upgrade this agent")
        raise RecordError(f"{what}: version must be a format number from 1 to {VERSION}, got {version!r}")
    try:
        ve: VERecord = codec.decode(VERecord, {**value, "version": version})
    except CodecError as err:
        raise RecordError(f"{what}: {err}") from None
    return ve


def write(ve: VERecord) -> dict[str, Any]:
    """What the directory stores of `ve`."""
    data: dict[str, Any] = codec.encode(ve)
    return data


def view(ve: VERecord) -> dict[str, Any]:
    """`ve` as the `ve.*` answers show it (`ve show --json`...): the stored shape without the format version,
    the shape those answers had before records had one."""
    return {k: v for k, v in write(ve).items() if k != "version"}


def incarnation(value: Any) -> str:
    """The `uid` of a stored record of any version, without decoding it ("" if it has none)."""
    uid = value.get("uid", "") if isinstance(value, Mapping) else ""
    return uid if isinstance(uid, str) else ""


def steady(state: object) -> VMState | None:
    """`state` (a host's answer) if it is one of STEADY, else None."""
    return next((s for s in STEADY if s == state), None)
