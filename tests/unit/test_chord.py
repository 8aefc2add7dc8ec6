"""Tests for overlay.chord: interval arithmetic, single-node decisions, and ring maintenance on a simulated
network (Zave's corrected Chord: joins, crashes, voluntary leaves, stabilization, fingers, lookups)."""

from __future__ import annotations

import bisect
import copy
import hashlib
import math
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlay.chord import ID_BITS, RING, ChordState, Peer, between, between_right, hash_id


def peer(node_id: int) -> Peer:
    return Peer(node_id, f"n{node_id:x}", f"10.0.{node_id % 250}.1:{4000 + node_id % 1000}", "site-a")


def state(node_id: int, r: int = 8) -> ChordState:
    return ChordState(peer(node_id), r=r)


# --------------------------------------------------------------------------------------------------------
# Interval arithmetic and identifiers


def test_hash_id_is_first_eight_bytes_of_sha1() -> None:
    expected = int.from_bytes(hashlib.sha1(b"node-1").digest()[:8], "big")
    assert hash_id("node-1") == expected
    assert 0 <= hash_id("") < RING
    assert hash_id("node-1") != hash_id("node-2")
    assert RING == 2**ID_BITS == 2**64


@pytest.mark.parametrize(
    ("x", "a", "b", "inside"),
    [
        (5, 1, 10, True),
        (1, 1, 10, False),  # left end excluded
        (10, 1, 10, False),  # right end excluded
        (11, 1, 10, False),
        (0, 1, 10, False),
        # wraparound: (RING - 10, 5) contains the top of the ring and the bottom
        (RING - 1, RING - 10, 5, True),
        (0, RING - 10, 5, True),
        (4, RING - 10, 5, True),
        (5, RING - 10, 5, False),
        (RING - 10, RING - 10, 5, False),
        (100, RING - 10, 5, False),
        # a == b: the whole circle except a
        (0, 7, 7, True),
        (8, 7, 7, True),
        (RING - 1, 7, 7, True),
        (7, 7, 7, False),
        # adjacent ends: empty interval
        (3, 3, 4, False),
        (4, 3, 4, False),
        (0, RING - 1, 0, False),
    ],
)
def test_between(x: int, a: int, b: int, inside: bool) -> None:
    assert between(x, a, b) is inside


@pytest.mark.parametrize(
    ("x", "a", "b", "inside"),
    [
        (5, 1, 10, True),
        (10, 1, 10, True),  # right end included
        (1, 1, 10, False),  # left end excluded
        (11, 1, 10, False),
        (5, RING - 10, 5, True),
        (0, RING - 10, 5, True),
        (RING - 10, RING - 10, 5, False),
        (6, RING - 10, 5, False),
        (0, RING - 1, 0, True),
        # a == b: everything, including a itself
        (7, 7, 7, True),
        (8, 7, 7, True),
        (0, 0, 0, True),
    ],
)
def test_between_right(x: int, a: int, b: int, inside: bool) -> None:
    assert between_right(x, a, b) is inside


@given(st.integers(0, RING - 1), st.integers(0, RING - 1), st.integers(0, RING - 1))
@settings(max_examples=200)
def test_between_consistent_with_between_right(x: int, a: int, b: int) -> None:
    if a != b:
        assert between_right(x, a, b) == (between(x, a, b) or x == b)
        # (a, b) and (b, a) with both ends split the circle
        assert between(x, a, b) + between(x, b, a) + (x in (a, b)) == 1
    else:
        assert between(x, a, b) == (x != a)


def test_peer_is_frozen_ordered_and_hashable() -> None:
    a, b = peer(1), peer(2)
    assert a < b
    assert {a, peer(1)} == {a}
    with pytest.raises(AttributeError):
        a.id = 3  # type: ignore[misc]
    assert Peer(1, "x", "h:1").site == ""


# --------------------------------------------------------------------------------------------------------
# One node's decisions


