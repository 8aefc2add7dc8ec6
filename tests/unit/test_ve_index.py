"""The VE index in the DHT (`discovery.ve.index`): pages list each VE exactly once, concurrent updates of
one bucket lose nothing, a destroyed VE leaves the list, and a listing reads a few records, not every node."""

import random

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from discovery.ve.index import BUCKETS, Cursor, Entry, Index, bucket_of, take, with_entry, without_entry
from overlay.wire.rpc import RequestError

from .test_dht import Cluster, R

PREFIX = "ve/"
names = st.lists(st.from_regex(r"[a-z0-9]{1,12}", fullmatch=True), unique=True, max_size=60)


@given(names, st.integers(min_value=1, max_value=25), st.sets(st.integers(0, 59)))
def test_pages_walk_every_wanted_entry_once_in_index_order(vms, limit, hidden):
    entries = [Entry(name, "alice" if i not in hidden else "bob", f"u{i}") for i, name in enumerate(vms)]
    buckets = {b: [e for e in entries if bucket_of(e.name) == b] for b in range(BUCKETS)}
    seen, cursor = [], Cursor(0)
    while cursor is not None:
        page, cursor, decided = take(buckets, cursor, limit, lambda e: e.owner == "alice")
        assert decided and len(page) <= limit
        assert cursor is None or len(page) == limit  # only the last page is short
        seen += page
        if cursor is not None:
            assert Cursor.parse(cursor.encode()) == cursor
    wanted = [e for e in entries if e.owner == "alice"]
    assert seen == sorted(wanted, key=lambda e: (bucket_of(e.name), e.name))


def test_a_page_stops_where_the_buckets_read_end():
    buckets = {0: [Entry("a", "o", "1")], 1: []}
    page, cursor, decided = take(buckets, Cursor(0), 5, lambda e: True)
    assert (page, cursor, decided) == ([Entry("a", "o", "1")], Cursor(2), False)


def test_entries_belong_to_one_incarnation():
    old, new = Entry("web", "alice", "u1"), Entry("web", "alice", "u2")
    assert with_entry([old], old) is None
    assert with_entry([old, Entry("db", "bob", "u3")], new) == [Entry("db", "bob", "u3"), new]
    assert without_entry([new], "web", "u1") is None  # the first incarnation cannot unlist the second
    assert without_entry([new], "web", "u2") == []


@pytest.mark.parametrize("bad", ["", "zz:a", "1:a", "10:a", "0a", 3, ["00", "a"], "00:" + "x" * 64])
def test_malformed_cursors_are_refused(bad):
    with pytest.raises(RequestError, match="cursor"):
        Cursor.parse(bad)


async def create(cluster, node, name, owner="alice"):
    """What `ve create` does to the directory: the record first (conditionally), then the entry."""
    uid = f"{name}-{random.random()}"
    dht = cluster.nodes[node]
    await dht.put_if(PREFIX + name, {"name": name, "owner": owner, "uid": uid}, None)
    await Index(dht, PREFIX).add(Entry(name, owner, uid))
    return uid


async def listed(index, limit, wanted=lambda e: True):
    shown, cursor, pages = [], None, 0
    while True:
        records, cursor = await index.listing(limit, cursor, wanted)
        assert len(records) <= limit
        shown += [r.value["name"] for r in records]
        pages += 1
        if cursor is None:
            return shown, pages


async def test_concurrent_creates_through_every_node_are_all_listed_once_across_pages(tmp_path, autojump_clock):
    cluster = await Cluster.of(tmp_path, 8)
    rng = random.Random(3)
    cluster.net.latency = lambda a, b: rng.uniform(0.0002, 0.01)
    vms = [f"ve{i:02d}" for i in range(48)]  # three per bucket on average: adds of one bucket collide
    async with trio.open_nursery() as nursery:
        for i, name in enumerate(vms):
            nursery.start_soon(create, cluster, f"n{i % 8}", name, "alice" if i % 3 else "bob")
    index = Index(cluster.nodes["n5"], PREFIX)
    shown, pages = await listed(index, 7)
    assert sorted(shown) == vms and len(shown) == len(set(shown)) and pages == 7
    alices, _ = await listed(index, 5, lambda e: e.owner == "alice")
    assert sorted(alices) == [name for i, name in enumerate(vms) if i % 3]


async def test_a_destroyed_ve_leaves_the_list_even_if_its_entry_outlived_it(tmp_path, autojump_clock):
    cluster = await Cluster.of(tmp_path, 6)
    uids = {name: await create(cluster, "n1", name) for name in ("a", "b", "c", "d")}
    dht = cluster.nodes["n2"]
    index = Index(dht, PREFIX)
    await dht.delete(PREFIX + "a")  # a destroy: the record, then the entry
    await index.remove("a", uids["a"])
    await dht.delete(PREFIX + "b")  # a destroy whose entry removal failed
    await dht.put(PREFIX + "c", {"name": "c", "owner": "alice", "uid": "again"})  # created again, not indexed yet
    shown, _ = await listed(index, 2)
    assert sorted(shown) == ["d"]
    left = {e.name for b in range(BUCKETS) for e in (await index._read(range(b, b + 1)))[b]}
    assert left == {"d"}  # the lister removed the entries their records disown


async def test_a_listing_reads_the_index_and_its_records_not_every_node(tmp_path, autojump_clock):
    cluster = Cluster(tmp_path)
    for i in range(64):
        cluster.add(f"n{i}")
    cluster.wire()
    for i in range(5):
        await create(cluster, f"n{i}", f"ve{i}")
    served: list[tuple[str, str]] = []
    for dht in cluster.nodes.values():
        for method, (declared, handler) in list(dht.transport.routes.items()):
            async def counted(caller, request, name=dht.ring.me.name, method=method, handler=handler):
                served.append((name, method))
                return await handler(caller, request)
            dht.transport.routes[method] = (declared, counted)
    shown, _ = await listed(Index(cluster.nodes["n40"], PREFIX), 100)
    assert sorted(shown) == [f"ve{i}" for i in range(5)]
    fetched = [name for name, method in served if method == "dht.fetch"]
    assert len(fetched) == R * (BUCKETS + 5)  # each bucket and each listed record read once from its replicas
    assert len(set(fetched)) < len(cluster.nodes)
    assert {method for _, method in served} <= {"dht.fetch", "chord.step"}  # lookups and reads: no scan of every member
