"""SWIM-style membership: merge precedence, suspicion, refutation, malformed tables, and the
dissemination of piggybacked updates, simulated on up to 1,000 in-process nodes."""

import math
import random

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.membership import ALIVE, DEAD, LEFT, SUSPECT, Membership, simulate_round, simulated_cluster


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


# -- piggybacked updates ---------------------------------------------------------------------------


def names(updates):
    return [u["name"] for u in updates]


def test_changes_are_piggybacked_fewest_sent_first_and_dropped_after_the_limit():
    m = Membership("a", "127.0.0.1:1", "s", max_updates=2, retransmit_mult=1)
    for name in "bcd":
        m.merge(table(name, ALIVE, 0), now=0)
    limit = m.retransmit_limit()
    assert limit == 1  # 1 * ceil(log10(4 + 1))
    assert names(m.updates()) == ["d", "c"]  # newest first
    assert names(m.updates()) == ["b"]
    assert m.updates() == [] and m.pending() == 0
    m.retransmit_mult = 2
    m.on_probe_failed("b", now=1)
    m.merge(table("c", ALIVE, 1), now=1)
    assert names(m.updates()) == ["c", "b"]
    m.merge(table("d", SUSPECT, 0), now=2)
    assert names(m.updates()) == ["d", "c"]  # fresh news first, then the fewest sent
    assert {u["name"]: u["status"] for u in m.updates()} == {"b": SUSPECT, "d": SUSPECT}  # c went twice
    assert m.updates() == []


def test_status_news_go_before_coordinates_and_coordinates_queue_is_bounded():
    m = Membership("a", "127.0.0.1:1", "s", max_updates=3, max_coord_queue=2)
    entries = [{"name": n, "addr": "x:1", "site": "s", "status": ALIVE, "incarnation": 0, "coord": [0.0], "cseq": 1}
               for n in "bcdef"]
    m.merge(entries, now=0)
    m.updates(), m.updates()  # everybody sent a few times
    m.merge([{**e, "coord": [1.0], "cseq": 2} for e in entries[:4]], now=1)  # b..e move
    assert m.pending() == 5 - 2 + 2  # only the two newest coordinates are kept for relaying
    m.on_probe_failed("f", now=1)
    sent = m.updates()
    assert names(sent) == ["f", "e", "d"] and sent[0]["status"] == SUSPECT


def test_own_coordinate_is_announced_at_most_every_coord_every_rounds():
    m = Membership("a", "127.0.0.1:1", "s", coord_every=5, sync_every=10**6, retransmit_mult=1)
    m.merge(table("b", ALIVE, 0), now=0)
    m.updates()
    announced = []
    for round_ in range(1, 41):
        if round_ <= 20:
            m.set_own_coordinate([float(round_)], round_)  # it moves every round, then stops
        m.next_round()
        announced += [(round_, u["coord"]) for u in m.updates() if u["name"] == "a"]
    assert announced == [(1, [1.0]), (6, [6.0]), (11, [11.0]), (16, [16.0]), (21, [20.0])]


def test_answer_mirrors_the_probe_and_older_peers_tables_are_merged():
    a = Membership("a", "127.0.0.1:1", "s")
    b = Membership("b", "127.0.0.1:2", "s")
    reply, events = b.answer(a.message(full=True), now=0)  # a join: push-pull of tables
    assert [k for k, _ in events] == ["member_joined"] and set(reply) == {"name", "members"}
    assert [k for k, _ in a.receive(reply, now=0)] == ["member_joined"]
    a.on_probe_failed("b", now=1)
    reply, _ = b.answer(a.message(), now=1)  # deltas: b hears it is suspected, refutes at once
    assert set(reply) == {"name", "updates"} and b.me.incarnation == 1
    assert [k for k, _ in a.receive(reply, now=1)] == ["member_alive"]
    older = {"members": table("c", ALIVE, 0)}  # what an agent from before the deltas sends
    assert "members" in b.answer(older, now=2)[0] and "c" in b.members
    for junk in (None, [], "x", {"updates": "x"}, {"members": 3, "updates": [None, {"name": 2}]}):
        assert b.receive(junk, now=3) == []
        assert b.answer(junk, now=3)[1] == []


