"""Tests for the networks of a VE spec (discovery.ve.spec): `networks`, each VM's `nics` and `expose`, checked by
the validator both entry points share, and a spec that uses none of them encoded exactly as before."""

from __future__ import annotations

from ipaddress import IPv4Network
from pathlib import Path

import msgpack
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from discovery.ve.spec import (
    DEFAULT_NETWORKS,
    DEFAULT_NICS,
    MAX_EXPOSED,
    MAX_NETWORKS,
    MAX_NICS,
    ExposeSpec,
    NetworkSpec,
    NicSpec,
    SpecError,
    VESpec,
    VMSpec,
    load_spec,
    parse_spec,
)
from overlay.wire import codec
from tests.unit.test_spec import names, spec_error, vm_specs, wire_error

# Line numbers matter: the errors below name them.
NETWORKED = """\
name: shop
networks:
  - name: back
    subnet: 10.20.0.0/24
  - name: front
    subnet: 10.21.0.0/24
    nat: true
vms:
  - name: web
    vcpus: 1
    memory_mb: 256
    nics:
      - network: front
        address: 10.21.0.10
      - network: back
  - name: db
    vcpus: 1
    memory_mb: 256
expose:
  - {vm: web, port: 80, host_port: 8080}
"""

SHOP = VESpec(
    "shop",
    (VMSpec("web", 1, 256, nics=(NicSpec("front", "10.21.0.10"), NicSpec("back"))),
     VMSpec("db", 1, 256, nics=(NicSpec("back"),))),  # no nics: one on the first network
    networks=(NetworkSpec("back", "10.20.0.0/24"), NetworkSpec("front", "10.21.0.0/24", nat=True)),
    expose=(ExposeSpec("web", 80, 8080),),
)


def edited(**lines: str) -> str:
    """NETWORKED with lines replaced, by number (`l14="..."`); a replacement may span several lines."""
    rows = NETWORKED.splitlines()
    for key, text in lines.items():
        rows[int(key[1:]) - 1] = text
    return "\n".join(rows) + "\n"


def one_vm_with(**fields: object) -> dict[str, object]:
    return {"name": "x", "vms": [{"name": "a", "vcpus": 1, "memory_mb": 16}], **fields}


def test_networks_nics_and_expose_parse() -> None:
    assert parse_spec(NETWORKED) == SHOP


def test_the_example_parses() -> None:
    spec = load_spec(Path(__file__).parents[2] / "examples" / "web-net.yaml")
    assert spec == VESpec("web-net", SHOP.vms, networks=SHOP.networks, expose=SHOP.expose)


def test_a_spec_without_networks_has_one_default_network_and_one_nic_per_vm() -> None:
    spec = parse_spec("name: x\nvms:\n  - {name: a, vcpus: 1, memory_mb: 16}\n  - {name: b, vcpus: 1, memory_mb: 16}\n")
    assert spec.networks == DEFAULT_NETWORKS == (NetworkSpec("default"),)
    assert [vm.nics for vm in spec.vms] == [DEFAULT_NICS] * 2 == [(NicSpec("default"),)] * 2
    assert spec.expose == ()
    assert spec == VESpec("x", (VMSpec("a", 1, 16), VMSpec("b", 1, 16)))  # a VM built in code: the same NIC
    assert parse_spec("name: x\nnetworks: ~\nexpose:\nvms: [{name: a, vcpus: 1, memory_mb: 16}]\n") == VESpec(
        "x", (VMSpec("a", 1, 16),))


def test_a_spec_without_networks_encodes_as_before_networks_existed() -> None:
    spec = VESpec("x", (VMSpec("a", 1, 16),))
    before = {"name": "x", "site": None, "vms": [{"name": "a", "vcpus": 1, "memory_mb": 16, "disk_gb": 1,
                                                  "image": "none"}]}
    assert spec.to_dict() == before
    assert codec.encode(spec) == before  # as a VE record writes it
    assert VESpec.from_dict(before) == spec