def test_fresh_node_is_alone() -> None:
    s = state(100)
    assert s.successors == [s.me]
    assert s.successor == s.me
    assert s.predecessor is None
    assert s.fingers == [None] * ID_BITS
    assert s.stabilize_target() == s.me
    assert s.lookup_step(5) == (True, s.me)
    assert s.lookup_step(100) == (True, s.me)
    assert s.closest_preceding(5) == s.me
    assert s.known_peers() == set()
    assert s.on_stabilize(s.me, None, []) is None
    assert s.successors == [s.me]


def test_constructor_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        ChordState(peer(1), r=0)
    with pytest.raises(ValueError):
        ChordState(Peer(RING, "x", "h:1"))


def test_join_copies_list_without_me_duplicates_or_wraparound() -> None:
    s = state(100, r=3)
    s.predecessor = peer(5)
    s.join(peer(200), [peer(300), peer(300), peer(400), peer(100), peer(200), peer(500)])
    assert s.successors == [peer(200), peer(300), peer(400)]
    assert s.predecessor is None
    # the list wraps around the ring: stop at me
    s = state(100, r=8)
    s.join(peer(200), [peer(RING - 5), peer(3), peer(100), peer(200)])
    assert s.successors == [peer(200), peer(RING - 5), peer(3)]
    # trimmed to r
    s = state(0, r=2)
    s.join(peer(1), [peer(2), peer(3), peer(4)])
    assert s.successors == [peer(1), peer(2)]


def test_second_node_joins_lone_node() -> None:
    a, b = state(10), state(20)
    done, found = a.lookup_step(b.me.id)
    assert done and found == a.me
    b.join(found, a.successor_list())
    assert b.successors == [a.me]
    # b stabilizes with a (a has no predecessor yet) and notifies a
    assert b.on_stabilize(a.me, a.predecessor, a.successor_list()) == a.me
    assert a.on_notify(b.me)
    assert a.predecessor == b.me
    # a, alone as far as it knows, stabilizes with itself and discovers b through its predecessor
    assert a.stabilize_target() == a.me
    assert a.on_stabilize(a.me, None, []) == b.me
    assert a.successors == [b.me]
    assert b.on_notify(a.me)
    assert (a.successor, a.predecessor, b.successor, b.predecessor) == (b.me, b.me, a.me, a.me)


def test_stabilize_copies_successor_list_prepending_successor_and_dropping_last() -> None:
    s = state(0, r=3)
    s.join(peer(10), [peer(20), peer(30)])
    target = s.stabilize_target()
    assert target == peer(10)
    assert s.on_stabilize(target, peer(0), [peer(25), peer(30), peer(40)]) == peer(10)
    assert s.successors == [peer(10), peer(25), peer(30)]


def test_stabilize_adopts_successors_predecessor_only_if_strictly_between() -> None:
    s = state(0, r=3)
    s.join(peer(10), [peer(20), peer(30)])
    # 5 is in (0, 10): adopt it
    assert s.on_stabilize(peer(10), peer(5), [peer(20), peer(30)]) == peer(5)
    assert s.successors == [peer(5), peer(10), peer(20)]
    # the successor's predecessor is further back than me: keep the successor
    s = state(0, r=3)
    s.join(peer(10), [peer(20)])
    assert s.on_stabilize(peer(10), peer(RING - 4), [peer(20)]) == peer(10)
    assert s.successors == [peer(10), peer(20)]
    # it is me, or none
    assert s.on_stabilize(peer(10), peer(0), [peer(20)]) == peer(10)
    assert s.on_stabilize(peer(10), None, [peer(20)]) == peer(10)
    assert s.successors == [peer(10), peer(20)]


def test_stabilize_ignores_stale_reply() -> None:
    s = state(0)
    s.join(peer(10), [peer(20)])
    assert s.on_stabilize(peer(20), peer(5), [peer(30)]) is None
    assert s.on_stabilize(s.me, None, []) is None  # not alone any more
    s.predecessor = peer(RING - 1)
    assert s.on_stabilize(s.me, None, []) is None
    assert s.successors == [peer(10), peer(20)]


