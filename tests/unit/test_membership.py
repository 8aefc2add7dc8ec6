"""SWIM-style membership: merge precedence, suspicion, refutation, and malformed tables."""

import random

from overlay.membership import ALIVE, DEAD, LEFT, SUSPECT, Membership


def table(name, status, inc, addr="127.0.0.1:1", site="s"):
    return [{"name": name, "addr": addr, "site": site, "status": status, "incarnation": inc}]


def test_new_member_is_announced_once():
    m = Membership("a", "127.0.0.1:1", "s")
    events = m.merge(table("b", ALIVE, 0), now=0)
    assert [(k, x.name) for k, x in events] == [("member_joined", "b")]
    assert m.merge(table("b", ALIVE, 0), now=1) == []


def test_worse_news_wins_at_equal_incarnation_and_higher_incarnation_wins_always():
    m = Membership("a", "127.0.0.1:1", "s")
    m.merge(table("b", ALIVE, 3), now=0)
    assert [k for k, _ in m.merge(table("b", SUSPECT, 3), now=1)] == ["member_suspect"]
    assert m.merge(table("b", ALIVE, 3), now=2) == []  # stale alive cannot clear a suspicion
    assert [k for k, _ in m.merge(table("b", ALIVE, 4), now=3)] == ["member_alive"]
    assert m.members["b"].status == ALIVE


def test_suspect_becomes_dead_after_timeout_unless_refuted():
    m = Membership("a", "127.0.0.1:1", "s", suspect_timeout=3)
    m.merge(table("b", ALIVE, 0), now=0)
    m.on_probe_failed("b", now=10)
    assert m.expire(now=12) == []
    assert [k for k, _ in m.expire(now=13)] == ["member_dead"]
    assert m.members["b"].status == DEAD
    assert [k for k, _ in m.merge(table("b", ALIVE, 1), now=14)] == ["member_joined"]


def test_node_refutes_rumours_of_its_death():
    m = Membership("a", "127.0.0.1:1", "s")
    m.merge(table("a", DEAD, 5), now=0)
    assert m.me.incarnation == 6 and m.me.status == ALIVE


def test_leave_is_final_news():
    m = Membership("a", "127.0.0.1:1", "s")
    m.merge(table("b", ALIVE, 0), now=0)
    assert [k for k, _ in m.merge(table("b", LEFT, 1), now=1)] == ["member_left"]
    assert m.alive(include_me=False) == []


def test_malformed_entries_are_ignored():
    m = Membership("a", "127.0.0.1:1", "s")
    bad = [None, 3, {"name": 1}, {"name": "x", "addr": "y", "site": "s", "status": "zombie", "incarnation": 0},
           {"name": "x", "addr": "y", "site": "s", "status": ALIVE, "incarnation": -1},
           {"name": "x", "addr": "y", "site": "s", "status": ALIVE, "incarnation": True}]
    assert m.merge(bad, now=0) == []
    assert m.merge("not a list", now=0) == []
    assert list(m.members) == ["a"]


def test_probe_order_visits_every_live_member_once_per_round():
    m = Membership("a", "127.0.0.1:1", "s", rng=random.Random(1))
    for name in "bcde":
        m.merge(table(name, ALIVE, 0), now=0)
    m.merge(table("e", DEAD, 1), now=0)
    assert sorted(m.probe_target().name for _ in range(3)) == ["b", "c", "d"]


def test_rtt_is_the_recent_minimum():
    m = Membership("a", "127.0.0.1:1", "s")
    m.merge(table("b", ALIVE, 0), now=0)
    for rtt in (0.010, 0.004, 0.020, -1, 50):
        m.on_probe_ok("b", rtt)
    assert m.members["b"].rtt == 0.004


def test_coordinates_travel_with_the_table_and_the_newest_wins():
    m = Membership("a", "127.0.0.1:1", "s")
    entry = {"name": "b", "addr": "x:1", "site": "s", "status": ALIVE, "incarnation": 0, "coord": [1.0], "cseq": 5}
    m.merge([entry], now=0)
    m.merge([{**entry, "coord": [0.5], "cseq": 4}], now=1)  # older news
    assert m.members["b"].coord == [1.0]
    m.merge([{**entry, "status": DEAD, "incarnation": 3, "coord": [2.0], "cseq": 6}], now=2)
    assert m.members["b"].coord == [2.0]  # even on an entry that also carries a status change
    m.learn_coordinate("b", [3.0], 6)
    assert m.members["b"].coord == [2.0]
    m.merge([{**entry, "name": "a", "coord": [9.9], "cseq": 99}], now=3)
    assert m.me.coord is None  # nobody else sets our coordinate
    assert m.merge([{**entry, "name": "c", "cseq": -1}], now=4) == []
