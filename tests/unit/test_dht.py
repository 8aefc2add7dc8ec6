"""The replicated DHT on the in-memory network: survival of r-1 crashes, hand-off on joins, and
anti-entropy by digests that moves only what differs."""

import random
import sqlite3
import tempfile
from collections import defaultdict
from pathlib import Path

import msgpack
import pytest
import trio
import trio.testing
from trio.testing import MockClock

from overlay.chord import hash_id
from overlay.dht import _DELETE, _SYNCED, _UPSERT, DHT, MAX_BUCKETS, STATS, Record, Shard, bucket_count, digest
from overlay.messages import DHT_DIGEST
from overlay.ring import Ring
from overlay.wire import memnet
from overlay.wire.memnet import MemNetwork
from overlay.wire.rpc import RemoteError

R = 3
EPOCH = 1.7e9
INTERVAL = 5.0


class Cluster:
    """Rings and DHTs (r = 3, w = 2) on one memnet, driven by hand: nothing runs unless a test says so."""

    def __init__(self, tmp_path):
        self.net = MemNetwork(lambda a, b: 0.001)
        self.tmp = tmp_path
        self.nodes: dict[str, DHT] = {}

    @staticmethod
    def now():
        """The nodes' wall clock: virtual, as trio's clock is."""
        return EPOCH + trio.current_time()

    def add(self, name, dht_class=DHT):
        addr = f"mem:{name}"
        transport = self.net.endpoint(addr, name, "s")
        ring = Ring(transport, name, addr, "s", r=5, learn=False)
        shard = Shard(self.tmp / f"{name}.sqlite", inline=True, wall=self.now)
        if dht_class is DHT:  # membership, as agents wire it, knows every node of the cluster
            self.nodes[name] = DHT(transport, ring, shard, r=R, w=2, repair_interval=INTERVAL, wall=self.now,
                                   members=lambda: len(self.nodes))
        else:
            self.nodes[name] = dht_class(transport, ring, shard, r=R, w=2)
        return self.nodes[name]

    async def start(self, name, seed=None):
        """A node that joins through the protocol (its shard is reopened if it ran before)."""
        dht = self.add(name)
        if seed is not None:
            assert await dht.ring.join([self.nodes[seed].ring.me.addr])
        return dht

    def wire(self):
        """Give every node its true successors and predecessor, as a converged ring has them."""
        ordered = self.ordered()
        for k, name in enumerate(ordered):
            state = self.nodes[name].ring.state
            state.successors = [self.nodes[ordered[(k + j) % len(ordered)]].ring.me
                                for j in range(1, min(state.r + 1, len(ordered)))]
            state.predecessor = self.nodes[ordered[k - 1]].ring.me

    async def seed(self, records):
        """Store records on their true replicas directly (one transaction per node)."""
        batches = defaultdict(list)
        for record in records:
            for name in self.replicas(record.key):
                batches[name].append(record)
        for name, batch in batches.items():
            await self.nodes[name].shard.merge_many(batch)

    @classmethod
    async def of(cls, tmp_path, size):
        cluster = cls(tmp_path)
        for i in range(size):
            await cluster.start(f"n{i}", seed="n0" if i else None)
        await cluster.converge()
        return cluster

    def crash(self, name):
        dht = self.nodes.pop(name)
        self.net.crash(dht.ring.me.addr)
        dht.shard.close()

    def ordered(self):
        return sorted(self.nodes, key=hash_id)

    def exact(self):
        """Every node's predecessor and first r successors (what a lookup answers) are the true ones."""
        ordered = self.ordered()
        for k, name in enumerate(ordered):
            state = self.nodes[name].ring.state
            expected = [ordered[(k + j) % len(ordered)] for j in range(1, min(R + 1, len(ordered)))]
            if [p.name for p in state.successor_list()[: len(expected)]] != expected:
                return False
            if state.predecessor is None or state.predecessor.name != ordered[k - 1]:
                return False
        return True

    async def converge(self):
        for _ in range(40):
            if self.exact():
                return
            for dht in list(self.nodes.values()):
                await dht.ring.maintain(fingers=False)
        raise AssertionError("the ring did not converge")

    async def maintain(self, passes=1):
        for _ in range(passes):
            for dht in list(self.nodes.values()):
                await dht.maintain()

    def replicas(self, key):
        """The r live nodes that follow the key on the ring."""
        ordered = self.ordered()
        position = hash_id(key)
        first = next((k for k, name in enumerate(ordered) if hash_id(name) >= position), 0)
        return {ordered[(first + j) % len(ordered)] for j in range(min(R, len(ordered)))}

    def holders(self, key):
        return {name for name, dht in self.nodes.items() if key in dht.shard.records}

    def placed_exactly(self, keys):
        return all(self.holders(key) == self.replicas(key) for key in keys)

    def reset_stats(self):
        for dht in self.nodes.values():
            dht.stats = dict.fromkeys(STATS, 0)

    def total(self, *stats):
        return sum(dht.stats[s] for dht in self.nodes.values() for s in stats)


