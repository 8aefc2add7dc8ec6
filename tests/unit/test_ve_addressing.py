"""A VE's addresses (`discovery.ve.addressing`): subnets, MACs and IPv4 addresses decided at create."""

from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from discovery.ve.addressing import VNI_RANGE, AddressingError, nics, subnets, vni_candidates
from discovery.ve.records import Nic
from discovery.ve.spec import NetworkSpec, NicSpec, VESpec, VMSpec, parse_spec


def test_a_ve_without_networks_gets_one_default_subnet_and_an_address_per_vm_from_the_second_host():
    spec = VESpec("shop", (VMSpec("db", 1, 256), VMSpec("web", 1, 256)))
    assert subnets(spec) == {"default": "10.0.0.0/24"}
    made = nics(spec, "u1", subnets(spec))
    assert [n.address for vm in ("db", "web") for n in made[vm]] == ["10.0.0.2", "10.0.0.3"]
    assert made == nics(spec, "u1", subnets(spec))  # the same incarnation, the same answer
    assert made["db"][0].mac != nics(spec, "u2", subnets(spec))["db"][0].mac  # another incarnation, another MAC


def test_fixed_addresses_are_kept_and_skipped_and_defaults_avoid_the_given_subnets():
    spec = parse_spec("""
name: shop
networks:
  - {name: back}
  - {name: front, subnet: 10.0.0.0/16}
vms:
  - {name: web, vcpus: 1, memory_mb: 256, nics: [{network: front, address: 10.0.0.2}, {network: back}]}
  - {name: db, vcpus: 1, memory_mb: 256, nics: [{network: front}]}
  - {name: bare, vcpus: 1, memory_mb: 256, nics: []}
""")
    assert subnets(spec) == {"back": "10.1.0.0/24", "front": "10.0.0.0/16"}  # 10.0.0.0/24 is inside front
    made = nics(spec, "u1", subnets(spec))
    assert [(n.network, n.address) for n in made["web"]] == [("front", "10.0.0.2"), ("back", "10.1.0.2")]
    assert [(n.network, n.address) for n in made["db"]] == [("front", "10.0.0.3")]
    assert "bare" not in made


def test_a_subnet_too_small_for_its_nics_is_one_line():
    spec = VESpec("big", tuple(VMSpec(f"vm{i}", 1, 64) for i in range(6)),
                  networks=(NetworkSpec("default", "10.9.0.0/29"),))
    with pytest.raises(AddressingError, match=r"^VE big: network 'default' \(10.9.0.0/29\) has no address left for "
                                              r"vm5; give it a larger subnet$"):
        nics(spec, "u1", subnets(spec))


def test_vnis_are_drawn_in_range_reproducibly_and_differ_between_networks():
    first = list(zip(range(5), vni_candidates("u1", "back"), strict=False))
    assert first == list(zip(range(5), vni_candidates("u1", "back"), strict=False))
    assert all(VNI_RANGE[0] <= vni <= VNI_RANGE[1] for _, vni in first)
    assert next(vni_candidates("u1", "back")) != next(vni_candidates("u1", "front"))


@st.composite
def specs(draw):
    """VEs of 1-3 networks (a given /24-/29 subnet or none) and 1-8 VMs with 0-3 NICs, some with fixed addresses."""
    count = draw(st.integers(1, 3))
    prefixes = [draw(st.sampled_from([None, 24, 28, 29])) for _ in range(count)]
    networks = tuple(NetworkSpec(f"n{i}", f"10.{200 + i}.0.0/{p}" if p else None) for i, p in enumerate(prefixes))
    fixed_used: set[str] = set()
    vms = []
    for v in range(draw(st.integers(1, 8))):
        chosen = draw(st.lists(st.sampled_from(networks), max_size=3, unique_by=lambda n: n.name))
        vm_nics = []
        for network in chosen:
            address = None
            if network.subnet and draw(st.booleans()):
                hosts = [str(a) for a in list(IPv4Network(network.subnet).hosts())[1:]]
                address = draw(st.sampled_from(hosts))
                if address in fixed_used:
                    address = None
                else:
                    fixed_used.add(address)
            vm_nics.append(NicSpec(network.name, address))
        vms.append(VMSpec(f"vm{v}", 1, 64, nics=tuple(vm_nics)))
    return VESpec("p", tuple(vms), networks=networks)


@settings(max_examples=300, deadline=None)
@given(specs(), st.text(min_size=1, max_size=8))
def test_no_address_or_mac_is_handed_out_twice_and_every_address_is_a_usable_host(spec, uid):
    subnet_of = subnets(spec)
    short = any(sum(1 for vm in spec.vms for n in vm.nics if n.network == network)
                > IPv4Network(subnet).num_addresses - 3 for network, subnet in subnet_of.items())
    try:
        made = nics(spec, uid, subnet_of)
    except AddressingError:
        assert short  # refused only when a network has more NICs than usable hosts
        return
    assert not short
    every: list[Nic] = [n for vm in made.values() for n in vm]
    assert len({n.mac for n in every}) == len(every)
    assert all(int(n.mac.split(":")[0], 16) & 0b11 == 0b10 for n in every)  # locally administered, unicast
    for network, subnet in subnet_of.items():
        net = IPv4Network(subnet)
        addresses = [IPv4Address(n.address) for n in every if n.network == network]
        assert len(set(addresses)) == len(addresses)
        assert all(a in net and a not in (net.network_address, net.network_address + 1, net.broadcast_address)
                   for a in addresses)
    for vm in spec.vms:  # fixed ones kept, in the VM's order
        assert [n.network for n in made.get(vm.name, ())] == [n.network for n in vm.nics]
        assert all(f.address in (None, m.address) for f, m in zip(vm.nics, made.get(vm.name, ()), strict=True))