def test_stabilize_in_small_ring_drops_wraparound() -> None:
    # ring 0 -> 10 -> 20 -> 0 with r = 4: 10's list is [20, 0, 10, 20]
    s = state(0, r=4)
    s.join(peer(10), [peer(20)])
    s.on_stabilize(peer(10), peer(0), [peer(20), peer(0), peer(10), peer(20)])
    assert s.successors == [peer(10), peer(20)]


def test_notify_rectify_rules() -> None:
    s = state(100)
    assert not s.on_notify(s.me)
    assert s.on_notify(peer(50))  # no predecessor yet
    assert s.predecessor == peer(50)
    assert not s.on_notify(peer(50))  # unchanged
    assert not s.on_notify(peer(20))  # not between 50 and 100
    assert not s.on_notify(peer(150))
    assert s.on_notify(peer(70))  # between 50 and 100
    assert s.predecessor == peer(70)
    assert s.on_notify(peer(20), predecessor_alive=False)  # the current predecessor is dead
    assert s.predecessor == peer(20)
    # same node, new address
    moved = Peer(20, "n14", "10.9.9.9:1")
    assert s.on_notify(moved)
    assert s.predecessor == moved
    # wraparound: predecessor RING - 5, candidate 3 is in (RING - 5, 100)
    s.predecessor = peer(RING - 5)
    assert s.on_notify(peer(3))
    assert s.predecessor == peer(3)


def test_on_dead_promotes_next_successor_and_forgets_peer() -> None:
    s = state(0)
    s.join(peer(10), [peer(20), peer(30)])
    s.predecessor = peer(RING - 1)
    s.set_finger(0, peer(10))
    s.fingers[63] = peer(RING - 1)
    s.on_dead(peer(10))
    assert s.successors == [peer(20), peer(30)]
    assert s.stabilize_target() == peer(20)
    assert peer(10) not in s.fingers
    assert s.fingers[0] is None
    s.on_dead(peer(RING - 1))
    assert s.predecessor is None
    assert s.fingers[63] is None
    s.on_dead(peer(99))  # unknown: no effect
    s.on_dead(s.me)  # never forget ourselves
    assert s.successors == [peer(20), peer(30)]
    s.on_dead(peer(20))
    s.on_dead(peer(30))
    assert s.successors == [s.me]


def test_on_dead_of_last_successor_falls_back_on_closest_known_peer() -> None:
    s = state(0)
    s.join(peer(10), [])
    s.fingers[40] = peer(2**40 + 7)
    s.fingers[50] = peer(2**50 + 7)
    s.predecessor = peer(RING - 3)
    s.on_dead(peer(10))
    assert s.successors == [peer(2**40 + 7)]


def test_on_left_successor_hands_over_its_list() -> None:
    s = state(0, r=3)
    s.join(peer(10), [peer(20), peer(30)])
    s.fingers[0] = peer(10)
    s.fingers[4] = peer(20)
    s.on_left(peer(10), s.me, [peer(20), peer(30), peer(40)])
    assert s.successors == [peer(20), peer(30), peer(40)]
    assert s.fingers[0] == peer(20)  # the heir takes over the leaver's keys
    assert s.fingers[4] == peer(20)
    # a later entry of the list leaves
    s.on_left(peer(30), peer(20), [peer(40), peer(50)])
    assert s.successors == [peer(20), peer(40), peer(50)]


def test_on_left_predecessor_hands_over_its_predecessor() -> None:
    s = state(100)
    s.join(peer(200), [])
    s.predecessor = peer(50)
    s.on_left(peer(50), peer(20), [s.me, peer(200)])
    assert s.predecessor == peer(20)
    s.on_left(peer(77), peer(1), [s.me])  # not a neighbour: nothing happens
    assert s.predecessor == peer(20)
    assert s.successors == [peer(200)]


def test_last_other_node_leaving_leaves_us_alone() -> None:
    a = state(1)
    a.join(peer(2), [])
    a.predecessor = peer(2)
    a.set_finger(0, peer(2))
    a.on_left(peer(2), a.me, [a.me])
    assert a.successors == [a.me]
    assert a.predecessor is None
    assert a.known_peers() == set()