def test_nics_default_to_the_first_network_and_may_be_none() -> None:
    spec = parse_spec(edited(l18="    memory_mb: 256\n    nics: []"))
    assert spec.vms[1].nics == ()
    spec = parse_spec(edited(l12="    nics:\n      - network: back", l13="", l14="", l15=""))
    assert [vm.nics for vm in spec.vms] == [(NicSpec("back"),), (NicSpec("back"),)]


def test_to_dict_leaves_out_what_is_the_default() -> None:
    data = SHOP.to_dict()
    assert data == {
        "name": "shop", "site": None,
        "vms": [{"name": "web", "vcpus": 1, "memory_mb": 256, "disk_gb": 1, "image": "none",
                 "nics": [{"network": "front", "address": "10.21.0.10"}, {"network": "back"}]},
                {"name": "db", "vcpus": 1, "memory_mb": 256, "disk_gb": 1, "image": "none"}],
        "networks": [{"name": "back", "subnet": "10.20.0.0/24"}, {"name": "front", "subnet": "10.21.0.0/24",
                                                                 "nat": True}],
        "expose": [{"vm": "web", "port": 80, "host_port": 8080}],
    }
    assert VESpec.from_dict(data) == SHOP
    assert VESpec.from_dict(msgpack.unpackb(msgpack.packb(data))) == SHOP
    assert parse_spec(yaml.safe_dump(data)) == SHOP


def test_a_vm_without_a_nic_says_so_on_the_wire() -> None:
    spec = VESpec("x", (VMSpec("a", 1, 16, nics=()),))
    assert spec.to_dict()["vms"][0]["nics"] == []
    assert VESpec.from_dict(spec.to_dict()) == spec


def test_a_nic_on_a_network_named_default_that_is_not_first_travels() -> None:
    """The codec leaves out nics equal to the field's default; to_dict must keep them where the validator's
    default (the first network) differs."""
    spec = VESpec("x", (VMSpec("a", 1, 16),), networks=(NetworkSpec("back"), NetworkSpec("default")))
    assert spec.to_dict()["vms"][0]["nics"] == [{"network": "default"}]
    assert VESpec.from_dict(spec.to_dict()) == spec


def test_a_record_keeps_a_networked_spec() -> None:
    """A VE record encodes its spec with the codec, not to_dict: it must read back the same."""
    assert codec.decode(VESpec, msgpack.unpackb(msgpack.packb(codec.encode(SHOP)))) == SHOP


def test_addresses_at_the_edges_of_a_subnet_and_both_protocols_on_one_port() -> None:
    spec = parse_spec(edited(l6="    subnet: 10.21.0.0/29", l14="        address: 10.21.0.6",
                             l18="    memory_mb: 256\n    nics: [{network: front, address: 10.21.0.2}]",
                             l20="  - {vm: web, port: 53, host_port: 53}\n"
                                 "  - {vm: db, port: 53, host_port: 53, protocol: udp}"))
    assert spec.vms[0].nics[0].address == "10.21.0.6" and spec.vms[1].nics[0].address == "10.21.0.2"
    assert spec.expose == (ExposeSpec("web", 53, 53), ExposeSpec("db", 53, 53, "udp"))
    assert parse_spec(edited(l4="    subnet: 10.0.0.0/16")).networks[0].subnet == "10.0.0.0/16"


def test_the_limits_are_inclusive() -> None:
    networks = [{"name": f"n{i}"} for i in range(MAX_NETWORKS)]
    nics = [{"network": f"n{i}"} for i in range(MAX_NICS)]
    exposed = [{"vm": "a", "port": 80, "host_port": 1000 + i} for i in range(MAX_EXPOSED)]
    spec = VESpec.from_dict({"name": "x", "networks": networks, "expose": exposed,
                             "vms": [{"name": "a", "vcpus": 1, "memory_mb": 16, "nics": nics}]})
    assert (len(spec.networks), len(spec.vms[0].nics), len(spec.expose)) == (MAX_NETWORKS, MAX_NICS, MAX_EXPOSED)