async def test_a_record_survives_r_minus_1_crashes_of_its_replicas(tmp_path, autojump_clock):
    cluster = await Cluster.of(tmp_path, 8)
    await cluster.nodes["n0"].put("ve/alpha", {"cpus": 2})
    replicas = cluster.replicas("ve/alpha")
    assert cluster.holders("ve/alpha") == replicas

    for victim in sorted(replicas)[: R - 1]:
        cluster.crash(victim)
    await cluster.converge()
    for dht in cluster.nodes.values():
        assert (await dht.get("ve/alpha")).value == {"cpus": 2}

    await cluster.maintain(2)
    assert len(cluster.replicas("ve/alpha")) == R
    assert cluster.holders("ve/alpha") == cluster.replicas("ve/alpha")


async def test_a_joining_node_receives_what_it_now_owns_and_the_old_replica_drops_it(tmp_path, autojump_clock):
    cluster = await Cluster.of(tmp_path, 6)
    names = [*cluster.nodes, "joiner"]
    # a key the joiner will own: the joiner's id falls between the key and the key's current owner
    key = next(k for k in (f"ve/{i}" for i in range(1000))
               if min(names, key=lambda n: (hash_id(n) - hash_id(k)) % 2**64) == "joiner")
    others = [f"ve/other{i}" for i in range(30)]
    await cluster.seed(Record(k, k, 1, "n1") for k in [key, *others])
    before = cluster.replicas(key)

    await cluster.start("joiner", seed="n2")
    await cluster.converge()
    await cluster.maintain()
    after = cluster.replicas(key)
    assert "joiner" in after
    [left] = before - after
    assert cluster.holders(key) == after
    assert key not in cluster.nodes[left].shard.records
    assert cluster.placed_exactly(others)
    assert cluster.total("handoff_dropped") >= 1


async def test_in_sync_replicas_exchange_digests_only(tmp_path, autojump_clock):
    cluster = await Cluster.of(tmp_path, 6)
    rng = random.Random(1)
    keys = [f"ve/{i}" for i in range(30)]
    for key in keys:
        await cluster.nodes[rng.choice(list(cluster.nodes))].put(key, {"n": key})
    await cluster.maintain()
    assert cluster.placed_exactly(keys)

    cluster.reset_stats()
    messages = cluster.net.messages
    await cluster.maintain()
    assert cluster.total("records_pushed", "records_pulled", "handoff_offered") == 0
    assert cluster.total("digests_sent") == 6 * (R - 1)
    # per node: r-1 chord.state calls to learn p2..pr, then r-1 digests
    assert cluster.net.messages - messages == cluster.total("rpcs") == 6 * 2 * (R - 1)


@pytest.mark.parametrize("how", ["partitioned", "restarted"])
async def test_a_replica_that_missed_k_writes_gets_about_k_records(tmp_path, autojump_clock, how):
    cluster = await Cluster.of(tmp_path, 6)
    keys = [f"ve/{i}" for i in range(60)]
    await cluster.seed(Record(key, 1, 1, "n0") for key in keys)
    victim = "n3"
    missed = [key for key in keys if victim in cluster.replicas(key)][:5]
    assert len(missed) == 5

    dht = cluster.nodes[victim]
    addr = dht.ring.me.addr
    if how == "partitioned":
        del cluster.net.endpoints[addr]  # nobody reaches it; its state stays as it was
    else:
        cluster.crash(victim)
    for key in missed:  # two of the three replicas acknowledge: the writes succeed
        await cluster.nodes["n0"].put(key, 2)
    if how == "partitioned":
        cluster.net.endpoints[addr] = dht.transport
    else:
        await cluster.start(victim, seed="n0")  # same name, same SQLite shard
        assert cluster.nodes[victim].shard.records[missed[0]].value == 1
        await cluster.converge()

    cluster.reset_stats()
    await cluster.maintain()
    assert cluster.total("records_pushed", "records_pulled") == len(missed)
    assert cluster.total("handoff_offered") == 0
    for key in missed:
        assert cluster.nodes[victim].shard.records[key].value == 2
    assert cluster.placed_exactly(keys)