def test_sync_rounds_push_pull_with_a_random_member_dead_ones_included():
    m = Membership("a", "127.0.0.1:1", "s", rng=random.Random(3), sync_every=4)
    for name in "bcd":
        m.merge(table(name, ALIVE, 0), now=0)
    m.merge(table("d", DEAD, 1), now=0)
    m.merge(table("e", LEFT, 1), now=0)
    rounds = [m.next_round() for _ in range(40)]
    syncs = [t.name for t, full in rounds if full]
    assert len(syncs) == 10 and set(syncs) == {"b", "c", "d"}  # never ourselves, never the departed
    assert {t.name for t, full in rounds if not full} == {"b", "c"}  # probes go to live members only


entries = st.fixed_dictionaries({
    "name": st.sampled_from(["a", "b", "c"]), "addr": st.just("x:1"), "site": st.just("s"),
    "status": st.sampled_from([ALIVE, SUSPECT, DEAD, LEFT]), "incarnation": st.integers(0, 3),
    "coord": st.integers(0, 3).map(lambda c: [float(c)]), "cseq": st.integers(0, 3)})


@given(st.lists(entries, max_size=12), st.randoms(use_true_random=False))
def test_the_final_table_does_not_depend_on_the_order_news_arrive_in(news, rng):
    """Deltas arrive in any order, several times, or in one table: the result is the same."""
    def final(batches):
        m = Membership("a", "127.0.0.1:1", "s")
        for batch in batches:
            m.merge(batch, now=0)
        return {n: (x.status, x.incarnation, x.coord_seq) for n, x in m.members.items()}, m.me.incarnation

    shuffled = news * 2
    rng.shuffle(shuffled)
    assert final([news]) == final([[e] for e in shuffled])


@given(st.lists(st.tuples(st.sampled_from("bcdefgh"), st.sampled_from([ALIVE, SUSPECT, DEAD]),
                          st.integers(0, 5)), max_size=30), st.integers(1, 4), st.integers(1, 3))
def test_every_update_is_sent_a_bounded_number_of_times(news, max_updates, mult):
    m = Membership("a", "127.0.0.1:1", "s", max_updates=max_updates, retransmit_mult=mult)
    for name, status, inc in news:
        m.merge(table(name, status, inc), now=0)
    pending, limit = m.pending(), m.retransmit_limit()
    sent = [m.updates() for _ in range(pending * limit + 1)]
    assert all(len(set(names(s))) == len(s) <= max_updates for s in sent)
    assert sum(map(len, sent)) == pending * limit and m.pending() == 0  # each sent `limit` times, then dropped
    assert sum(1 for s in sent if s) == max(limit, math.ceil(pending * limit / max_updates)) if pending else True


# -- simulations -----------------------------------------------------------------------------------


def rounds_until(nodes, done, limit, start=1, **kwargs):
    """Run rounds (one time unit each) until done(), returning how many it took."""
    for r in range(start, start + limit):
        simulate_round(nodes, float(r), **kwargs)
        if done():
            return r - start + 1
    raise AssertionError(f"not done after {limit} rounds")


def join(nodes, name, now, **options):
    newcomer = Membership(name, f"{name}:1", "site-0", rng=random.Random(name), **options)
    seed = nodes[sorted(nodes)[0]]
    newcomer.receive(seed.answer(newcomer.message(full=True), now)[0], now)  # push-pull with a seed
    nodes[name] = newcomer