NAME_RULE = "must be 1-63 characters of a-z, 0-9, '.', '_' or '-', starting and ending with a letter or digit"
CIDR = "must be an IPv4 subnet in CIDR notation, as in 10.20.0.0/24, got"
FRONT_HOSTS = "a fixed address is from 10.21.0.2 to 10.21.0.254"


@pytest.mark.parametrize(("lines", "message"), [
    # shapes, keys and types
    ({"l2": "networks: back", "l3": "#", "l4": "#", "l5": "#", "l6": "#", "l7": "#"},
     "2: networks: expected a list of networks, got 'back'"),
    ({"l3": "  - back", "l4": "#"}, "3: networks[0]: expected a mapping, got 'back'"),
    ({"l4": "    colour: red"}, "4: networks[0]: unknown key 'colour'; allowed keys are name, subnet, nat"),
    ({"l3": "  - subnet: 10.20.0.0/24", "l4": "#"}, "3: networks[0]: missing required key 'name'"),
    ({"l5": "  - name: Front"}, f"5: networks[1].name: {NAME_RULE}, got 'Front'"),
    ({"l7": "    nat: 1"}, "7: networks[1].nat: must be true or false, got 1"),
    ({"l12": "    nics: front", "l13": "#", "l14": "#", "l15": "#"},
     "12: vms[0].nics: expected a list of NICs, got 'front'"),
    ({"l12": "    nics:", "l13": "#", "l14": "#", "l15": "#"}, "12: vms[0].nics: expected a list of NICs, got null"),
    ({"l14": "        colour: red"}, "14: vms[0].nics[0]: unknown key 'colour'; allowed keys are network, address"),
    ({"l15": "      - {}"}, "15: vms[0].nics[1]: missing required key 'network'"),
    ({"l19": "expose: {vm: web}", "l20": "#"}, "19: expose: expected a list of exposed ports, got a mapping"),
    ({"l20": "  - {vm: web, port: 80, host_port: 8080, proto: udp}"},
     "20: expose[0]: unknown key 'proto'; allowed keys are vm, port, host_port, protocol"),
    ({"l20": "  - {vm: web, host_port: 8080}"}, "20: expose[0]: missing required key 'port'"),
    # networks
    ({"l5": "  - name: back"}, "5: networks[1].name: duplicate network name 'back', already used by networks[0]"),
    ({"l4": "    subnet: 10.20.0.0"}, f"4: networks[0].subnet: {CIDR} '10.20.0.0'"),
    ({"l4": "    subnet: 10.20.0.0/255.255.255.0"}, f"4: networks[0].subnet: {CIDR} '10.20.0.0/255.255.255.0'"),
    ({"l4": "    subnet: 10.20.0.300/24"}, f"4: networks[0].subnet: {CIDR} '10.20.0.300/24'"),
    ({"l4": "    subnet: '10.020.0.0/24'"}, f"4: networks[0].subnet: {CIDR} '10.020.0.0/24'"),
    ({"l4": "    subnet: 'fd00::/64'"}, f"4: networks[0].subnet: {CIDR} 'fd00::/64'"),
    ({"l4": "    subnet: 24"}, f"4: networks[0].subnet: {CIDR} 24"),
    ({"l4": "    subnet: ~"}, f"4: networks[0].subnet: {CIDR} null"),
    ({"l4": "    subnet: 10.20.0.5/24"}, "4: networks[0].subnet: 10.20.0.5/24 has host bits set; the subnet is "
                                        "10.20.0.0/24"),
    ({"l4": "    subnet: 10.20.0.0/15"}, "4: networks[0].subnet: prefix length must be from /16 to /29, got /15"),
    ({"l4": "    subnet: 10.20.0.0/30"}, "4: networks[0].subnet: prefix length must be from /16 to /29, got /30"),
    ({"l6": "    subnet: 10.20.0.128/25"}, "6: networks[1].subnet: 10.20.0.128/25 of network 'front' overlaps "
                                          "10.20.0.0/24 of network 'back', networks[0]"),
    ({"l6": "    subnet: 10.20.0.0/16"}, "6: networks[1].subnet: 10.20.0.0/16 of network 'front' overlaps "
                                        "10.20.0.0/24 of network 'back', networks[0]"),
    # nics
    ({"l15": "      - network: middle"}, "15: vms[0].nics[1].network: no network named 'middle' in networks "
                                         "(back, front)"),
    ({"l15": "      - network: front"}, "15: vms[0].nics[1].network: this VM already has a NIC on network 'front', "
                                        "vms[0].nics[0]"),
    ({"l14": "        address: 10.21.0"}, "14: vms[0].nics[0].address: must be an IPv4 address, as in 10.20.0.10, "
                                          "got '10.21.0'"),
    ({"l14": "        address: 10.21.0.10/24"}, "14: vms[0].nics[0].address: must be an IPv4 address, as in "
                                                "10.20.0.10, got '10.21.0.10/24'"),
    ({"l14": "        address: 42"}, "14: vms[0].nics[0].address: must be an IPv4 address, as in 10.20.0.10, got 42"),
    ({"l14": "        address: 10.20.0.10"}, "14: vms[0].nics[0].address: 10.20.0.10 is outside network 'front' "
                                             "(10.21.0.0/24)"),
    ({"l14": "        address: 10.21.0.0"}, "14: vms[0].nics[0].address: 10.21.0.0 is the network address of "
                                            f"10.21.0.0/24; {FRONT_HOSTS}"),
    ({"l14": "        address: 10.21.0.1"}, "14: vms[0].nics[0].address: 10.21.0.1 is the gateway of "
                                            f"10.21.0.0/24; {FRONT_HOSTS}"),
    ({"l14": "        address: 10.21.0.255"}, "14: vms[0].nics[0].address: 10.21.0.255 is the broadcast address of "
                                              f"10.21.0.0/24; {FRONT_HOSTS}"),
    ({"l6": "    # no subnet"}, "14: vms[0].nics[0].address: network 'front' has no subnet to check 10.21.0.10 "
                                "against: give the network a subnet, or leave the address to DHCP"),
    ({"l18": "    memory_mb: 256\n    nics: [{network: front, address: 10.21.0.10}]"},
     "19: vms[1].nics[0].address: 10.21.0.10 is already the address of vms[0].nics[0]"),
    # expose
    ({"l20": "  - {vm: cache, port: 80, host_port: 8080}"}, "20: expose[0].vm: no VM named 'cache' in vms"),
    ({"l18": "    memory_mb: 256\n    nics: []", "l20": "  - {vm: db, port: 5432, host_port: 5432}"},
     "21: expose[0].vm: VM 'db' has no NIC to forward to (nics: [])"),
    ({"l20": "  - {vm: web, port: 0, host_port: 8080}"},
     "20: expose[0].port: must be an integer between 1 and 65535, got 0"),
    ({"l20": "  - {vm: web, port: '80', host_port: 8080}"},
     "20: expose[0].port: must be an integer between 1 and 65535, got '80'"),
    ({"l20": "  - {vm: web, port: 80, host_port: 65536}"},
     "20: expose[0].host_port: must be an integer between 1 and 65535, got 65536"),
    ({"l20": "  - {vm: web, port: 80, host_port: 8080, protocol: sctp}"},
     "20: expose[0].protocol: must be one of tcp, udp, got 'sctp'"),
    ({"l20": "  - {vm: web, port: 80, host_port: 8080}\n  - {vm: db, port: 443, host_port: 8080, protocol: tcp}"},
     "21: expose[1].host_port: host port 8080/tcp is already exposed by expose[0]"),
])
def test_network_errors_name_the_line_and_field(lines: dict[str, str], message: str) -> None:
    assert spec_error(edited(**lines)) == f"spec.yaml:{message}"


