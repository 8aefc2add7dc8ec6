"""Pinned keys (`DHT.pin`, `overlay.quorum`): records on fixed replica sets, read and written by a majority of
them, keep one history across a partition, where the ring's live replicas give each side its own."""

import pytest

from overlay.chord import hash_id
from overlay.dht import Record, WriteConflict
from overlay.membership import ALIVE, DEAD, LEFT, Member
from overlay.quorum import FixedSets, replicas_among
from overlay.wire.rpc import RequestError

from .test_dht import Cluster


class Members:
    """What `FixedSets` reads of a membership: every member, with its status."""

    def __init__(self, names, status=None):
        status = status or {}
        self.members = {n: Member(n, f"mem:{n}", "s", status.get(n, ALIVE)) for n in names}


def test_a_key_s_fixed_set_does_not_change_with_who_is_alive():
    names = [f"n{i}" for i in range(6)]
    key = "ve/shop"
    every = replicas_among(key, [(n, f"mem:{n}") for n in names], 3)
    assert len(set(every)) == 3
    ordered = sorted(names, key=hash_id)
    assert every[0] == f"mem:{next((n for n in ordered if hash_id(n) >= hash_id(key)), ordered[0])}"
    assert FixedSets(Members(names), 3).of(key) == (every, 2)
    one_dead = {every[1].removeprefix("mem:"): DEAD}
    assert FixedSets(Members(names, one_dead), 3).of(key) == ([every[0], every[2]], 2)  # the dead one only waits
    two_dead = {every[0].removeprefix("mem:"): DEAD, every[2].removeprefix("mem:"): DEAD}
    assert FixedSets(Members(names, two_dead), 3).of(key) == (every, 2)  # too few: ask them all, "dead" may be wrong
    left = every[0].removeprefix("mem:")
    others, quorum = FixedSets(Members(names, {left: LEFT}), 3).of(key)
    assert f"mem:{left}" not in others and len(others) == 3 and quorum == 2  # one that left is replaced
    assert FixedSets(Members(["solo"]), 3).of(key) == (["mem:solo"], 1)
    assert FixedSets(Members(names[:4]), 5).of(key)[1] == 2  # never even: 3 of 4, whose 2 outlive one more down
    assert len(FixedSets(Members(names[:2]), 5).of(key)[0]) == 1
    assert FixedSets(Members(names), 5).of(key) == (replicas_among(key, [(n, f"mem:{n}") for n in names], 5), 3)


async def split(tmp_path, pinned):
    """Eight nodes whose ring is cut in two halves of four, each half's ring settled on its own side."""
    cluster = await Cluster.of(tmp_path, 8)
    members = Members(list(cluster.nodes))
    for dht in cluster.nodes.values():
        dht.fixed = FixedSets(members, 3)
        if pinned:
            dht.pin("ve/")
    ordered = cluster.ordered()
    sides = [ordered[0::2], ordered[1::2]]  # alternate on the ring: each side loses every successor it had
    cut(cluster, sides)
    for _ in range(6):
        for dht in cluster.nodes.values():
            await dht.ring.maintain(fingers=False)
    return cluster, sides


async def write_on_both_sides(cluster, sides, key):
    results = {}
    for side in sides:
        dht = cluster.nodes[side[0]]
        try:
            results[side[0]] = await dht.put_if(key, side[0], await dht.get_record(key))
        except RequestError as err:
            results[side[0]] = err
    return results


async def test_unpinned_each_side_of_a_partition_writes_its_own_history(tmp_path, autojump_clock):
    """The baseline the pinned keys fix: each side's ring names replicas on its own side, and both conditional
    writes after the same (absent) record win."""
    cluster, sides = await split(tmp_path, pinned=False)
    results = await write_on_both_sides(cluster, sides, "ve/shop")
    assert all(isinstance(r, Record) for r in results.values()), results


async def test_pinned_only_the_side_with_a_majority_of_the_fixed_set_reads_or_writes(tmp_path, autojump_clock):
    cluster, sides = await split(tmp_path, pinned=True)
    for key in [f"ve/{i}" for i in range(8)]:
        every, _ = cluster.nodes[sides[0][0]].fixed.of(key)
        majority = 0 if sum(a.removeprefix("mem:") in sides[0] for a in every) >= 2 else 1
        results = await write_on_both_sides(cluster, sides, key)
        won = results[sides[majority][0]]
        lost = results[sides[1 - majority][0]]
        assert isinstance(won, Record) and won.value == sides[majority][0], results
        assert isinstance(lost, RequestError) and not isinstance(lost, WriteConflict), results
        cluster.net.cut.clear()
        for name, dht in cluster.nodes.items():  # once healed, every node reads the one history
            assert (await dht.get(key)).value == sides[majority][0], name
        minority = cluster.nodes[sides[1 - majority][0]]
        with pytest.raises(WriteConflict):  # a writer that read before the heal cannot write after it
            await minority.update(key, "late", None)
        cut(cluster, sides)


def cut(cluster, sides):
    for a in sides[0]:
        for b in sides[1]:
            cluster.net.cut |= {(f"mem:{a}", f"mem:{b}"), (f"mem:{b}", f"mem:{a}")}


async def test_a_pinned_write_needs_a_majority_of_the_fixed_set_not_of_the_ring_s_replicas(tmp_path,
                                                                                          autojump_clock):
    cluster = await Cluster.of(tmp_path, 6)
    names = list(cluster.nodes)
    key = "ve/shop"
    every = replicas_among(key, [(n, f"mem:{n}") for n in names], 3)
    for dht in cluster.nodes.values():
        dht.fixed = FixedSets(Members(names), 3)
        dht.pin("ve/")
    writer = next(n for n in names if f"mem:{n}" not in every)
    await cluster.nodes[writer].put(key, 1)
    assert cluster.holders(key) == {a.removeprefix("mem:") for a in every}
    for addr in every[1:]:
        cluster.net.cut.add((f"mem:{writer}", addr))
    with pytest.raises(RequestError, match="1 of 3 replicas"):
        await cluster.nodes[writer].get_record(key)
    with pytest.raises(RequestError, match="reached 1 of 3"):
        await cluster.nodes[writer].put(key, 2)


async def test_a_fixed_set_wider_than_the_ring_s_keeps_every_copy_through_repair(tmp_path, autojump_clock):
    """Five fixed replicas where the ring keeps three: the repair pass hands off (and drops) a record a node
    holds outside its arc, but never a pinned one this node is a fixed replica of."""
    cluster = await Cluster.of(tmp_path, 6)
    names = list(cluster.nodes)
    for dht in cluster.nodes.values():
        dht.fixed = FixedSets(Members(names), 5)
        dht.pin("ve/")
    await cluster.nodes[names[0]].put("ve/shop", 1)
    await cluster.nodes[names[0]].put("other", 1)
    every = {a.removeprefix("mem:") for a in replicas_among("ve/shop", [(n, f"mem:{n}") for n in names], 5)}
    assert cluster.holders("ve/shop") == every and len(every) == 5
    await cluster.maintain(passes=3)
    assert cluster.holders("ve/shop") == every
    assert cluster.holders("other") == cluster.replicas("other")
