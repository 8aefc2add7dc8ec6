"""VE specs: the YAML a user writes to describe a virtual environment, and its validated model.

Specs come from two untrusted places, a user's file and a peer on the wire, so both go through one
validator. Errors are one line naming the source, the line and the field path, so that a user can fix
the file without guessing; only the first error is reported.

A spec may carry placement `constraints` (affinity, anti-affinity, same site, spread over sites, VMs
per node); `discovery.ve.placement` honours them. Contradictions that need no knowledge of the nodes are
refused here, where the error can point at the line. Affinity is transitive: groups that share a VM
are merged (`Constraints.together`), since `[a, b]` and `[b, c]` can only mean a, b and c on one node.

A spec may also carry an `ha` policy (`HaPolicy`): how its VMs are kept recoverable (standby copies on other
nodes, or a restart elsewhere from periodic snapshots) and in which order VEs are recovered. `ve ha` sets it
later through the same validator (`parse_ha`), so a policy reads alike wherever it was written.

Last, a spec may lay out the VE's virtual networks (`networks`), each VM's interfaces on them (`nics`) and the
ports of a VM its host forwards (`expose`). What the user fixes is checked here: names, subnets that do not
overlap, fixed addresses inside their network's subnet and off its reserved ones (the network address, the
first host, which is the gateway the host's agent answers on, and the broadcast address), ports exposed once.
The rest is decided at create: a subnet for each network that has none, each network's VNI, and the address
of each NIC without a fixed one (handed out by DHCP). A spec that says nothing of networks has one network,
`default`, with one NIC of each VM on it, and encodes exactly as before networks existed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from itertools import islice
from pathlib import Path
from typing import Any, Literal, TypeVar

from yaml.nodes import Node

from discovery import yamlfields
from discovery.yamlfields import FieldError, boolean, describe, is_null, string
from discovery.yamlfields import format_duration as format_duration  # re-exported: policies are shown with it
from overlay.wire import codec
from overlay.wire.codec import sparse

MAX_SPEC_BYTES = 256 * 1024
MAX_VMS = 64
# A valid spec nests five levels deep (the spec, vms, a VM, its nics, a NIC); the limit keeps PyYAML's recursive
# composer off Python's stack limit.
MAX_DEPTH = 16
DEFAULT_DISK_GB = 1
DEFAULT_IMAGE = "none"
WIRE_SOURCE = "<wire>"

VCPUS_RANGE = (1, 256)
MEMORY_MB_RANGE = (16, 1048576)
DISK_GB_RANGE = (0, 65536)

_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?")
_NAME_RULE = "1-63 characters of a-z, 0-9, '.', '_' or '-', starting and ending with a letter or digit"
_IMAGE_RE = re.compile(r"[A-Za-z0-9._:/-]{1,128}")
_IMAGE_RULE = "1-128 characters of A-Z, a-z, 0-9, '.', '_', ':', '/' or '-'"

A = TypeVar("A", IPv4Address, IPv4Interface)

MAX_COPIES = 16
"""Most standby copies of a VM (`ha: {copies}`, `ve replicate`)."""
SNAPSHOT_EVERY_RANGE = (10, 24 * 3600)
"""Seconds between periodic snapshots: each pauses the VE's VMs, and a day-old restart point is no HA."""
KEEP_RANGE = (1, 100)
DEFAULT_KEEP = 3
PRIORITY_RANGE = (-1000, 1000)
REPLICATION_MODES: tuple[str, ...] = ("async", "sync", "off")
BANDWIDTH_RANGE = (1, 100_000)
"""MiB/s a standby's continuous replication may use (`ha: {bandwidth}`); none given: as fast as it goes."""
MAX_LAG_RANGE = (1, 3600)
DEFAULT_MAX_LAG = 5
"""Seconds a replicated copy may be behind before its VM counts as degraded (`ha: {max_lag}`)."""

MAX_NETWORKS = 16
"""Most networks of one VE."""
MAX_NICS = 8
"""Most NICs of one VM."""
MAX_EXPOSED = 64
"""Most `expose` entries of one VE."""
PREFIX_RANGE = (16, 29)
"""Prefix lengths a subnet may have: a /29 still leaves 5 fixed addresses (gateway, network and broadcast aside)."""
PORT_RANGE = (1, 65535)
DEFAULT_NETWORK = "default"

