"""The addresses of a VE's networks, decided once at create: each network's subnet and VXLAN identifier (VNI),
each NIC's MAC and IPv4 address. Sans-IO: the VNIs are claimed in the directory by `discovery.ve.vnis`.

Where they live. In the VE record (`VERecord.networks`, `VERecord.nics`: `NetState`, `Nic`), written with the
record's claim, so address management is the directory's compare-and-set on one record: no address is handed
out twice, even under concurrent creates, because one record is written by one winner. Two VEs may use the
same subnet (each network is its own layer 2 segment, its own VNI: the isolation OpenStack's tenant networks
give), so nothing is allocated across VEs but the VNI. The record outlives every move, failover and rebuild,
so a VM keeps its MAC and address wherever it runs.

Choices:
- a network without a subnet in its spec gets the first of DEFAULT_SUBNETS (10.0.0.0/24, 10.1.0.0/24, ...) that
  overlaps none of the VE's other subnets;
- the first host of a subnet is the gateway (the host's agent answers there: DHCP, NAT), so addresses are handed
  out from the second host up, in the order of the VMs and their NICs, skipping the fixed ones;
- a MAC is locally administered and unicast (02:...), drawn from a hash of the VE's incarnation, the VM and the
  network, and drawn again on a clash within the VE (a clash between VEs does not matter: their segments are
  apart);
- VNIs are drawn in the same way from VNI_RANGE, below which an operator keeps room for VXLANs of their own.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping
from ipaddress import IPv4Network
from typing import TypeVar

from discovery.ve.records import Nic
from discovery.ve.spec import VESpec

T = TypeVar("T")
VNI_RANGE = (4096, 2**24 - 1)
"""VXLAN identifiers a VE network may get (24 bits); those below are left to the operator."""
DEFAULT_SUBNETS = (*(IPv4Network(f"10.{k}.0.0/24") for k in range(256)),
                   *(IPv4Network(f"172.{k}.0.0/24") for k in range(16, 32)),
                   *(IPv4Network(f"192.168.{k}.0/24") for k in range(256)))
"""Where a network without a subnet gets one: the first that overlaps none of the VE's others (private ranges)."""


class AddressingError(ValueError):
    """The VE's networks cannot be addressed: a subnet with fewer free hosts than NICs, say. One line."""


def subnets(spec: VESpec) -> dict[str, str]:
    """Each network's subnet: the spec's, or the first default one the others leave free."""
    taken = [IPv4Network(n.subnet) for n in spec.networks if n.subnet is not None]
    chosen: dict[str, str] = {}
    free = (s for s in DEFAULT_SUBNETS if not any(s.overlaps(t) for t in taken))
    for network in spec.networks:
        if network.subnet is not None:
            chosen[network.name] = network.subnet
        else:
            subnet = next(free, None)
            if subnet is None:
                raise AddressingError(f"VE {spec.name}: no free private /24 left for network {network.name!r}; "
                                      "give it a subnet")
            chosen[network.name] = str(subnet)
    return chosen


def nics(spec: VESpec, uid: str, subnet_of: Mapping[str, str]) -> dict[str, tuple[Nic, ...]]:
    """Every VM's NICs with their MAC and address (module docstring), by VM name; VMs without NICs left out."""
    fixed = {nic.address for vm in spec.vms for nic in vm.nics if nic.address is not None}
    hosts = {name: _hosts(IPv4Network(subnet), fixed) for name, subnet in subnet_of.items()}
    macs: set[str] = set()
    result: dict[str, tuple[Nic, ...]] = {}
    for vm in spec.vms:
        made = []
        for nic in vm.nics:
            address = nic.address
            if address is None:
                address = next(hosts[nic.network], None)
                if address is None:
                    raise AddressingError(f"VE {spec.name}: network {nic.network!r} ({subnet_of[nic.network]}) has "
                                          f"no address left for {vm.name}; give it a larger subnet")
            mac = next(m for m in _draws(f"mac/{uid}/{vm.name}/{nic.network}", _mac) if m not in macs)
            macs.add(mac)
            made.append(Nic(nic.network, mac, address))
        if made:
            result[vm.name] = tuple(made)
    return result


def vni_candidates(uid: str, network: str) -> Iterator[int]:
    """The VNIs a network of the VE incarnation `uid` tries in turn (`discovery.ve.vnis` claims the first free)."""
    low, high = VNI_RANGE
    return _draws(f"vni/{uid}/{network}", lambda digest: low + int.from_bytes(digest[:4], "big") % (high - low + 1))


def _hosts(subnet: IPv4Network, fixed: set[str]) -> Iterator[str]:
    """The subnet's addresses to hand out, in order: from the second host, the fixed ones skipped."""
    gateway = subnet.network_address + 1
    return (str(a) for a in subnet.hosts() if a != gateway and str(a) not in fixed)


def _draws(seed: str, shape: Callable[[bytes], T]) -> Iterator[T]:
    """An endless, reproducible sequence of values drawn from hashes of `seed` and a counter."""
    attempt = 0
    while True:
        yield shape(hashlib.sha256(f"{seed}/{attempt}".encode()).digest())
        attempt += 1


def _mac(digest: bytes) -> str:
    """A locally administered unicast MAC: the first byte 0x02 (the local bit set, the multicast bit clear)."""
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))