def test_closest_preceding_and_lookup_step() -> None:
    s = state(100, r=2)
    s.join(peer(200), [peer(300)])
    s.predecessor = peer(50)
    s.fingers[10] = peer(1200)
    s.fingers[20] = peer(2**20 + 500)
    assert s.closest_preceding(250) == peer(200)
    assert s.closest_preceding(300) == peer(200)  # strictly before the key
    assert s.closest_preceding(301) == peer(300)
    assert s.closest_preceding(5000) == peer(1200)
    assert s.closest_preceding(2**21) == peer(2**20 + 500)
    assert s.closest_preceding(10) == peer(2**20 + 500)  # wraps past the top of the ring
    assert s.closest_preceding(60) == peer(50)
    assert s.closest_preceding(150) == s.me  # nothing between 100 and 150
    assert s.lookup_step(150) == (True, peer(200))
    assert s.lookup_step(200) == (True, peer(200))
    assert s.lookup_step(201) == (False, peer(200))
    assert s.lookup_step(5000) == (False, peer(1200))
    # our own id belongs to us: ask the furthest known peer, whose successor we are
    assert s.lookup_step(100) == (False, peer(50))


def test_next_finger_round_robin_and_targets_wrap() -> None:
    me = RING - 10
    s = state(me)
    seen = [s.next_finger() for _ in range(ID_BITS + 1)]
    assert [i for i, _ in seen] == [*range(ID_BITS), 0]
    assert seen[0] == (0, RING - 9)
    assert seen[4] == (4, 6)  # wraps past zero
    assert seen[63] == (63, (me + 2**63) % RING)
    assert s.finger_target(5) == 22


def test_set_finger_fills_the_gap_and_skips_it() -> None:
    s = state(0)
    assert s.next_finger() == (0, 1)
    s.set_finger(0, peer(40))  # successor(1) = 40, so also successor(2), (4), (8), (16), (32)
    assert s.fingers[:7] == [peer(40)] * 6 + [None]
    assert s.next_finger() == (6, 64)
    s.set_finger(6, peer(64))
    assert s.fingers[6] == peer(64)
    assert s.next_finger() == (7, 128)
    # an out-of-turn fix does not move the cursor
    s.set_finger(20, peer(2**22))
    assert s.fingers[20:23] == [peer(2**22)] * 3
    assert s.next_finger() == (8, 256)
    with pytest.raises(IndexError):
        s.set_finger(ID_BITS, peer(1))


def test_known_peers_and_successor_list_copy() -> None:
    s = state(0)
    s.join(peer(10), [peer(20)])
    s.predecessor = peer(RING - 1)
    s.fingers[3] = peer(10)
    s.fingers[9] = s.me
    assert s.known_peers() == {peer(10), peer(20), peer(RING - 1)}
    copied = s.successor_list()
    copied.append(peer(99))
    assert s.successors == [peer(10), peer(20)]


# --------------------------------------------------------------------------------------------------------
# A synchronous network simulator: every RPC is a direct read of the other node's state.