_TOP_KEYS = ("name", "site", "vms", "constraints", "ha", "networks", "expose")
_VM_KEYS = ("name", "vcpus", "memory_mb", "disk_gb", "image", "nics")
_NETWORK_KEYS = ("name", "subnet", "nat")
_NIC_KEYS = ("network", "address")
_EXPOSE_KEYS = ("vm", "port", "host_port", "protocol")
_CONSTRAINT_KEYS = ("affinity", "anti_affinity", "same_site", "spread_sites", "max_per_node")
_HA_KEYS = ("mode", "copies", "snapshot_every", "keep", "priority", "replication", "bandwidth", "max_lag")
_HA_ONLY = {"copies": ("standby",), "snapshot_every": ("restart",), "keep": ("restart",),
            "priority": ("restart", "standby"), "replication": ("standby",), "bandwidth": ("standby",),
            "max_lag": ("standby",)}
"""The modes each optional key of a policy applies to (`mode: none` takes none of them)."""


class SpecError(FieldError):
    """An invalid spec; str() is one line, 'source[:line]: [path: ]reason', fit to show a user as is."""


@dataclass(frozen=True)
class NetworkSpec:
    """A virtual network of a VE. `subnet` is an IPv4 CIDR (None: one is allocated at create); with `nat`, the
    VMs on it reach the outside through their host's uplink, masqueraded."""

    name: str
    subnet: str | None = field(default=None, metadata=sparse())
    nat: bool = field(default=False, metadata=sparse())

    @property
    def ip_subnet(self) -> IPv4Network | None:
        """The subnet as `ipaddress` reads it (None: not chosen yet)."""
        return IPv4Network(self.subnet) if self.subnet is not None else None


@dataclass(frozen=True)
class NicSpec:
    """A VM's interface on one network of its VE; `address` is a fixed IPv4 address (None: DHCP's)."""

    network: str
    address: str | None = field(default=None, metadata=sparse())


Transport = Literal["tcp", "udp"]
TRANSPORTS: tuple[Transport, ...] = ("tcp", "udp")


@dataclass(frozen=True)
class ExposeSpec:
    """A port of the VM's host forwarded to a port of the VM."""

    vm: str
    port: int
    host_port: int
    protocol: Transport = field(default="tcp", metadata=sparse())


DEFAULT_NETWORKS = (NetworkSpec(DEFAULT_NETWORK),)
DEFAULT_NICS = (NicSpec(DEFAULT_NETWORK),)


@dataclass(frozen=True)
class VMSpec:
    """One VM of a VE: what a host must reserve for it, the image it boots and its network interfaces.

    Built in code without `nics`, a VM has one NIC on the `default` network: what the validator gives a VM
    without `nics` in a VE that declares no networks, so that such a VM equals its parsed self. A VE built in
    code with networks of its own names its VMs' NICs (the validator's default there is the first network).
    """

    name: str
    vcpus: int
    memory_mb: int
    disk_gb: int = DEFAULT_DISK_GB
    image: str = DEFAULT_IMAGE
    nics: tuple[NicSpec, ...] = field(default=DEFAULT_NICS, metadata=sparse())


@dataclass(frozen=True)
class Constraints:
    """Where the VMs of a VE may go relative to each other; the defaults constrain nothing.

    Groups keep the VM names as written. `spread_sites` and `max_per_node` are None when not given.
    """

    affinity: tuple[tuple[str, ...], ...] = field(default=(), metadata=sparse())
    """Each group's VMs share one node."""
    anti_affinity: tuple[tuple[str, ...], ...] = field(default=(), metadata=sparse())
    """Each group's VMs are on pairwise different nodes."""
    same_site: bool = field(default=False, metadata=sparse())
    """Every VM in one site, whichever."""
    spread_sites: int | None = field(default=None, metadata=sparse())
    """The VMs cover at least this many distinct sites."""
    max_per_node: int | None = field(default=None, metadata=sparse())
    """At most this many VMs of the VE on one node."""

    def together(self) -> tuple[tuple[str, ...], ...]:
        """The affinity groups merged where they share a VM, names in order of first appearance."""
        parent: dict[str, str] = {}  # union-find, linear in the groups' total size whatever they hold

        def root(name: str) -> str:
            while parent[name] != name:
                parent[name] = parent[parent[name]]
                name = parent[name]
            return name

        for group in self.affinity:
            for name in group:
                parent.setdefault(name, name)
                parent[root(name)] = root(group[0])
        merged: dict[str, list[str]] = {}
        for name in parent:  # dicts keep insertion order: groups and names in order of first appearance
            merged.setdefault(root(name), []).append(name)
        return tuple(tuple(g) for g in merged.values())


