"""The testbed's plan and delay line, without a namespace: addresses, rules, delays, spec checks."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from discovery.testbed.plan import (
    DELAY_TABLE,
    PARTITION_PREFS,
    SpecError,
    default_rtt,
    make_plan,
    matrix_rtt,
    site_names,
    uniform_rtt,
    within,
)
from discovery.testbed.relay import DelayLine, forward, read_counts


def _packet(src: str, dst: str, payload: bytes = b"x") -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, 6, 0,
                         bytes(map(int, src.split("."))), bytes(map(int, dst.split("."))))
    return header + payload


def test_nodes_are_spread_round_robin_with_a_subnet_per_site():
    plan = make_plan(5, ["a", "b"], uniform_rtt(2, 30), 100)
    assert [(n.name, n.site, n.address, n.namespace) for n in plan.nodes] == [
        ("node1", 0, "10.213.1.1", "dtb-node1"), ("node2", 1, "10.213.2.1", "dtb-node2"),
        ("node3", 0, "10.213.1.2", "dtb-node3"), ("node4", 1, "10.213.2.2", "dtb-node4"),
        ("node5", 0, "10.213.1.3", "dtb-node5")]
    assert plan.gateway(1) == "10.213.2.254" and plan.subnet(0) == "10.213.1.0/24"
    assert plan.site_of("10.213.2.7") == 1 and plan.site_of("10.213.0.1") is None and plan.site_of("1.2.3.4") is None


def test_one_way_delay_is_half_the_sites_rtt_and_nothing_within_a_site_or_to_the_root():
    plan = make_plan(3, ["a", "b", "c"], [[0, 10, 40], [10, 0, 20], [40, 20, 0]], 100)
    assert plan.one_way_s("10.213.1.1", "10.213.3.1") == pytest.approx(0.020)
    assert plan.one_way_s("10.213.2.1", "10.213.1.1") == pytest.approx(0.005)
    assert plan.one_way_s("10.213.1.1", "10.213.1.2") == 0.0
    assert plan.one_way_s("10.213.1.1", "10.213.0.1") == 0.0


def test_an_asymmetric_matrix_is_made_symmetric_and_bad_specs_are_refused():
    plan = make_plan(2, ["a", "b"], [[5, 10], [30, 0]], 100)
    assert plan.rtt_ms == ((0.0, 20.0), (20.0, 0.0))
    with pytest.raises(SpecError, match="between 1 and 2"):
        make_plan(2, ["a", "b", "c"], uniform_rtt(3, 1), 100)
    with pytest.raises(SpecError, match="2x2"):
        make_plan(2, ["a", "b"], [[0, 1]], 100)
    with pytest.raises(SpecError, match="between 0 and 2000 ms"):
        make_plan(2, ["a", "b"], [[0, -1], [1, 0]], 100)
    with pytest.raises(SpecError, match="--bandwidth"):
        make_plan(2, ["a", "b"], uniform_rtt(2, 1), 0)


def test_site_names_default_rtts_and_measured_matrices():
    assert site_names(7) == ["rennes", "lyon", "nancy", "grenoble", "lille", "sophia", "site7"]
    assert default_rtt(["rennes", "lyon"]) == [[0.0, 14.0], [14.0, 0.0]]
    assert default_rtt(["rennes", "site7"])[0][1] == 20.0
    assert matrix_rtt([[0, 3, 9], [3, 0, 4], [9, 4, 0]], 2) == [[0.0, 3.0], [3.0, 0.0]]
    with pytest.raises(SpecError, match="missing"):
        matrix_rtt([[0, float("nan")], [1, 0]], 2)
    with pytest.raises(SpecError, match="fewer than"):
        matrix_rtt([[0]], 2)


def test_delay_rules_route_the_relays_output_and_local_traffic_before_sending_the_rest_to_it():
    plan = make_plan(2, ["a", "b"], uniform_rtt(2, 10), 100)
    rules = plan.delay_rules()
    assert rules[0][2:] == ["iif", "dly0", "lookup", "main"]
    to_relay = [r for r in rules if r[-1] == str(DELAY_TABLE)]
    assert [r[3] for r in to_relay] == ["br0", "br1"]
    local = [r for r in rules if r[-1] == "main" and "iif" in r and r[3].startswith("br")]
    assert all(int(lr[1]) < int(tr[1]) for lr in local for tr in to_relay)


def test_partition_rules_cut_a_node_or_a_site_both_ways_or_one_way():
    plan = make_plan(4, ["a", "b"], uniform_rtt(2, 10), 100)
    first = PARTITION_PREFS.start
    assert plan.partition_rules("node2", False, first) == [
        ["pref", str(first), "from", "10.213.2.1/32", "blackhole"],
        ["pref", str(first + 1), "to", "10.213.2.1/32", "blackhole"]]
    assert plan.partition_rules("node2", True, first) == [["pref", str(first), "from", "10.213.2.1/32", "blackhole"]]
    site = plan.partition_rules("b", False, first)
    assert site[0][2:] == ["from", "10.213.2.0/24", "to", "10.213.2.0/24", "lookup", "main"]  # the site still works
    assert [r[2:] for r in site[1:]] == [["from", "10.213.2.0/24", "blackhole"], ["to", "10.213.2.0/24", "blackhole"]]
    with pytest.raises(SpecError, match="no node 'node9'"):
        plan.partition_rules("node9", False, first)
    with pytest.raises(SpecError, match="heal"):
        plan.partition_rules("node1", False, PARTITION_PREFS.stop - 1)


def test_delay_line_holds_each_packet_its_pairs_delay_and_keeps_their_order():
    line = DelayLine(make_plan(3, ["a", "b", "c"], [[0, 10, 40], [10, 0, 20], [40, 20, 0]], 100))
    far, near, local = (_packet("10.213.1.1", "10.213.3.1", b"f"), _packet("10.213.1.1", "10.213.2.1", b"n"),
                        _packet("10.213.1.1", "10.213.1.2", b"l"))
    line.push(far, 100.0)
    line.push(near, 100.0)
    line.push(local, 100.0)
    line.push(_packet("10.213.1.1", "10.213.2.1", b"n2"), 100.001)
    assert line.due(100.0) == [local]
    assert line.next_due() == pytest.approx(100.005)
    assert line.due(100.0049) == []
    assert line.due(100.0061) == [near, _packet("10.213.1.1", "10.213.2.1", b"n2")]
    assert line.due(100.0199) == []
    assert line.due(100.02) == [far]
    assert line.next_due() is None
    line.push(b"\x60" + bytes(39), 5.0)  # IPv6 or anything else: passed on at once
    assert len(line.due(5.0)) == 1


def test_within_is_plus_or_minus_ten_percent():
    assert within(10.9, 10) and within(9.1, 10) and not within(11.1, 10) and not within(8.9, 10)


def test_delay_line_drops_the_newest_packets_past_its_limit():
    line = DelayLine(make_plan(2, ["a", "b"], uniform_rtt(2, 10), 100), limit=2)
    for k in range(3):
        line.push(_packet("10.213.1.1", "10.213.2.1", bytes([k])), 0.0)
    assert line.counts.dropped == {"queue_full": 1, "refused": 0}
    assert [p[-1] for p in line.due(1.0)] == [0, 1]


def test_the_relay_counts_what_it_forwards_and_what_the_tun_refuses_and_saves_it_whole(tmp_path: Path):
    line = DelayLine(make_plan(2, ["a", "b"], uniform_rtt(2, 10), 100))
    read, write = os.pipe()  # a TUN that takes packets, then one that refuses them
    forward(write, [b"p1", b"p2"], line.counts)
    os.close(read)
    forward(write, [b"p3"], line.counts)
    os.close(write)
    line.push(_packet("10.213.1.1", "10.213.2.1"), 0.0)
    path = tmp_path / "relay.json"
    assert read_counts(path) is None
    line.counts.save(path, line.held(), 12.5)
    assert read_counts(path) == {"forwarded": 2, "dropped": {"queue_full": 0, "refused": 1}, "held": 1, "at": 12.5}
    assert [f.name for f in tmp_path.iterdir()] == ["relay.json"]