class Net:
    def __init__(self, r: int, first: int) -> None:
        self.r = r
        self.nodes: dict[int, ChordState] = {first: state(first, r)}
        self.alive: set[int] = {first}
        self.crashed_since_round: set[int] = set()

    # truth

    def ids(self) -> list[int]:
        return sorted(self.alive)

    def true_successor_of_key(self, key: int) -> int:
        ids = self.ids()
        return ids[bisect.bisect_left(ids, key) % len(ids)]

    def true_successor(self, node_id: int) -> int:
        return self.true_successor_of_key((node_id + 1) % RING)

    def true_predecessor(self, node_id: int) -> int:
        ids = self.ids()
        return ids[(bisect.bisect_left(ids, node_id) - 1) % len(ids)]

    def true_successor_list(self, node_id: int) -> list[int]:
        ids = self.ids()
        i = ids.index(node_id)
        count = min(self.r, len(ids) - 1)
        return [ids[(i + k) % len(ids)] for k in range(1, count + 1)] or [node_id]

    def is_live(self, p: Peer | None) -> bool:
        return p is not None and p.id in self.alive

    # protocol

    def lookup(self, start: int, key: int) -> tuple[Peer, int]:
        """Iterative lookup from `start`; returns the answer and the number of nodes asked."""
        current, steps = start, 0
        while True:
            steps += 1
            assert steps <= 4 * len(self.nodes) + 2 * ID_BITS, "lookup does not terminate"
            node = self.nodes[current]
            done, p = node.lookup_step(key)
            if p.id != current and not self.is_live(p):
                node.on_dead(p)  # the shell could not reach it: tell the node that named it, ask again
                continue
            if done:
                return p, steps
            assert p.id != current, "lookup made no progress"
            assert between(p.id, current, key), "lookup went backwards"
            current = p.id

    def join(self, new_id: int, via: int) -> None:
        found, _ = self.lookup(via, new_id)
        s = state(new_id, self.r)
        s.join(found, self.nodes[found.id].successor_list())
        self.nodes[new_id] = s
        self.alive.add(new_id)

    def notify(self, target: Peer, me: Peer) -> None:
        other = self.nodes[target.id]
        other.on_notify(me, predecessor_alive=other.predecessor is None or self.is_live(other.predecessor))

    def stabilize(self, n: int) -> None:
        s = self.nodes[n]
        while s.successor != s.me and not self.is_live(s.successor):
            s.on_dead(s.successor)
        target = s.stabilize_target()
        if target == s.me:
            to_notify = s.on_stabilize(s.me, None, [])
        else:
            other = self.nodes[target.id]
            to_notify = s.on_stabilize(target, other.predecessor, other.successor_list())
        if to_notify is None:
            return
        if not self.is_live(to_notify):
            s.on_dead(to_notify)
            to_notify = s.successor
            if to_notify == s.me or not self.is_live(to_notify):
                return
        self.notify(to_notify, s.me)

    def round(self, rng: random.Random) -> None:
        order = self.ids()
        rng.shuffle(order)
        for n in order:
            self.stabilize(n)
        self.crashed_since_round.clear()

    def fix_all_fingers(self, n: int) -> None:
        """One full round-robin pass for a node whose fingers were never fixed."""
        s = self.nodes[n]
        while s.fingers[-1] is None:
            index, target = s.next_finger()
            found, _ = self.lookup(n, target)
            s.set_finger(index, found)

    def snapshot(self) -> dict[int, tuple[tuple[Peer, ...], Peer | None]]:
        return {n: (tuple(self.nodes[n].successors), self.nodes[n].predecessor) for n in self.alive}

    def converge(self, rng: random.Random) -> int:
        limit = 4 * len(self.alive) + 2 * self.r + 10
        for rounds in range(1, limit + 1):
            before = self.snapshot()
            self.round(rng)
            if self.snapshot() == before:
                return rounds
        raise AssertionError(f"no fixed point after {limit} rounds")

    # failures

    def lists_sufficient(self, survivors: set[int]) -> bool:
        """Zave's operating assumption: every member's successor list holds another live member."""
        return all(any(p.id in survivors and p.id != n for p in self.nodes[n].successors) for n in survivors)

    def fewer_than_r_consecutive(self, crashed: set[int]) -> bool:
        ids = sorted(self.alive | crashed)
        if len(crashed) >= len(ids):
            return False
        run = 0
        start = next(i for i, n in enumerate(ids) if n not in crashed)
        for k in range(1, len(ids) + 1):
            run = run + 1 if ids[(start + k) % len(ids)] in crashed else 0
            if run >= self.r:
                return False
        return True

    def crash(self, victim: int) -> bool:
        survivors = self.alive - {victim}
        crashed = self.crashed_since_round | {victim}
        if not (self.lists_sufficient(survivors) and self.fewer_than_r_consecutive(crashed)):
            return False
        self.alive.discard(victim)
        self.crashed_since_round.add(victim)
        return True

    def leave(self, leaver: int) -> bool:
        s = self.nodes[leaver]
        neighbours = {p.id for p in (s.predecessor, s.successor) if self.is_live(p) and p.id != leaver}
        saved = {n: copy.deepcopy(self.nodes[n]) for n in neighbours}
        for n in neighbours:
            self.nodes[n].on_left(s.me, s.predecessor, s.successor_list())
        survivors = self.alive - {leaver}
        if not survivors or not self.lists_sufficient(survivors) and len(survivors) > 1:
            self.nodes.update(saved)
            return False
        self.alive.discard(leaver)
        return True

    # checks

    def assert_ring_correct(self, full_lists: bool = True) -> None:
        for n in self.alive:
            s = self.nodes[n]
            assert s.successor.id == self.true_successor(n), s
            expected_pred = self.true_predecessor(n) if len(self.alive) > 1 else None
            assert (s.predecessor.id if s.predecessor else None) == expected_pred, s
            if full_lists:
                assert [p.id for p in s.successors] == self.true_successor_list(n), s
        # a single cycle through every live node
        start = min(self.alive)
        seen, current = [], start
        while True:
            seen.append(current)
            current = self.nodes[current].successor.id
            if current == start:
                break
            assert current not in seen and len(seen) <= len(self.alive)
        assert sorted(seen) == self.ids()


