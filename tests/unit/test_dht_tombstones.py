"""Tombstones are collected after the grace period on every replica, and a deleted record never comes back:
not from a replica that was down or cut off while its tombstone was collected elsewhere. A whole cluster
stopped for long loses nothing."""

import functools
import math

import trio

from overlay.dht import CLOCK_SKEW, Freshness, Record

from .test_dht import INTERVAL, Cluster


def test_staleness_hides_only_what_may_have_lost_its_tombstone():
    q = 60.0
    fresh = Freshness(stale_after=q, synced_at=1000.0)
    assert fresh.grace == 2 * q + 4 * CLOCK_SKEW
    assert fresh.horizon(5000.0) == 5000.0 - 2 * q
    old, young = Record("old", 1, 1, "w", written=100.0), Record("young", 1, 1, "w", written=1050.0)
    records = {"old": old, "young": young}

    fresh.check(1000.0 + q, records)  # exactly the bound: still current
    assert not fresh.stale and not fresh.hidden(old, 1060.0)
    fresh.check(1000.0 + q + 1, records)
    assert fresh.stale and fresh.doubtful == {"old", "young"}
    now = 1100.0  # young was written 50 s ago: no tombstone of it can have been collected yet
    assert fresh.hidden(old, now) and not fresh.hidden(young, now)
    assert fresh.hidden(young, young.written + 2 * q)  # it becomes old while the node stays stale
    later = Record("later", 1, 1, "w", written=90.0)  # received while stale, from a peer that showed it
    assert not fresh.hidden(later, now)

    assert fresh.synced(since=1090.0, now=now, records=records)  # back in step: young is trusted again
    assert not fresh.stale and fresh.synced_at == 1090.0 and fresh.doubtful == {"old"}
    assert fresh.hidden(old, now) and not fresh.hidden(young, now)
    fresh.confirmed("old")
    assert not fresh.hidden(old, now) and not fresh.synced(since=1095.0, now=now, records=records)

    tombstone = Record("t", None, 2, "w", written=now)
    assert not fresh.collectable(tombstone, now + fresh.grace)
    assert fresh.collectable(tombstone, now + fresh.grace + 0.1)
    assert not fresh.collectable(old, now + 10 * fresh.grace)  # live records are never collected


async def passes(cluster, count, also=()):
    """`count` repair passes of every node (and of the cut-off nodes `also`), INTERVAL apart."""
    for _ in range(count):
        await cluster.maintain()
        for dht in also:
            await dht.maintain()
        await trio.sleep(INTERVAL)


def grace_passes(cluster):
    return math.ceil(next(iter(cluster.nodes.values())).freshness.grace / INTERVAL)


async def test_a_tombstone_is_collected_on_every_replica_after_the_grace_only(tmp_path, autojump_clock):
    cluster = await Cluster.of(tmp_path, 6)
    await cluster.nodes["n0"].put("ve/t", "v")
    await passes(cluster, 1)
    tombstone = await cluster.nodes["n4"].delete("ve/t")
    await passes(cluster, 2)
    assert cluster.holders("ve/t") == cluster.replicas("ve/t")
    await passes(cluster, grace_passes(cluster) - 4)
    assert Cluster.now() - tombstone.written < cluster.nodes["n0"].freshness.grace
    assert cluster.holders("ve/t") == cluster.replicas("ve/t")  # not before the grace
    await passes(cluster, 5)
    assert not cluster.holders("ve/t")
    assert cluster.total("tombstones_collected") == len(cluster.replicas("ve/t"))
    for dht in cluster.nodes.values():
        assert await dht.get_record("ve/t") is None


async def deleted_while_away(tmp_path, away):
    """A cluster where `ve/gone` was deleted, and its tombstone collected everywhere, while one of its
    replicas was away (`away(cluster, name)` takes it away and returns a function that brings it back);
    `ve/kept`, written at the start too, was never deleted. Returns the cluster and the returned replica."""
    cluster = await Cluster.of(tmp_path, 6)
    await cluster.nodes["n0"].put("ve/gone", "deleted long ago")
    await cluster.nodes["n0"].put("ve/kept", "still here")
    await passes(cluster, 2)
    victim = sorted(cluster.replicas("ve/gone"))[0]
    back = await away(cluster, victim)
    await cluster.converge()
    await passes(cluster, 2)
    writer = next(iter(cluster.nodes))
    await cluster.nodes[writer].delete("ve/gone")
    await passes(cluster, grace_passes(cluster) + 3)
    assert not cluster.holders("ve/gone")  # collected by every replica the ring knows
    returned = await back()
    assert returned.shard.records["ve/gone"].value == "deleted long ago"  # the returning replica still has it
    await cluster.converge()
    return cluster, returned