def test_one_past_the_limits_is_refused() -> None:
    networks = "".join(f"\n  - name: n{i}" for i in range(MAX_NETWORKS + 1))
    assert spec_error(edited(l2="networks:" + networks, l3="#", l4="#", l5="#", l6="#", l7="#")) == (
        "spec.yaml:3: networks: must list 1 to 16 networks, got 17")
    assert spec_error(edited(l2="networks: []", l3="#", l4="#", l5="#", l6="#", l7="#")) == (
        "spec.yaml:2: networks: must list 1 to 16 networks, got 0")
    nics = "".join(f"\n      - network: n{i}" for i in range(MAX_NICS + 1))
    assert spec_error(edited(l12="    nics:" + nics, l13="#", l14="#", l15="#")) == (
        "spec.yaml:13: vms[0].nics: must list at most 8 NICs, got 9")
    exposed = "".join(f"\n  - {{vm: web, port: 80, host_port: {1000 + i}}}" for i in range(MAX_EXPOSED + 1))
    assert spec_error(edited(l19="expose:" + exposed, l20="#")) == (
        "spec.yaml:20: expose: must list at most 64 exposed ports, got 65")


def test_unknown_top_level_keys_list_the_new_ones() -> None:
    assert spec_error(edited(l1="name: shop\nnetwork: []")) == (
        "spec.yaml:2: unknown key 'network'; allowed keys are name, site, vms, constraints, ha, networks, expose")