ANY_ID = st.one_of(
    st.integers(0, RING - 1),
    st.integers(0, 300),  # crowded around zero, to exercise wraparound and tiny gaps
    st.integers(RING - 300, RING - 1),
)
CHOICE = st.integers(0, 2**16)
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("join"), ANY_ID, CHOICE),
        st.tuples(st.just("join"), ANY_ID, CHOICE),
        st.tuples(st.just("crash"), CHOICE),
        st.tuples(st.just("leave"), CHOICE),
        st.tuples(st.just("step"), CHOICE),
        st.tuples(st.just("round"), CHOICE),
    ),
    max_size=60,
)
R = st.sampled_from([2, 3, 4, 8])
FAST = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MAX_NODES = 40


def run_ops(net: Net, ops: list[tuple], rng: random.Random) -> None:
    for op in ops:
        kind, *args = op
        live = net.ids()
        if kind == "join":
            new_id, via = args
            if new_id not in net.nodes and len(net.nodes) < MAX_NODES:
                net.join(new_id, live[via % len(live)])
        elif kind == "crash":
            net.crash(live[args[0] % len(live)])
        elif kind == "leave":
            net.leave(live[args[0] % len(live)])
        elif kind == "step":
            net.stabilize(live[args[0] % len(live)])
        else:
            net.round(rng)


def build_ring(r: int, first: int, joins: list[int], rng: random.Random, converge: bool = True) -> Net:
    net = Net(r, first)
    for new_id in joins:
        if new_id not in net.nodes and len(net.nodes) < MAX_NODES:
            net.join(new_id, rng.choice(net.ids()))
    if converge:
        net.converge(rng)
        net.assert_ring_correct()
    return net


