"""The way in and out of VE networks (`agents.network.uplink`): transit slots unique and stable on a host, each
host port forwarded once, and the nftables scripts that forward ports and NAT the uplink."""

from ipaddress import IPv4Interface

from hypothesis import given
from hypothesis import strategies as st

from agents.network.uplink import (
    SLOTS,
    Forward,
    Uplink,
    forwards,
    held_slots,
    host_ruleset,
    link_commands,
    namespace_ruleset,
    slot_of,
    slots,
    transit,
)


def test_a_transit_slot_is_a_link_local_31_clear_of_the_reserved_ranges():
    assert transit(0) == (IPv4Interface("169.254.1.0/31"), IPv4Interface("169.254.1.1/31"))
    assert transit(SLOTS - 1)[1] == IPv4Interface("169.254.168.255/31")
    assert slot_of("169.254.1.2") == 1 and slot_of("169.254.1.3") is None and slot_of("169.254.169.254") is None
    assert slot_of("10.0.0.1") is None


@given(st.sets(st.integers(1, 2**24 - 1), max_size=20), st.data())
def test_slots_are_unique_and_a_held_one_is_kept(wanted, data):
    held_vnis = data.draw(st.sets(st.sampled_from(sorted(wanted)), max_size=len(wanted))) if wanted else set()
    held = slots(held_vnis, {})  # what an earlier pass made
    got = slots(wanted, held)
    assert set(got) == wanted and len(set(got.values())) == len(got)
    assert all(got[vni] == held[vni] for vni in held_vnis)
    assert all(0 <= slot < SLOTS for slot in got.values())


def test_two_vnis_on_one_slot_take_the_next_free_one():
    assert slots([5, 5 + SLOTS], {}) == {5: 5, 5 + SLOTS: 6}
    assert slots([5 + SLOTS], {5: 5}) == {5 + SLOTS: 5}  # 5 is gone: its slot is free again


def test_a_host_port_is_forwarded_once_the_lowest_vni_keeping_it():
    web, other = Forward("tcp", 8080, "10.0.0.2", 80), Forward("tcp", 8080, "10.0.0.9", 8000)
    dns = Forward("udp", 8080, "10.0.0.9", 53)
    kept, dropped = forwards({7000: Uplink(forwards=frozenset({other, dns})), 5000: Uplink(True, frozenset({web}))})
    assert kept == {5000: {web}, 7000: {dns}} and dropped == [(7000, other)]


def test_the_host_dnats_its_ports_to_the_namespaces_and_masquerades_what_leaves_by_them():
    script = host_ruleset({5000: frozenset({Forward("tcp", 8080, "10.0.0.2", 80)}), 6000: frozenset()},
                          {5000: 3, 6000: 4})
    assert script.startswith("table ip discovery\ndelete table ip discovery\ntable ip discovery {\n")
    assert script.count("fib daddr type local tcp dport 8080 dnat to 169.254.1.7") == 2  # prerouting and output
    assert 'ip saddr 169.254.0.0/16 oifname != "dvu*" masquerade' in script


def test_a_namespace_forwards_only_its_ports_and_nats_out_only_when_asked():
    kept = frozenset({Forward("tcp", 8080, "10.0.0.2", 80)})
    closed, open_ = namespace_ruleset(False, kept), namespace_ruleset(True, kept)
    assert 'iifname "up0" tcp dport 8080 dnat to 10.0.0.2:80' in closed
    assert "policy drop;" in closed and "masquerade" not in closed and 'oifname "up0" accept' not in closed
    assert 'oifname "up0" masquerade' in open_ and 'iifname "eth0" oifname "up0" accept' in open_


def test_the_transit_veth_is_made_into_the_namespace_with_its_default_route():
    commands = link_commands(0x1388, 2, "dvn001388.n1")
    assert commands[0] == ["ip", "link", "add", "dvu001388", "type", "veth", "peer", "up0", "netns", "dvn001388.n1"]
    assert ["ip", "-n", "dvn001388.n1", "route", "add", "default", "via", "169.254.1.4"] in commands


def test_held_slots_are_read_from_the_transit_veths_addresses_only():
    addresses = [{"ifname": "dvu001388", "addr_info": [{"family": "inet", "local": "169.254.1.4"}]},
                 {"ifname": "dvuxyzxyz", "addr_info": [{"family": "inet", "local": "169.254.1.6"}]},
                 {"ifname": "eth0", "addr_info": [{"family": "inet", "local": "169.254.1.8"}]},
                 {"ifname": "dvu001389", "addr_info": [{"family": "inet6", "local": "fe80::1"}]}]
    assert held_slots(addresses) == {0x1388: 2}