async def test_the_newer_version_wins_and_a_tombstone_is_not_resurrected(tmp_path, autojump_clock):
    cluster = await Cluster.of(tmp_path, 5)
    key = "ve/contested"
    a, b, c = (cluster.nodes[name] for name in sorted(cluster.replicas(key)))
    await a.shard.merge(Record(key, "old", 1, "w"))
    await b.shard.merge(Record(key, "new", 2, "w"))
    await cluster.maintain()
    assert {dht.shard.records[key] for dht in (a, b, c)} == {Record(key, "new", 2, "w")}

    deleted = Record(key, None, 3, "w", cluster.now())
    await c.shard.merge(deleted)  # a delete that reached one replica only
    await cluster.maintain()
    assert {dht.shard.records[key] for dht in (a, b, c)} == {deleted}
    assert not await b.shard.merge(Record(key, "new", 2, "w"))  # a late copy of the live value loses
    for dht in cluster.nodes.values():
        assert await dht.get(key) is None


async def test_malformed_anti_entropy_requests_are_refused_and_the_node_keeps_serving(tmp_path, autojump_clock):
    cluster = await Cluster.of(tmp_path, 4)
    await cluster.nodes["n0"].put("ve/x", 1)
    target = cluster.nodes["n1"].ring.me.addr
    caller = cluster.nodes["n2"].transport
    bad = [
        ("dht.digest", {}),
        ("dht.digest", {"lo": "0", "hi": 0, "buckets": [0]}),
        ("dht.digest", {"lo": -1, "hi": 0, "buckets": [0]}),
        ("dht.digest", {"lo": 0, "hi": 0, "buckets": []}),
        ("dht.digest", {"lo": 0, "hi": 0, "buckets": ["a"]}),
        ("dht.digest", {"lo": 0, "hi": 0, "buckets": [0] * (MAX_BUCKETS + 1)}),
        ("dht.digest", {"lo": 0, "hi": 0, "buckets": {"0": 1}}),
        ("dht.sync", {"push": [["k", 1, "not a version", "w"]]}),
        ("dht.sync", {"pull": [3]}),
        ("dht.sync", {"push": "x"}),
        ("dht.offer", {"entries": [["k", -1, "w"]]}),
        ("dht.offer", {"entries": None}),
    ]
    for method, args in bad:
        with pytest.raises(RemoteError) as refused:
            await caller.call(target, method, args)
        assert refused.value.kind == "bad_request", (method, args)
    assert (await cluster.nodes["n1"].get("ve/x")).value == 1
    await cluster.maintain()
    assert cluster.total("failures") == 0


async def test_a_malformed_digest_answer_fails_one_comparison_not_the_pass(tmp_path, autojump_clock):
    cluster = await Cluster.of(tmp_path, 4)
    await cluster.nodes["n0"].put("ve/x", 1)
    name = cluster.ordered()[0]
    successor = cluster.nodes[cluster.ordered()[1]]

    async def garbage(caller, request):
        return {"buckets": [10**6], "entries": "?"}

    del successor.transport.routes[DHT_DIGEST.name]
    successor.transport.route(DHT_DIGEST, garbage)
    await cluster.nodes[name].maintain()
    assert cluster.nodes[name].stats["failures"] == 1
    assert cluster.nodes[name].stats["digests_sent"] == R - 1


def test_digests_depend_on_versions_not_on_order():
    records = [Record(f"k{i}", i, i + 1, "w") for i in range(40)]
    buckets = bucket_count(len(records))
    assert digest(records, buckets) == digest(reversed(records), buckets)
    changed = [*records[:-1], Record("k39", "x", 41, "w")]
    assert sum(a != b for a, b in zip(digest(records, buckets), digest(changed, buckets), strict=True)) == 1
    assert digest([], 16) == [0] * 16
    assert bucket_count(0) == 16 and bucket_count(10**6) == MAX_BUCKETS



async def test_a_shard_merges_a_batch_in_one_transaction_and_keeps_the_newest(tmp_path):
    shard = Shard(tmp_path / "s.sqlite")
    await shard.merge(Record("a", 1, 5, "w"))
    batch = [Record("a", 2, 4, "w"), Record("b", 1, 1, "w"), Record("b", 3, 3, "w", 7.0), Record("b", 2, 2, "w")]
    assert await shard.merge_many(batch) == 1
    await shard.drop_many(["a"])
    shard.close()
    reopened = Shard(tmp_path / "s.sqlite")
    assert reopened.records == {"b": Record("b", 3, 3, "w", 7.0)}
    reopened.close()