@FAST
@given(
    r=R,
    first=ANY_ID,
    initial=st.lists(ANY_ID, max_size=MAX_NODES // 2),
    ops=OPS,
    seed=st.integers(0, 2**32),
)
def test_ring_converges_after_joins_crashes_and_leaves(
    r: int, first: int, initial: list[int], ops: list, seed: int
) -> None:
    rng = random.Random(seed)
    net = build_ring(r, first, initial, rng)
    run_ops(net, ops, rng)
    net.converge(rng)
    net.assert_ring_correct()


@FAST
@given(r=R, first=ANY_ID, joins=st.lists(ANY_ID, max_size=MAX_NODES - 1), seed=st.integers(0, 2**32))
def test_concurrent_joins_without_rounds_converge(r: int, first: int, joins: list[int], seed: int) -> None:
    """Every node joins before anybody stabilizes: all but the first are appendages at first."""
    rng = random.Random(seed)
    net = build_ring(r, first, joins, rng, converge=False)
    net.converge(rng)
    net.assert_ring_correct()


def hashed_ids(salt: int, count: int) -> list[int]:
    return sorted({hash_id(f"node-{salt}-{k}") for k in range(count)})


@FAST
@given(
    salt=st.integers(0, 2**32),
    count=st.integers(1, MAX_NODES),
    r=R,
    rounds_between=st.integers(0, 3),
    keys=st.lists(st.integers(0, RING - 1), max_size=10),
    seed=st.integers(0, 2**32),
)
def test_lookups_after_fix_fingers_find_true_successor_quickly(
    salt: int, count: int, r: int, rounds_between: int, keys: list[int], seed: int
) -> None:
    rng = random.Random(seed)
    ids = hashed_ids(salt, count)
    rng.shuffle(ids)
    net = Net(r, ids[0])
    for new_id in ids[1:]:
        net.join(new_id, rng.choice(net.ids()))
        for _ in range(rounds_between):
            net.round(rng)
    net.converge(rng)
    net.assert_ring_correct()
    for n in net.ids():
        net.fix_all_fingers(n)
        s = net.nodes[n]
        for i, f in enumerate(s.fingers):
            assert f is not None and f.id == net.true_successor_of_key(s.finger_target(i))
    n_nodes = len(net.alive)
    bound = 2 * math.log2(n_nodes) + 2
    probes = [*keys, *ids, *((i + 1) % RING for i in ids), *((i - 1) % RING for i in ids)]
    for start in net.ids():
        for key in probes:
            found, steps = net.lookup(start, key)
            assert found.id == net.true_successor_of_key(key)
            assert steps <= bound, (steps, n_nodes)


@FAST
@given(
    first=ANY_ID,
    joins=st.lists(ANY_ID, min_size=1, max_size=MAX_NODES - 1, unique=True),
    r=R,
    leavers=st.lists(CHOICE, min_size=1, max_size=MAX_NODES),
    seed=st.integers(0, 2**32),
)
def test_voluntary_leaves_keep_the_ring_correct(
    first: int, joins: list[int], r: int, leavers: list[int], seed: int
) -> None:
    rng = random.Random(seed)
    net = build_ring(r, first, joins, rng)
    for choice in leavers:
        live = net.ids()
        if len(live) == 1:
            break
        assert net.leave(live[choice % len(live)])
        # the hand-over alone keeps every pointer exact, without a stabilize round
        net.assert_ring_correct(full_lists=False)
    net.converge(rng)
    net.assert_ring_correct()
    # the survivors still find every key
    for start in net.ids():
        for key in [0, RING - 1, *net.ids()]:
            found, _ = net.lookup(start, key)
            assert found.id == net.true_successor_of_key(key)


def test_consider_adopts_a_closer_successor_only():
    me = Peer(100, "me", "a:1")
    state = ChordState(me, r=4)
    far = Peer(500, "far", "a:2")
    state.join(far, [])
    assert not state.consider(Peer(700, "beyond", "a:3"))
    assert state.consider(Peer(300, "closer", "a:4"))
    assert [p.name for p in state.successor_list()] == ["closer", "far"]
    assert not state.consider(me)


def test_set_finger_prefers_a_nearer_peer_only_inside_each_fingers_interval():
    me = Peer(0, "me", "a:0")
    state = ChordState(me, r=4)
    succ = Peer(1 << 10, "succ", "a:1")  # successor of target 2**10: fingers 0..10 share it
    nearer = Peer((1 << 10) + 5, "near", "a:2")  # inside finger 10's interval [2**10, 2**11) only
    state.set_finger(0, succ, nearer)
    assert state.fingers[10] == nearer
    assert all(state.fingers[i] == succ for i in range(10))
    state.set_finger(20, Peer(1 << 20, "f20", "a:3"), Peer(1 << 40, "far-away-id", "a:4"))
    assert state.fingers[20].name == "f20"  # a "nearer" peer outside the interval is not taken


def test_learned_links_are_bounded_used_for_routing_and_dropped_when_dead():
    from overlay.chord import MAX_LEARNED

    me = Peer(0, "me", "a:0")
    state = ChordState(me, r=2)
    state.join(Peer(10, "s", "a:1"), [])
    far = Peer(RING // 2, "far", "a:2")
    state.learn(far)
    assert state.closest_preceding(RING // 2 + 100) == far
    assert far in state.known_peers()
    state.on_dead(far)
    assert state.closest_preceding(RING // 2 + 100).name == "s"
    for i in range(MAX_LEARNED + 5):
        state.learn(Peer(2048 + i, f"p{i}", f"a:{i}"))  # all in one octave: [2**11, 2**12)
    assert len(state.learned) == MAX_LEARNED and 2048 not in state.learned  # least recently seen went first
    state.learn(me)
    assert me.id not in state.learned
    assert [p.name for p in state.successor_list()] == ["s"]  # learning never touches the ring itself


def test_a_full_cache_of_learned_links_keeps_covering_every_distance():
    from overlay.chord import MAX_LEARNED

    state = ChordState(Peer(0, "me", "a:0"), r=2)
    lone = Peer(1 << 20, "lone", "a:lone")  # the only link in its octave
    state.learn(lone)
    for i in range(MAX_LEARNED + 10):  # random peers crowd the far octaves
        state.learn(Peer((RING >> 1) + i, f"far{i}", f"a:{i}"))
    assert len(state.learned) == MAX_LEARNED
    assert lone.id in state.learned  # evicting it would leave a stretch of the ring without a link
    assert (RING >> 1) not in state.learned  # the crowded octave gave up its least recently seen
    state.learn(Peer(RING >> 1, "far0", "a:0"))  # seen again: it comes back, at another's expense
    assert (RING >> 1) in state.learned and len(state.learned) == MAX_LEARNED
    state.on_dead(lone)
    assert lone.id not in state.learned and state.closest_preceding((1 << 20) + 5).name == "me"


def test_with_latency_estimates_the_cache_keeps_the_nearer_links_of_an_octave():
    from overlay.chord import MAX_LEARNED

    rtt = {}
    state = ChordState(Peer(0, "me", "a:0"), r=2, distance=lambda peer: rtt.get(peer.name))
    for i in range(MAX_LEARNED):
        rtt[f"p{i}"] = 0.010 + i / 1000  # p0 nearest ... p63 farthest
        state.learn(Peer((RING >> 1) + i, f"p{i}", f"a:{i}"))
    rtt["near"], rtt["farther"] = 0.001, 1.0
    state.learn(Peer((RING >> 1) + 100, "near", "a:near"))  # evicts the farthest, p63
    assert (RING >> 1) + 63 not in state.learned and (RING >> 1) + 100 in state.learned
    state.learn(Peer((RING >> 1) + 101, "farther", "a:farther"))  # farthest of all: not kept
    assert (RING >> 1) + 101 not in state.learned
    state.learn(Peer((RING >> 1) + 102, "unknown", "a:unknown"))  # no estimate: counts as farthest
    assert (RING >> 1) + 102 not in state.learned
    assert len(state.learned) == MAX_LEARNED


@settings(max_examples=200, deadline=None)
@given(
    me=ANY_ID,
    successors=st.lists(ANY_ID, max_size=8),
    fingers=st.dictionaries(st.integers(0, ID_BITS - 1), ANY_ID, max_size=20),
    predecessor=st.one_of(st.none(), ANY_ID),
    learned=st.lists(ANY_ID, max_size=100),
    key=ANY_ID,
    avoid=st.lists(ANY_ID, max_size=5),
)
def test_closest_preceding_is_the_known_peer_closest_before_the_key(
    me: int, successors: list[int], fingers: dict[int, int], predecessor: int | None, learned: list[int],
    key: int, avoid: list[int],
) -> None:
    """The indexed search (learned links by octave) agrees with the definition, whatever the state."""
    state = ChordState(peer(me), r=8)
    state.successors = [peer(i) for i in successors] or [state.me]
    for index, i in fingers.items():
        state.fingers[index] = peer(i)
    state.predecessor = peer(predecessor) if predecessor is not None else None
    for i in learned:
        state.learn(peer(i))
    avoided = frozenset(avoid) | frozenset(learned[:2])
    known = [p for p in state.known_peers() if p.id not in avoided and between(p.id, me, key)]
    expected = max(known, key=lambda p: (p.id - me) % RING, default=state.me)
    assert state.closest_preceding(key, avoided).id == expected.id