@pytest.mark.parametrize(("data", "message"), [
    (one_vm_with(networks={"name": "a"}), "networks: expected a list of networks, got a mapping"),
    (one_vm_with(networks=[{"name": "a", "subnet": 5}]), f"networks[0].subnet: {CIDR} 5"),
    (one_vm_with(networks=[{"name": "a", "nat": "yes"}]), "networks[0].nat: must be true or false, got 'yes'"),
    (one_vm_with(networks=[{"name": "a", "subnet": None}]), f"networks[0].subnet: {CIDR} None"),
    (one_vm_with(expose=[{"vm": "a", "port": True, "host_port": 1}]),
     "expose[0].port: must be an integer between 1 and 65535, got True"),
    (one_vm_with(expose=[{"vm": "a", "port": 1, "host_port": 1, "protocol": None}]),
     "expose[0].protocol: must be one of tcp, udp, got None"),
    ({"name": "x", "vms": [{"name": "a", "vcpus": 1, "memory_mb": 16, "nics": [{"network": "default",
                                                                                "address": "10.0.0.5"}]}]},
     "vms[0].nics[0].address: network 'default' has no subnet to check 10.0.0.5 against: give the network a subnet, "
     "or leave the address to DHCP"),
    ({"name": "x", "vms": [{"name": "a", "vcpus": 1, "memory_mb": 16, "nics": [{"network": "lan"}]}]},
     "vms[0].nics[0].network: no network named 'lan' in networks (default)"),
])
def test_wire_errors(data: object, message: str) -> None:
    assert wire_error(data) == f"<wire>: {message}"


def test_wire_lists_may_be_tuples() -> None:
    spec = VESpec.from_dict({"name": "x", "networks": ({"name": "lan"},), "expose": ({"vm": "a", "port": 22,
                                                                                     "host_port": 2222},),
                             "vms": ({"name": "a", "vcpus": 1, "memory_mb": 16, "nics": ({"network": "lan"},)},)})
    assert spec == VESpec("x", (VMSpec("a", 1, 16, nics=(NicSpec("lan"),)),), networks=(NetworkSpec("lan"),),
                          expose=(ExposeSpec("a", 22, 2222),))