NO_CONSTRAINTS = Constraints()

HaMode = Literal["none", "restart", "standby"]
HA_MODES: tuple[HaMode, ...] = ("none", "restart", "standby")


@dataclass(frozen=True)
class HaPolicy:
    """How a VE's VMs are kept recoverable when their host dies, and how urgently; the default protects nothing.

    `standby` keeps `copies` standby copies of each VM on other nodes (`discovery.ve.replicas`); `restart`
    restarts a VM elsewhere from its image and its last snapshot, one taken every `snapshot_every` seconds,
    the last `keep` kept (None: no periodic snapshot). Higher `priority` is recovered first.

    A real guest's disk is also mirrored to its first standby copy (`replication`, `agents.host.replication`):
    `async` (the guest never waits; the copy is behind by what is not sent yet), `sync` (each write waits for
    the copy: no lag, a round trip per write) or `off` (copies as fresh as their last export); `bandwidth`
    MiB/s at most (None: unthrottled); a copy more than `max_lag` seconds behind makes the VM degraded.
    """

    mode: HaMode = "none"
    copies: int = field(default=0, metadata=sparse())
    snapshot_every: int | None = field(default=None, metadata=sparse())
    keep: int | None = field(default=None, metadata=sparse())
    priority: int = field(default=0, metadata=sparse())
    replication: str = field(default="async", metadata=sparse())
    bandwidth: int | None = field(default=None, metadata=sparse())
    max_lag: int = field(default=DEFAULT_MAX_LAG, metadata=sparse())

    @property
    def protected(self) -> bool:
        return self.mode != "none"

    @classmethod
    def from_dict(cls, d: object, source: str = "") -> HaPolicy:
        """Validates a policy given alone (`ve ha`), as the spec's `ha` is; errors name `ha.<field>`."""
        return _Validator(source).ha(d, "ha")


NO_HA = HaPolicy()


@dataclass(frozen=True)
class VESpec:
    """A validated VE spec. Build it with parse_spec, load_spec or from_dict so that it is checked."""

    name: str
    vms: tuple[VMSpec, ...]
    site: str | None = None
    constraints: Constraints = field(default=NO_CONSTRAINTS, metadata=sparse())
    ha: HaPolicy = field(default=NO_HA, metadata=sparse())
    networks: tuple[NetworkSpec, ...] = field(default=DEFAULT_NETWORKS, metadata=sparse())
    expose: tuple[ExposeSpec, ...] = field(default=(), metadata=sparse())

    def to_dict(self) -> dict[str, Any]:
        """Plain data (str, int, bool, list, None) for msgpack; from_dict reads it back.

        Only the constraints that are set travel, and none at all when there is none (`codec.sparse`), so
        that such a spec reads the same as before constraints existed; likewise the HA policy, the networks
        and `expose`. A VM's `nics` travel unless they are what from_dict gives a VM without them (one NIC
        on the first network), which the codec alone cannot tell: it compares with the field's default.
        """
        data: dict[str, Any] = codec.encode(self)
        implied = _implied_nics(network.name for network in self.networks)
        for vm, encoded in zip(self.vms, data["vms"], strict=True):
            encoded.pop("nics", None)
            if vm.nics != implied:
                encoded["nics"] = codec.encode(vm.nics)
        return data

    @classmethod
    def from_dict(cls, d: object) -> VESpec:
        """Validates a spec received from a peer, which is as untrusted as a user's file (anything at all)."""
        return _Validator(WIRE_SOURCE).spec(d)


def parse_spec(text: str, source: str = "<spec>") -> VESpec:
    """Parses and validates spec YAML; source names the text in error messages (usually its file)."""
    yamlfields.check_text(text, source, MAX_SPEC_BYTES, SpecError)
    root = yamlfields.compose(text, source, MAX_DEPTH, SpecError)
    if root is None:
        raise SpecError.at(source, f"empty document; expected a mapping with keys {', '.join(_TOP_KEYS)}")
    return _Validator(source).spec(root)