async def crashed(cluster, name):
    cluster.crash(name)

    async def back():
        return await cluster.start(name, seed=next(iter(cluster.nodes)))  # same name, same SQLite shard
    return back


def cut_off(nursery):
    """Takes a node away by a partition: it keeps running (and trying its repair passes, in `nursery`) but
    reaches nobody and nobody reaches it."""
    return functools.partial(_cut_off, nursery)


async def _cut_off(nursery, cluster, name):
    dht = cluster.nodes.pop(name)
    addr = dht.ring.me.addr
    cluster.net.endpoints.pop(addr)
    cluster.net.down.add(addr)
    stop = trio.Event()

    async def keep_trying():
        while not stop.is_set():
            await dht.maintain()
            await trio.sleep(INTERVAL)

    nursery.start_soon(keep_trying)

    async def back():
        stop.set()
        cluster.net.down.discard(addr)
        cluster.net.endpoints[addr] = dht.transport
        cluster.nodes[name] = dht
        assert dht.freshness.stale  # it noticed it was cut off
        await dht.ring.join([cluster.nodes[next(n for n in cluster.nodes if n != name)].ring.me.addr])
        return dht
    return back


async def never_comes_back(cluster, returned):
    for _ in range(6):
        await cluster.maintain()
        for dht in cluster.nodes.values():
            assert await dht.get("ve/gone") is None, f"resurrected through {dht.ring.me.name}"
        await trio.sleep(INTERVAL)
    assert not cluster.holders("ve/gone")
    assert returned.stats["doubts_dropped"] >= 1
    for dht in cluster.nodes.values():
        assert (await dht.get("ve/kept")).value == "still here"
    assert cluster.placed_exactly(["ve/kept"])
    assert not returned.freshness.doubtful


async def test_a_replica_down_while_its_tombstone_was_collected_does_not_resurrect(tmp_path, autojump_clock):
    cluster, returned = await deleted_while_away(tmp_path, crashed)
    assert returned.freshness.stale  # down longer than Q: it knows before serving anything
    await never_comes_back(cluster, returned)


async def test_a_replica_cut_off_while_its_tombstone_was_collected_does_not_resurrect(tmp_path, autojump_clock):
    async with trio.open_nursery() as nursery:
        cluster, returned = await deleted_while_away(tmp_path, cut_off(nursery))
        await never_comes_back(cluster, returned)


async def test_without_the_staleness_rule_the_deleted_record_comes_back(tmp_path, autojump_clock):
    """The control: the scenario above is the real danger, and the rule is what averts it."""
    cluster, returned = await deleted_while_away(tmp_path, crashed)
    returned.freshness.stale_after = math.inf
    returned.freshness.stale = False
    returned.freshness.doubtful.clear()
    await passes(cluster, 2)
    assert (await cluster.nodes["n0"].get("ve/gone")).value == "deleted long ago"


async def test_a_short_absence_changes_nothing(tmp_path, autojump_clock):
    cluster = await Cluster.of(tmp_path, 6)
    await cluster.nodes["n0"].put("ve/a", 1)
    await passes(cluster, 2)
    name = sorted(cluster.replicas("ve/a"))[0]
    cluster.crash(name)
    await trio.sleep(20)
    returned = await cluster.start(name, seed=next(iter(cluster.nodes)))
    assert not returned.freshness.stale and not returned.freshness.doubtful
    assert (await returned.get("ve/a")).value == 1


async def test_a_whole_cluster_stopped_for_an_hour_loses_nothing(tmp_path, autojump_clock):
    cluster = await Cluster.of(tmp_path, 6)
    keys = [f"ve/{i}" for i in range(40)]
    for i, key in enumerate(keys):
        await cluster.nodes[f"n{i % 6}"].put(key, i)
    await cluster.nodes["n1"].delete("ve/0")
    await passes(cluster, 2)
    names = list(cluster.nodes)
    for name in names:
        cluster.crash(name)
    await trio.sleep(3600)
    await cluster.start(names[0])
    for name in names[1:]:
        await cluster.start(name, seed=names[0])
    await cluster.converge()
    assert all(dht.freshness.stale for dht in cluster.nodes.values())
    await passes(cluster, 3)  # the replicas confirm each other's copies
    for i, key in enumerate(keys[1:], start=1):
        assert (await cluster.nodes[f"n{(i + 1) % 6}"].get(key)).value == i, key
    assert await cluster.nodes["n2"].get("ve/0") is None
    assert not any(dht.freshness.doubtful for dht in cluster.nodes.values())
    assert cluster.placed_exactly(keys[1:]) and not cluster.holders("ve/0")  # its tombstone is past the grace