async def test_a_slow_write_leaves_the_event_loop_free_and_returns_once_committed(tmp_path):
    """Another connection holds SQLite's write lock, so the shard's statement cannot commit: meanwhile the
    record is served from memory and other tasks run; the merge returns once the lock is free and the
    record is on disk."""
    path = tmp_path / "s.sqlite"
    shard = Shard(path)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    stored = trio.Event()

    async def store():
        assert await shard.merge(Record("k", "v", 1, "w", 5.0))
        stored.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store)
            await trio.testing.wait_all_tasks_blocked()  # on the old, blocking shard: never, the loop is stuck
            assert shard.records["k"].value == "v" and not stored.is_set()
            blocker.execute("COMMIT")
            await stored.wait()
    blocker.close()
    shard.close()
    assert Shard(path).records == {"k": Record("k", "v", 1, "w", 5.0)}


async def test_the_disk_keeps_the_newest_whatever_order_the_statements_commit_in(tmp_path):
    """The statements carry the newer-wins rule: a stale copy that commits late, a drop of a version
    replaced since, or an older `synced_at` cannot undo what memory (and an acknowledgement) holds."""
    shard = Shard(tmp_path / "s.sqlite", wall=lambda: 100.0)
    assert shard.synced_at == 100.0  # a new shard is in step at its opening
    async with trio.open_nursery() as nursery:  # concurrent merges of one key, and of others
        for version in range(1, 21):
            nursery.start_soon(shard.merge, Record("k", version, version, "w", float(version)))
            nursery.start_soon(shard.merge, Record(f"k{version}", version, 1, "w"))
    assert shard.records["k"] == Record("k", 20, 20, "w", 20.0)
    await shard._write(_UPSERT, [("k", msgpack.packb(3), 3, "w", 3.0)])  # a stale copy of "k" landing late
    await shard._write(_UPSERT, [("k", msgpack.packb(-1), 20, "a", 0.0)])  # same version, lesser writer
    await shard._write(_DELETE, [("k", 19, "w")])  # the drop of a version replaced since
    await shard.drop_many(["k1"])
    await shard.save_synced_at(300.0)
    await shard._write(_SYNCED, [(200.0,)])  # an older comparison's time landing late
    shard.close()
    reopened = Shard(tmp_path / "s.sqlite")
    assert reopened.records == shard.records and "k1" not in reopened.records
    assert reopened.records["k"] == Record("k", 20, 20, "w", 20.0) and reopened.synced_at == 300.0
    reopened.close()


def measure(nodes, records, missed=0, dht_class=DHT):
    """One `maintain` on every node of an exactly wired ring of `nodes` nodes holding `records` records
    (r = 3, ~250 bytes each), `missed` of which one replica holds one version behind. Returns the RPCs,
    their payload bytes (msgpack of every request and answer) and the records moved. Runs under the
    virtual clock; `dht_class` may be another implementation with the same constructor."""
    sizes = [0]
    copy = memnet._copy

    def counting_copy(value):
        sizes[0] += len(msgpack.packb(value, use_bin_type=True))
        return copy(value)

    async def run(tmp):
        cluster = Cluster(Path(tmp))
        for i in range(nodes):
            cluster.add(f"n{i}", dht_class)
        cluster.wire()
        value = {"spec": "x" * 200, "owner": "n1", "placement": {"a": {"node": "n2"}}}
        await cluster.seed(Record(f"ve/{i:06d}", value, 2, "n1") for i in range(records))
        victim = cluster.nodes[cluster.ordered()[0]].shard
        behind = sorted(victim.records)[:missed]
        await victim.drop_many(behind)
        await victim.merge_many(Record(key, value, 1, "n1") for key in behind)
        messages, sizes[0] = cluster.net.messages, 0
        await cluster.maintain()
        moved = cluster.total("records_pushed", "records_pulled", "handoff_pushed") if dht_class is DHT else None
        return {"nodes": nodes, "records": records, "missed": missed, "messages": cluster.net.messages - messages,
                "payload_bytes": sizes[0], "records_moved": moved}

    memnet._copy = counting_copy
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return trio.run(run, tmp, clock=MockClock(autojump_threshold=0))
    finally:
        memnet._copy = copy


def test_a_pass_costs_the_same_messages_whatever_the_number_of_records():
    small, large, behind = measure(10, 100), measure(10, 1000), measure(10, 1000, missed=5)
    assert small["messages"] == large["messages"] == 10 * 2 * (R - 1)
    assert small["records_moved"] == large["records_moved"] == 0
    assert large["payload_bytes"] < 1000 * 250 / 20  # under a twentieth of the records it vouches for
    assert behind["records_moved"] == 5
    assert behind["messages"] <= large["messages"] + 2 * (R - 1)