def test_news_reach_every_one_of_1000_nodes_in_logarithmic_rounds():
    n, sync_every, suspect_timeout = 1000, 60, 20
    nodes = simulated_cluster(n, seed=7, coordinate=lambda rng: [rng.random()], suspect_timeout=suspect_timeout,
                              sync_every=sync_every, coord_every=1)
    bound = 4 * math.log2(n) + sync_every

    def move_every_coordinate(seq):  # lots of lower-priority news competing with the status news
        for i, node in enumerate(nodes.values()):
            node.set_own_coordinate([float(i)], seq)

    move_every_coordinate(2)
    join(nodes, "newcomer", now=0, suspect_timeout=suspect_timeout, sync_every=sync_every)
    joined = rounds_until(nodes, lambda: all("newcomer" in m.members for m in nodes.values()), int(bound))

    move_every_coordinate(3)
    victim = nodes.pop("node-17")
    dead = rounds_until(nodes, lambda: all(m.members[victim.me.name].status == DEAD for m in nodes.values()),
                        int(bound + suspect_timeout), start=100)

    move_every_coordinate(4)
    nodes["node-3"].on_probe_failed("node-42", now=200.0)  # a false suspicion
    refuted = rounds_until(nodes, lambda: all(m.members["node-42"].incarnation == 1 and m.members["node-42"].status
                                              == ALIVE for name, m in nodes.items() if name != "node-42"),
                           int(bound), start=201)
    assert nodes["node-42"].me.incarnation == 1  # one refutation was enough
    print(f"1000 nodes: joined in {joined}, dead in {dead}, refuted in {refuted} rounds (bound {bound:.0f})")
    assert max(joined, refuted) <= bound and dead <= bound + suspect_timeout


@settings(max_examples=6, deadline=None)
@given(st.integers(200, 400), st.integers(0, 2**16))
def test_a_new_member_reaches_every_node_within_the_bound(n, seed):
    nodes = simulated_cluster(n, seed=seed, sync_every=20)
    join(nodes, "newcomer", now=0)
    rounds = rounds_until(nodes, lambda: all("newcomer" in m.members for m in nodes.values()), 200)
    assert rounds <= 4 * math.log2(n) + 20


def probe_sizes(n, rounds=20):
    """Packed bytes of every probe of a steady cluster of n nodes where one in ten moves each round."""
    rng = random.Random(n)
    nodes = simulated_cluster(n, seed=n, coordinate=lambda r: [r.random() for _ in range(8)], sync_every=10**6)
    sizes = []
    for r in range(1, rounds + 1):
        for node in rng.sample(list(nodes.values()), n // 10):
            node.set_own_coordinate([rng.random() for _ in range(8)], node.me.coord_seq + 1)
        if r % 5 == 0:
            del nodes[f"node-{r}"]
        sizes += [len(msgpack.packb(probe)) for probe, _ in simulate_round(nodes, float(r))]
    return sizes, len(msgpack.packb(nodes["node-0"].message(full=True)))


def test_probe_size_is_bounded_independently_of_the_cluster_size():
    small, small_table = probe_sizes(100)
    large, large_table = probe_sizes(1000)
    assert large_table > 9 * small_table  # the old wire grows with N
    assert max(large) <= max(small) + 16 * 2  # one more digit per name, at most 16 entries
    assert max(large) < large_table / 50


def test_a_healed_partition_converges_through_the_periodic_sync():
    n, sync_every = 200, 10
    nodes = simulated_cluster(n, seed=3, suspect_timeout=5, sync_every=sync_every)

    def side(name):
        return int(name.split("-")[1]) < n // 2

    def everyone(status, among):
        return all(m.members[x].status == status for name, m in nodes.items() for x in among(name))

    split = rounds_until(nodes, lambda: everyone(DEAD, lambda me: [x for x in nodes if side(x) != side(me)]),
                         100, link=lambda a, b: side(a) == side(b))
    healed = rounds_until(nodes, lambda: everyone(ALIVE, lambda me: nodes), 500, start=split + 1)
    print("partition", split, "healed", healed)
    assert healed <= 4 * math.log2(n) + 3 * sync_every