@st.composite
def networked_specs(draw: st.DrawFn) -> VESpec:
    """Valid specs with networks (sometimes one named `default`, not first), NICs (some with a fixed address,
    some VMs with none or the implied one) and exposed ports. Subnets that overlap an earlier one, addresses
    and host ports already taken are left out rather than drawn again."""
    network_names = draw(st.lists(names | st.just("default"), min_size=1, max_size=MAX_NETWORKS, unique=True))
    subnets: dict[str, IPv4Network | None] = {}
    for name in network_names:
        subnet = IPv4Network((draw(st.integers(0, 2**32 - 1)), draw(st.integers(16, 29))), strict=False)
        apart = not any(other is not None and other.overlaps(subnet) for other in subnets.values())
        subnets[name] = subnet if apart and draw(st.booleans()) else None
    networks = tuple(NetworkSpec(name, str(subnet) if subnet is not None else None, draw(st.booleans()))
                     for name, subnet in subnets.items())
    taken: set[str] = set()
    vms: list[VMSpec] = []
    for vm in draw(st.lists(vm_specs, min_size=1, max_size=8, unique_by=lambda vm: vm.name)):
        if draw(st.booleans()):
            vms.append(VMSpec(vm.name, vm.vcpus, vm.memory_mb, vm.disk_gb, vm.image, (NicSpec(network_names[0]),)))
            continue
        on = draw(st.permutations(network_names))[:draw(st.integers(0, min(MAX_NICS, len(network_names))))]
        nics = []
        for network in on:
            own = subnets[network]
            address = (str(own.network_address + draw(st.integers(2, own.num_addresses - 2)))
                       if own is not None and draw(st.booleans()) else None)
            if address in taken:
                address = None
            elif address is not None:
                taken.add(address)
            nics.append(NicSpec(network, address))
        vms.append(VMSpec(vm.name, vm.vcpus, vm.memory_mb, vm.disk_gb, vm.image, tuple(nics)))
    reachable = [vm.name for vm in vms if vm.nics]
    exposed: dict[tuple[int, str], ExposeSpec] = {}
    for _ in range(draw(st.integers(0, 6)) if reachable else 0):
        entry = ExposeSpec(draw(st.sampled_from(reachable)), draw(st.integers(1, 65535)), draw(st.integers(1, 65535)),
                           draw(st.sampled_from(("tcp", "udp"))))
        exposed.setdefault((entry.host_port, entry.protocol), entry)
    return VESpec(draw(names), tuple(vms), networks=networks, expose=tuple(exposed.values()))


@given(networked_specs())
def test_networked_specs_round_trip(spec: VESpec) -> None:
    data = spec.to_dict()
    assert VESpec.from_dict(data) == spec
    assert VESpec.from_dict(msgpack.unpackb(msgpack.packb(data))) == spec
    assert parse_spec(yaml.safe_dump(data)) == spec
    assert codec.decode(VESpec, codec.encode(spec)) == spec
    implied = (NicSpec(spec.networks[0].name),)
    assert [("nics" in vm) for vm in data["vms"]] == [vm.nics != implied for vm in spec.vms]  # sparse


wire_keys = st.sampled_from(["name", "vms", "vcpus", "memory_mb", "networks", "subnet", "nat", "nics", "network",
                             "address", "expose", "vm", "port", "host_port", "protocol"])
wire_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70000) | st.sampled_from(["a", "default", "10.0.0.0/24", "10.0.0.5",
                                                                          "tcp"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(wire_keys, inner),
    max_leaves=25,
)


@given(wire_values)
def test_arbitrary_network_wire_data_raises_only_spec_error(data: object) -> None:
    try:
        VESpec.from_dict(data)
    except SpecError as err:
        assert "\n" not in str(err)


@given(st.data())
def test_mangled_networked_specs_raise_only_spec_error(data: st.DataObject) -> None:
    position = data.draw(st.integers(0, len(NETWORKED)))
    insert = data.draw(st.text(alphabet=" \n-:[]{}&*!'\"#abc01./", max_size=10))
    try:
        parse_spec(NETWORKED[:position] + insert + NETWORKED[position:], "fuzz.yaml")
    except SpecError as err:
        assert "\n" not in str(err)
