"""A node whose ring has not caught up with its membership since it started (it has just restarted: its ring
holds only itself) neither acknowledges a write that too few replicas hold nor answers a read from its own
stale copy, but waits for its ring or refuses as retryable; once caught up, it trusts its ring as before.
Replica sets cached before this node's ring changed are not used after."""

import pytest
import trio

from overlay.chord import hash_id
from overlay.dht import REPLICA_CACHE_SECONDS, RING_PATIENCE, RingUnsettled

from .test_dht import Cluster


def owner(names, key):
    """The node that would own `key` among `names`: the first clockwise from the key's position."""
    return min(names, key=lambda n: (hash_id(n) - hash_id(key)) % 2**64)


async def test_a_restarted_node_waits_for_its_ring_before_it_writes_or_reads(tmp_path, autojump_clock):
    cluster = await Cluster.of(tmp_path, 6)
    victim = "n3"
    elsewhere = next(k for k in (f"ve/{i}" for i in range(100)) if victim not in cluster.replicas(k))
    mine = next(k for k in (f"ve/{i}" for i in range(100)) if victim in cluster.replicas(k))
    await cluster.nodes["n0"].put(elsewhere, "old")
    await cluster.nodes["n0"].put(mine, "old")
    cluster.crash(victim)
    await cluster.converge()
    await cluster.nodes["n0"].put(mine, "new")  # while the victim is down: its copy is now stale
    dht = cluster.add(victim)  # back with its shard; its membership knows every node, its ring only itself
    assert dht.shard.records[mine].value == "old" and dht.ring.state.successor_list() == [dht.ring.me]

    answers = {}

    async def write():
        answers["written"] = await dht.put(elsewhere, "new")

    async def read():
        answers["read"] = await dht.get(mine)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write)
        nursery.start_soon(read)
        assert await dht.ring.join([cluster.nodes["n0"].ring.me.addr])  # meanwhile, the ring catches up
        await cluster.converge()
    assert answers["read"].value == "new"
    assert answers["written"].value == "new"
    assert {n for n in cluster.holders(elsewhere) if cluster.nodes[n].shard.records[elsewhere].value == "new"} \
        >= cluster.replicas(elsewhere)
    for other in cluster.nodes.values():
        assert (await other.get(elsewhere)).value == "new"


async def test_a_ring_that_does_not_catch_up_is_refused_as_retryable_after_a_while(tmp_path, autojump_clock):
    cluster = await Cluster.of(tmp_path, 4)
    cluster.crash("n2")
    dht = cluster.add("n2")  # back, and never joins the ring
    started = trio.current_time()
    with pytest.raises(RingUnsettled, match="retry") as refused:
        await dht.put("ve/x", 1)
    assert refused.value.kind == "unavailable"
    assert RING_PATIENCE - 0.2 <= trio.current_time() - started <= RING_PATIENCE + 0.2
    assert not cluster.holders("ve/x")


@pytest.mark.parametrize("size", [1, 2, 3])
async def test_a_small_cluster_writes_at_once(tmp_path, autojump_clock, size):
    """A ring of n <= r nodes names n - 1 replicas (not the node that answers the lookup): that is caught up."""
    cluster = Cluster(tmp_path)
    cluster.add("n0")
    for i in range(1, size):
        await cluster.start(f"n{i}", seed="n0")
    if size > 1:
        await cluster.converge()
    for dht in cluster.nodes.values():
        started = trio.current_time()
        await dht.put("ve/x", dht.ring.me.name)
        assert trio.current_time() - started < 0.1


async def test_once_caught_up_a_dead_successor_dropped_before_membership_notices_stops_nothing(tmp_path,
                                                                                                autojump_clock):
    """In a cluster of r nodes, the ring drops a dead node at once while membership still counts it as a
    suspect: the one replica left is then the right set, and writes go on."""
    cluster = await Cluster.of(tmp_path, 3)
    for dht in cluster.nodes.values():
        await dht.put(f"ve/{dht.ring.me.name}", 1)
        dht.members = lambda: 3  # membership has not noticed the death below
    cluster.crash("n1")
    await cluster.converge()
    for dht in cluster.nodes.values():
        started = trio.current_time()
        await dht.put("ve/after", dht.ring.me.name)
        assert trio.current_time() - started < 0.1


async def test_a_replica_set_cached_before_the_ring_changed_is_not_used(tmp_path, autojump_clock):
    cluster = await Cluster.of(tmp_path, 6)
    names = [*cluster.nodes, "joiner"]
    key = next(k for k in (f"ve/{i}" for i in range(1000)) if owner(names, k) == "joiner")
    writer = owner(cluster.nodes, key)  # the key's first replica, which the joiner precedes
    started = trio.current_time()
    await cluster.nodes[writer].put(key, 1)  # caches the key's replicas

    await cluster.start("joiner", seed="n0")
    await cluster.converge()
    assert trio.current_time() - started < REPLICA_CACHE_SECONDS  # the cached set has not expired
    assert cluster.nodes[writer].ring.state.predecessor.name == "joiner"
    await cluster.nodes[writer].put(key, 2)
    assert "joiner" in cluster.replicas(key)
    assert {n for n in cluster.holders(key) if cluster.nodes[n].shard.records[key].value == 2} == cluster.replicas(key)