def load_spec(path: str | Path) -> VESpec:
    """Reads and validates a spec file, reading no more than the size limit allows."""
    return parse_spec(yamlfields.read(path, MAX_SPEC_BYTES, SpecError), str(path))


class _Validator(yamlfields.Fields):
    """Checks a spec given as a composed YAML node tree or as plain data (from the wire), with the same rules."""

    error_type = SpecError

    def spec(self, root: object) -> VESpec:
        top = self.mapping(root, "", _TOP_KEYS, required=("name", "vms"))
        name = self.text(top["name"], "name", _NAME_RE, _NAME_RULE)
        site = None if is_null(top.get("site")) else self.text(top["site"], "site", _NAME_RE, _NAME_RULE)
        networks = DEFAULT_NETWORKS if is_null(top.get("networks")) else self.networks(top["networks"])
        subnets = {network.name: network.ip_subnet for network in networks}
        addresses: dict[str, str] = {}  # fixed address -> the path of the NIC that has it
        vms_obj = top["vms"]
        items = self.items(vms_obj, "vms", "a list of VMs")
        if not 1 <= len(items) <= MAX_VMS:
            raise self.error(vms_obj, "vms", f"must list 1 to {MAX_VMS} VMs, got {len(items)}")
        vms: list[VMSpec] = []
        first_index: dict[str, int] = {}
        for index, item in enumerate(items):
            vm, name_obj = self.vm(item, f"vms[{index}]", subnets, addresses)
            if vm.name in first_index:
                first = first_index[vm.name]
                raise self.error(name_obj, f"vms[{index}].name",
                                 f"duplicate VM name {vm.name!r}, already used by vms[{first}]")
            first_index[vm.name] = index
            vms.append(vm)
        constraints_obj, ha_obj = top.get("constraints"), top.get("ha")
        constraints = (NO_CONSTRAINTS if is_null(constraints_obj)
                       else self.constraints(constraints_obj, first_index, site, top.get("site")))
        ha = NO_HA if is_null(ha_obj) else self.ha(ha_obj, "ha")
        expose = () if is_null(top.get("expose")) else self.expose(top["expose"], {vm.name: vm for vm in vms})
        return VESpec(name=name, vms=tuple(vms), site=site, constraints=constraints, ha=ha, networks=networks,
                      expose=expose)

    def networks(self, obj: object) -> tuple[NetworkSpec, ...]:
        """The VE's networks: names unique, subnets (the canonical CIDR) apart from each other."""
        items = self.items(obj, "networks", "a list of networks")
        if not 1 <= len(items) <= MAX_NETWORKS:
            raise self.error(obj, "networks", f"must list 1 to {MAX_NETWORKS} networks, got {len(items)}")
        networks: list[NetworkSpec] = []
        first_index: dict[str, int] = {}
        for index, item in enumerate(items):
            path = f"networks[{index}]"
            fields = self.mapping(item, path, _NETWORK_KEYS, required=("name",))
            name = self.text(fields["name"], f"{path}.name", _NAME_RE, _NAME_RULE)
            first = first_index.setdefault(name, index)
            if first != index:
                raise self.error(fields["name"], f"{path}.name",
                                 f"duplicate network name {name!r}, already used by networks[{first}]")
            subnet = self.subnet(fields["subnet"], f"{path}.subnet") if "subnet" in fields else None
            for other in networks:
                other_subnet = other.ip_subnet
                if subnet is not None and other_subnet is not None and subnet.overlaps(other_subnet):
                    raise self.error(fields["subnet"], f"{path}.subnet", f"{subnet} of network {name!r} overlaps "
                                     f"{other_subnet} of network {other.name!r}, networks[{first_index[other.name]}]")
            nat = self.boolean(fields["nat"], f"{path}.nat") if "nat" in fields else False
            networks.append(NetworkSpec(name, str(subnet) if subnet is not None else None, nat))
        return tuple(networks)

    def subnet(self, obj: object, path: str) -> IPv4Network:
        """An IPv4 subnet written as CIDR, its prefix length in PREFIX_RANGE and no host bit set."""
        written = _ipv4(IPv4Interface, obj)
        if written is None:
            raise self.error(obj, path, f"must be an IPv4 subnet in CIDR notation, as in 10.20.0.0/24, "
                             f"got {describe(obj)}")
        subnet = written.network
        low, high = PREFIX_RANGE
        if not low <= subnet.prefixlen <= high:
            raise self.error(obj, path, f"prefix length must be from /{low} to /{high}, got /{subnet.prefixlen}")
        if written.ip != subnet.network_address:
            raise self.error(obj, path, f"{written} has host bits set; the subnet is {subnet}")
        return subnet

    def nics(self, obj: object, path: str, subnets: Mapping[str, IPv4Network | None],
             addresses: dict[str, str]) -> tuple[NicSpec, ...]:
        """A VM's NICs, at most one per network; `addresses` holds the fixed addresses of the VE's NICs so far."""
        items = self.items(obj, path, "a list of NICs")
        if len(items) > MAX_NICS:
            raise self.error(obj, path, f"must list at most {MAX_NICS} NICs, got {len(items)}")
        nics: list[NicSpec] = []
        first_index: dict[str, int] = {}  # network -> the NIC on it
        for index, item in enumerate(items):
            nic_path = f"{path}[{index}]"
            fields = self.mapping(item, nic_path, _NIC_KEYS, required=("network",))
            network = self.text(fields["network"], f"{nic_path}.network", _NAME_RE, _NAME_RULE)
            if network not in subnets:
                raise self.error(fields["network"], f"{nic_path}.network",
                                 f"no network named {network!r} in networks ({', '.join(subnets)})")
            first = first_index.setdefault(network, index)
            if first != index:
                raise self.error(fields["network"], f"{nic_path}.network",
                                 f"this VM already has a NIC on network {network!r}, {path}[{first}]")
            address = (self.address(fields["address"], f"{nic_path}.address", network, subnets[network])
                       if "address" in fields else None)
            if address is not None:
                if address in addresses:
                    raise self.error(fields["address"], f"{nic_path}.address",
                                     f"{address} is already the address of {addresses[address]}")
                addresses[address] = nic_path
            nics.append(NicSpec(network, address))
        return tuple(nics)

    def address(self, obj: object, path: str, network: str, subnet: IPv4Network | None) -> str:
        """A fixed IPv4 address: a host of the network's subnet, neither its first (the gateway) nor its last."""
        address = _ipv4(IPv4Address, obj)
        if address is None:
            raise self.error(obj, path, f"must be an IPv4 address, as in 10.20.0.10, got {describe(obj)}")
        if subnet is None:
            raise self.error(obj, path, f"network {network!r} has no subnet to check {address} against: "
                             f"give the network a subnet, or leave the address to DHCP")
        if address not in subnet:
            raise self.error(obj, path, f"{address} is outside network {network!r} ({subnet})")
        reserved = {subnet.network_address: "the network address", subnet.network_address + 1: "the gateway",
                    subnet.broadcast_address: "the broadcast address"}
        if address in reserved:
            raise self.error(obj, path, f"{address} is {reserved[address]} of {subnet}; a fixed address is from "
                             f"{subnet.network_address + 2} to {subnet.broadcast_address - 1}")
        return str(address)

    def expose(self, obj: object, vms: Mapping[str, VMSpec]) -> tuple[ExposeSpec, ...]:
        """The forwarded ports: each to a VM with a NIC, each (host port, protocol) once in the VE."""
        items = self.items(obj, "expose", "a list of exposed ports")
        if len(items) > MAX_EXPOSED:
            raise self.error(obj, "expose", f"must list at most {MAX_EXPOSED} exposed ports, got {len(items)}")
        exposed: list[ExposeSpec] = []
        first_index: dict[tuple[int, str], int] = {}  # (host port, protocol) -> the entry that exposes it
        for index, item in enumerate(items):
            path = f"expose[{index}]"
            fields = self.mapping(item, path, _EXPOSE_KEYS, required=("vm", "port", "host_port"))
            vm = self.text(fields["vm"], f"{path}.vm", _NAME_RE, _NAME_RULE)
            if vm not in vms:
                raise self.error(fields["vm"], f"{path}.vm", f"no VM named {vm!r} in vms")
            if not vms[vm].nics:
                raise self.error(fields["vm"], f"{path}.vm", f"VM {vm!r} has no NIC to forward to (nics: [])")
            port = self.integer(fields["port"], f"{path}.port", PORT_RANGE)
            host_port = self.integer(fields["host_port"], f"{path}.host_port", PORT_RANGE)
            protocol = (self.choice(fields["protocol"], f"{path}.protocol", TRANSPORTS)
                        if "protocol" in fields else "tcp")
            first = first_index.setdefault((host_port, protocol), index)
            if first != index:
                raise self.error(fields["host_port"], f"{path}.host_port",
                                 f"host port {host_port}/{protocol} is already exposed by expose[{first}]")
            exposed.append(ExposeSpec(vm, port, host_port, protocol))
        return tuple(exposed)

    def ha(self, obj: object, path: str) -> HaPolicy:
        """The HA policy; a key that does not apply to its mode is refused (a `copies` under `restart` is a
        mistake, not a wish to ignore), so is a `keep` without the `snapshot_every` it counts."""
        fields = self.mapping(obj, path, _HA_KEYS, required=("mode",))
        mode = self.choice(fields["mode"], f"{path}.mode", HA_MODES)
        values = {key: value for key, value in fields.items() if key != "mode" and not is_null(value)}
        for key, value in values.items():
            if mode not in _HA_ONLY[key]:
                raise self.error(value, f"{path}.{key}", f"only for mode {' or '.join(_HA_ONLY[key])} (mode is {mode})")
        if "keep" in values and "snapshot_every" not in values:
            raise self.error(values["keep"], f"{path}.keep", "counts periodic snapshots: give snapshot_every too")
        every = (self.duration(values["snapshot_every"], f"{path}.snapshot_every", SNAPSHOT_EVERY_RANGE)
                 if "snapshot_every" in values else None)
        keep = self.integer(values["keep"], f"{path}.keep", KEEP_RANGE) if "keep" in values else None
        copies = self.integer(values.get("copies", 1), f"{path}.copies", (1, MAX_COPIES)) if mode == "standby" else 0
        priority = self.integer(values["priority"], f"{path}.priority", PRIORITY_RANGE) if "priority" in values else 0
        replication = "async"
        if "replication" in values:  # YAML reads a bare `off` as false (a YAML node; on the wire, a string only)
            replication = ("off" if isinstance(values["replication"], Node) and boolean(values["replication"]) is False
                           else self.choice(values["replication"], f"{path}.replication", REPLICATION_MODES))
        bandwidth = (self.integer(values["bandwidth"], f"{path}.bandwidth", BANDWIDTH_RANGE)
                     if "bandwidth" in values else None)
        max_lag = (self.duration(values["max_lag"], f"{path}.max_lag", MAX_LAG_RANGE)
                   if "max_lag" in values else DEFAULT_MAX_LAG)
        return HaPolicy(mode, copies, every, keep if keep is not None or every is None else DEFAULT_KEEP, priority,
                        replication, bandwidth, max_lag)

    def constraints(self, obj: object, vms: Mapping[str, int], site: str | None, site_obj: object) -> Constraints:
        """The constraints, refusing unknown VMs and contradictions that need no knowledge of the nodes."""
        path = "constraints"
        fields = self.mapping(obj, path, _CONSTRAINT_KEYS, required=())
        values = {key: value for key, value in fields.items() if not is_null(value)}
        affinity = self.groups(values.get("affinity", ()), f"{path}.affinity", vms)
        anti = self.groups(values.get("anti_affinity", ()), f"{path}.anti_affinity", vms)
        same_site = self.boolean(values["same_site"], f"{path}.same_site") if "same_site" in values else False
        spread = (self.integer(values["spread_sites"], f"{path}.spread_sites", (1, MAX_VMS))
                  if "spread_sites" in values else None)
        per_node = (self.integer(values["max_per_node"], f"{path}.max_per_node", (1, MAX_VMS))
                    if "max_per_node" in values else None)
        constraints = Constraints(tuple(g for g, _ in affinity), tuple(g for g, _ in anti), same_site, spread, per_node)
        together = constraints.together()
        unit = {name: index for index, group in enumerate(together) for name in group}
        for index, (group, group_obj) in enumerate(anti):
            seen: dict[int, str] = {}  # affinity group -> the first VM of this anti-affinity group in it
            for name in group:
                if name not in unit:
                    continue
                first = seen.setdefault(unit[name], name)
                if first != name:
                    raise self.error(group_obj, f"{path}.anti_affinity[{index}]",
                                     f"vms {first!r} and {name!r} must be on different nodes, but affinity "
                                     f"[{', '.join(together[unit[name]])}] puts them on one node")
        largest = max(together, key=len, default=())
        if per_node is not None and len(largest) > per_node:
            raise self.error(values["max_per_node"], f"{path}.max_per_node",
                             f"{per_node} is less than the {len(largest)} VMs that affinity puts on one node "
                             f"({', '.join(largest)})")
        if spread is not None and spread > 1:
            spread_obj, spread_path = values["spread_sites"], f"{path}.spread_sites"
            what = f"spread over {spread} sites"
            if same_site:
                raise self.error(spread_obj, spread_path, f"{what} contradicts same_site: true")
            if site is not None:
                where = f" (line {yamlfields.line(site_obj)})" if yamlfields.line(site_obj) else ""
                raise self.error(spread_obj, spread_path, f"{what} contradicts the pinned site {site}{where}")
            if spread > len(vms):
                raise self.error(spread_obj, spread_path, f"{what} needs at least {spread} VMs, the VE has {len(vms)}")
            apart = len(vms) - sum(len(group) - 1 for group in together)
            if spread > apart:
                raise self.error(spread_obj, spread_path, f"{what} needs {spread} VMs that can be apart; "
                                 f"affinity binds the {len(vms)} VMs into {apart} groups")
        return constraints

    def groups(self, obj: object, path: str, vms: Mapping[str, int]) -> list[tuple[tuple[str, ...], object]]:
        """A list of groups of at least two distinct VM names; each group with the value it came from."""
        groups: list[tuple[tuple[str, ...], object]] = []
        for index, group_obj in enumerate(self.items(obj, path, "a list of groups of VM names")):
            group_path = f"{path}[{index}]"
            names: list[str] = []
            for position, name_obj in enumerate(self.items(group_obj, group_path, "a list of VM names")):
                name_path = f"{group_path}[{position}]"
                name = self.text(name_obj, name_path, _NAME_RE, _NAME_RULE)
                if name not in vms:
                    raise self.error(name_obj, name_path, f"no VM named {name!r} in vms")
                if name in names:
                    raise self.error(name_obj, name_path, f"VM {name!r} is already in this group")
                names.append(name)
            if len(names) < 2:
                raise self.error(group_obj, group_path, f"a group needs at least 2 VMs, got {len(names)}")
            groups.append((tuple(names), group_obj))
        return groups

    def vm(self, obj: object, path: str, subnets: Mapping[str, IPv4Network | None],
           addresses: dict[str, str]) -> tuple[VMSpec, object]:
        """The VM and the value its name came from, to point at it if the name turns out to be taken. Its NICs
        are on the VE's networks, `subnets` (each network's subnet by name, in order); `addresses`: see `nics`."""
        fields = self.mapping(obj, path, _VM_KEYS, required=("name", "vcpus", "memory_mb"))
        vm = VMSpec(
            name=self.text(fields["name"], f"{path}.name", _NAME_RE, _NAME_RULE),
            vcpus=self.integer(fields["vcpus"], f"{path}.vcpus", VCPUS_RANGE),
            memory_mb=self.integer(fields["memory_mb"], f"{path}.memory_mb", MEMORY_MB_RANGE),
            disk_gb=(self.integer(fields["disk_gb"], f"{path}.disk_gb", DISK_GB_RANGE)
                     if "disk_gb" in fields else DEFAULT_DISK_GB),
            image=(self.text(fields["image"], f"{path}.image", _IMAGE_RE, _IMAGE_RULE)
                   if "image" in fields else DEFAULT_IMAGE),
            nics=(self.nics(fields["nics"], f"{path}.nics", subnets, addresses)
                  if "nics" in fields else _implied_nics(subnets)),
        )
        return vm, fields["name"]


def _implied_nics(networks: Iterable[str]) -> tuple[NicSpec, ...]:
    """The NICs of a VM that lists none: one on the first of the VE's networks (given by name)."""
    return tuple(NicSpec(name) for name in islice(networks, 1))


def _ipv4(kind: Callable[[str], A], obj: object) -> A | None:
    """An address or interface written as `kind` writes it (10.20.0.10, 10.20.0.0/24), None if it is not."""
    text = string(obj)
    try:
        value = kind(text) if text is not None else None
    except ValueError:  # ipaddress's AddressValueError and NetmaskValueError
        return None
    return value if str(value) == text else None

