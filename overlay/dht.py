"""Replicated records on the ring: the VE directory and anything else that must survive node losses.

A record lives on the r nodes that follow hash(key) on the ring (Dynamo/Cassandra style). Records
are versioned; the higher (version, writer) wins everywhere, and a delete is a tombstone so a stale
replica cannot resurrect what was deleted. Reads ask every replica, return the newest and repair the
stale ones; writes need `w` acknowledgements.

A periodic pass (`DHT.maintain`) keeps replicas in step without resending what they already hold:

* **Anti-entropy by digests.** With p1..pr our predecessors and s1..s(r-1) our successors, a key in
  (p(j+1), pj] lives on pj..p1, me, s1.. (r nodes), so we share with s_i exactly the keys in
  (p(r-i), me]. For each such successor we send one `dht.digest`: hashes of that range's records,
  bucketed by key. The successor answers with its (key, version, writer) entries in the buckets that
  differ; we then push what is newer here and pull what is newer there (`dht.sync`, in batches).
  Each pair of replicas is compared by the first of the two on the ring, so every pair converges.
  In steady state a pass costs r-1 `chord.state` calls (to learn p2..pr: Chord keeps only p1) and
  r-1 digests, whatever the number of records.
* **Hand-off.** A record outside (pr, me] was ours before a join (or we see the ring wrongly): a
  lookup confirms we are no longer among its r replicas, we offer (key, version, writer) to them
  (`dht.offer`), push only what they lack, and drop the record once one of them holds it.

Each node's shard is persisted in SQLite so a restarted agent still holds what it held.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import msgpack
import trio

from overlay.chord import RING, Peer, between_right, hash_id
from overlay.messages import DHT_DIGEST, DHT_FETCH, DHT_OFFER, DHT_STORE, DHT_SYNC
from overlay.ring import Ring, peer_from_wire
from overlay.wire.rpc import Caller, Endpoint, RequestError, RpcError

log = logging.getLogger(__name__)
CALL_TIMEOUT = 3.0
REPLICA_CACHE_SECONDS = 2.0
MAX_BUCKETS = 1024
"""Upper bound on the buckets of one digest (about 9 bytes each on the wire)."""
MAX_ENTRIES = 4096
"""(key, version, writer) entries in one digest answer; differing buckets past it wait for the next pass."""
SYNC_BATCH = 128
"""Records pushed, pulled or offered in one `dht.sync` / `dht.offer` call (frames are capped at 4 MiB)."""
STATS = ("passes", "rpcs", "failures", "digests_sent", "digests_answered", "buckets_differing",
         "records_pushed", "records_pulled", "handoff_lookups", "handoff_offered", "handoff_pushed",
         "handoff_dropped")


@dataclass(frozen=True)
class Record:
    key: str
    value: Any  # None marks a deletion (tombstone)
    version: int
    writer: str

    @property
    def deleted(self) -> bool:
        return self.value is None

    def newer_than(self, other: Record | None) -> bool:
        return other is None or (self.version, self.writer) > (other.version, other.writer)

    def to_wire(self) -> list[Any]:
        return [self.key, self.value, self.version, self.writer]


def record_from_wire(data: Any) -> Record:
    if not (isinstance(data, list) and len(data) == 4 and isinstance(data[0], str)
            and isinstance(data[2], int) and data[2] >= 0 and isinstance(data[3], str)):
        raise RequestError(f"malformed record {str(data)[:60]!r}")
    return Record(data[0], data[1], data[2], data[3])


def entry_from_wire(data: Any) -> tuple[str, int, str]:
    """A (key, version, writer) entry: what digests and offers compare instead of whole records."""
    if not (isinstance(data, list) and len(data) == 3 and isinstance(data[0], str)
            and isinstance(data[1], int) and data[1] >= 0 and isinstance(data[2], str)):
        raise RequestError(f"malformed entry {str(data)[:60]!r}")
    return data[0], data[1], data[2]


@lru_cache(maxsize=1 << 16)
def key_position(key: str) -> int:
    """Where `key` sits on the ring. Cached: every pass asks again for every record."""
    return hash_id(key)


def in_arc(key: str, lo: int, hi: int) -> bool:
    """True if `key` lies in the ring arc (lo, hi]; lo == hi is the whole circle."""
    return between_right(key_position(key), lo, hi)


def bucket_count(records: int) -> int:
    """Buckets for a digest over `records` records: about 8 per bucket, so that a differing bucket
    costs a few entries; at least 16 and at most MAX_BUCKETS, so that a digest stays small."""
    return min(MAX_BUCKETS, max(16, 1 << (records // 8).bit_length()))


def bucket_of(key: str, buckets: int) -> int:
    """The low bits of the key's hash: a replica arc is a narrow slice of the ring, so the high bits
    (its position) are nearly the same for every key in it and would fill one bucket."""
    return key_position(key) % buckets


@lru_cache(maxsize=1 << 16)
def entry_hash(key: str, version: int, writer: str) -> int:
    return int.from_bytes(hashlib.blake2b(msgpack.packb([key, version, writer]), digest_size=8).digest(), "big")


def digest(records: Iterable[Record], buckets: int) -> list[int]:
    """One 64-bit hash per bucket, the XOR of its entries' hashes (0 when empty). Two replicas agree on
    a bucket when they hold the same versions of the same keys in it. XOR needs no sorting; values are
    not hashed because (version, writer) already names a value."""
    out = [0] * buckets
    for record in records:
        out[bucket_of(record.key, buckets)] ^= entry_hash(record.key, record.version, record.writer)
    return out


class Shard:
    """The records this node holds: in memory (what every read uses) and in SQLite (what a restart reads).

    A change is made in memory at once, inside the caller's synchronous section, so concurrent handlers
    always see one consistent shard; its SQLite statement then runs in a worker thread and the caller
    returns once it is committed, so an acknowledged store is on disk and the event loop never waits on
    the disk. One connection, used by one thread at a time (a limiter of one: sqlite3 connections must
    not be used by two threads at once, and SQLite takes one writer anyway). Statements may commit in
    another order than memory changed (two merges of one key racing), so each carries the rule itself:
    an upsert keeps the newer (version, writer), a drop deletes only the version it dropped.

    `inline=True` runs the statements in the caller instead: under a virtual clock (tests, simulations)
    a thread would let the clock jump past every deadline while it works.
    """

    def __init__(self, path: Path, inline: bool = False) -> None:
        self._db = sqlite3.connect(path, check_same_thread=False)
        self._inline = inline
        self._limiter = trio.CapacityLimiter(1)
        self._db.execute("CREATE TABLE IF NOT EXISTS records (key TEXT PRIMARY KEY, value BLOB, "
                         "version INTEGER, writer TEXT)")
        self.records: dict[str, Record] = {}
        for key, value, version, writer in self._db.execute("SELECT key, value, version, writer FROM records"):
            self.records[key] = Record(key, msgpack.unpackb(value, raw=False), version, writer)

    async def merge(self, record: Record) -> bool:
        """Keep `record` if it is newer than what we hold; True if it was stored."""
        return bool(await self.merge_many([record]))

    async def merge_many(self, records: Iterable[Record]) -> int:
        """`merge` for a batch, in one transaction: one sync to disk per anti-entropy batch instead
        of one per record. Returns how many were stored."""
        newer: dict[str, Record] = {}
        for record in records:
            if record.newer_than(newer.get(record.key) or self.records.get(record.key)):
                newer[record.key] = record
        if newer:
            self.records.update(newer)
            await self._write(_UPSERT, [(r.key, msgpack.packb(r.value, use_bin_type=True), r.version, r.writer)
                                        for r in newer.values()])
        return len(newer)

    async def drop(self, key: str) -> None:
        await self.drop_many([key])

    async def drop_many(self, keys: Iterable[str]) -> None:
        dropped = [self.records.pop(key) for key in list(keys) if key in self.records]
        if dropped:
            await self._write(_DELETE, [(r.key, r.version, r.writer) for r in dropped])

    async def _write(self, statement: str, rows: list[tuple[Any, ...]]) -> None:
        def write() -> None:
            with self._db:
                self._db.executemany(statement, rows)
        if self._inline:
            write()
        else:
            await trio.to_thread.run_sync(write, limiter=self._limiter)

    def close(self) -> None:
        self._db.close()


_UPSERT = ("INSERT INTO records VALUES (?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
           "version = excluded.version, writer = excluded.writer WHERE (excluded.version, excluded.writer) > "
           "(records.version, records.writer)")
"""Store a record unless the row holds a newer (version, writer): `Record.newer_than`, in SQL."""
_DELETE = "DELETE FROM records WHERE key = ? AND version = ? AND writer = ?"
"""Drop the version that was dropped from memory, not a newer one written since."""


class DHT:
    """put/get over the ring with r replicas per key. Listing is the agent's (`agents.overlays`): it asks
    every member for its shard, whichever overlay is bound."""

    def __init__(self, transport: Endpoint, ring: Ring, shard: Shard, r: int = 3, w: int = 2) -> None:
        self.transport = transport
        self.ring = ring
        self.shard = shard
        self.r = r
        self.w = w
        self._replica_cache: dict[str, tuple[float, list[str]]] = {}
        self.stats: dict[str, int] = dict.fromkeys(STATS, 0)
        """What `maintain` cost and moved, cumulated: RPCs it made (`rpcs`, failed ones in `failures`),
        digests sent and answered, records pushed and pulled by anti-entropy, and hand-off work."""
        transport.route(DHT_STORE, self._on_store)
        transport.route(DHT_FETCH, self._on_fetch)
        transport.route(DHT_DIGEST, self._on_digest)
        transport.route(DHT_SYNC, self._on_sync)
        transport.route(DHT_OFFER, self._on_offer)

    async def _on_store(self, caller: Caller, args: dict[str, Any]) -> bool:
        await self.shard.merge(record_from_wire(args.get("record")))
        return True

    async def _on_fetch(self, caller: Caller, args: dict[str, Any]) -> list[Any] | None:
        record = self.shard.records.get(_key_arg(args))
        return record.to_wire() if record else None

    async def _on_digest(self, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        """A predecessor compares the arc (lo, hi] we share: answer with our entries in the buckets
        whose hashes differ (whole buckets, at most about MAX_ENTRIES entries; the rest waits)."""
        lo, hi = _position_arg(args, "lo"), _position_arg(args, "hi")
        theirs = args.get("buckets")
        if not (isinstance(theirs, list) and 1 <= len(theirs) <= MAX_BUCKETS
                and all(isinstance(h, int) and 0 <= h < RING for h in theirs)):
            raise RequestError(f"buckets must be a list of 1 to {MAX_BUCKETS} 64-bit hashes")
        self.stats["digests_answered"] += 1
        count = len(theirs)
        mine = self._in_arc(lo, hi)
        differing = {i: [] for i, h in enumerate(digest(mine, count)) if h != theirs[i]}
        for record in mine:
            group = differing.get(bucket_of(record.key, count))
            if group is not None:
                group.append([record.key, record.version, record.writer])
        covered, entries = [], []
        for index, group in differing.items():
            if entries and len(entries) + len(group) > MAX_ENTRIES:
                break
            covered.append(index)
            entries += group
        return {"buckets": covered, "entries": entries}

    async def _on_sync(self, caller: Caller, args: dict[str, Any]) -> list[list[Any]]:
        """Keep the pushed records that are newer than ours; answer with ours for the pulled keys."""
        records = [record_from_wire(raw) for raw in _list_arg(args, "push")]
        keys = [_check_key(key, "pull") for key in _list_arg(args, "pull")]
        await self.shard.merge_many(records)
        return [self.shard.records[key].to_wire() for key in keys if key in self.shard.records]

    async def _on_offer(self, caller: Caller, args: dict[str, Any]) -> list[str]:
        """Hand-off: the keys of these (key, version, writer) entries that we lack or hold older."""
        entries = [entry_from_wire(raw) for raw in _list_arg(args, "entries")]
        return [key for key, version, writer in entries
                if Record(key, None, version, writer).newer_than(self.shard.records.get(key))]

    def _in_arc(self, lo: int, hi: int) -> list[Record]:
        return [record for key, record in self.shard.records.items() if in_arc(key, lo, hi)]

    async def replicas(self, key: str) -> list[str]:
        """The r nodes that should hold `key`. Cached briefly: one operation asks several times, and
        a stale answer only sends a copy to a node that the repair pass then hands off."""
        now = trio.current_time()
        cached = self._replica_cache.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        addrs = [peer.addr for peer in await self.ring.lookup(hash_id(key), self.r)]
        if len(self._replica_cache) > 4096:
            self._replica_cache = {k: v for k, v in self._replica_cache.items() if v[0] > now}
        self._replica_cache[key] = (now + REPLICA_CACHE_SECONDS, addrs)
        return addrs

    async def _call_replicas(self, key: str, method: str, args: dict[str, Any]) -> dict[str, Any]:
        addrs = await self.replicas(key)
        answers = await self.transport.call_many(addrs, method, args, CALL_TIMEOUT)
        if any(isinstance(a, Exception) for a in answers.values()):
            self._replica_cache.pop(key, None)  # someone did not answer: look the replicas up afresh next time
        return answers

    async def get_record(self, key: str) -> Record | None:
        """The newest copy among the replicas, tombstones included; stale replicas are repaired."""
        answers = await self._call_replicas(key, "dht.fetch", {"key": key})
        copies = {addr: record_from_wire(v) if v is not None else None
                  for addr, v in answers.items() if not isinstance(v, Exception)}
        if not copies:
            raise RequestError(f"no replica of {key!r} answered")
        newest = None
        for record in copies.values():
            if record is not None and record.newer_than(newest):
                newest = record
        if newest is not None:
            stale = [a for a, rec in copies.items() if rec is None or newest.newer_than(rec)]
            await self.transport.call_many(stale, "dht.store", {"record": newest.to_wire()}, CALL_TIMEOUT)
        return newest

    async def get(self, key: str) -> Record | None:
        """The live record for `key`, or None if it is absent or deleted."""
        record = await self.get_record(key)
        return None if record is None or record.deleted else record

    async def put(self, key: str, value: Any, after: int | None = None) -> Record:
        """Write a new version of `key`: version `after + 1` when the caller knows the version it
        follows (0 for a key never written), else one more than the replicas hold."""
        if after is None:
            answers = await self._call_replicas(key, "dht.fetch", {"key": key})
            after = max((v[2] for v in answers.values() if isinstance(v, list) and len(v) == 4), default=0)
        record = Record(key, value, after + 1, self.ring.me.name)
        answers = await self._call_replicas(key, "dht.store", {"record": record.to_wire()})
        acks = sum(1 for v in answers.values() if v is True)
        if acks < min(self.w, len(answers)):
            raise RequestError(f"write of {key!r} reached {acks} of {len(answers)} replicas")
        return record

    async def delete(self, key: str, after: int | None = None) -> Record:
        return await self.put(key, None, after)

    # -- anti-entropy and hand-off (see the module docstring) ----------------------------------------

    async def maintain(self) -> None:
        """One pass: compare with each successor we share records with, then hand off the records that
        are no longer ours. Successors are compared one after the other, so a record we lack and both
        hold is pulled once (the second digest already has it). A failure only makes the pass partial;
        the next one retries."""
        self.stats["passes"] += 1
        preds = await self._predecessors()
        for i, peer in enumerate(self._sharing_successors(), start=1):
            lo = self._arc_start(preds, self.r - i)
            if lo is not None:
                await self._sync_with(peer, lo)
        lo = self._arc_start(preds, self.r)
        if lo is not None:
            await self._hand_off(lo)

    def _sharing_successors(self) -> list[Peer]:
        """s1..s(r-1): the successors that hold some of our records."""
        return [p for p in self.ring.state.successor_list() if p.id != self.ring.me.id][: self.r - 1]

    async def _predecessors(self) -> list[Peer]:
        """p1..pr, nearest first, as far as known. Chord keeps only p1: each further one is asked of the
        previous. The walk stops at a gap (unknown, unreachable, or not further counter-clockwise) and
        at ourselves, which then ends the list: a ring of at most r nodes, where all hold everything."""
        me = self.ring.me
        chain: list[Peer] = []
        pred = self.ring.state.predecessor
        while pred is not None and len(chain) < self.r:
            if pred.id == me.id:
                chain.append(me)
                break
            if chain and (me.id - pred.id) % RING <= (me.id - chain[-1].id) % RING:
                break
            chain.append(pred)
            if len(chain) < self.r:
                pred = await self._predecessor_of(pred)
        return chain

    async def _predecessor_of(self, peer: Peer) -> Peer | None:
        try:
            reply = await self._call(peer.addr, "chord.state", {})
            raw = reply.get("predecessor") if isinstance(reply, dict) else None
            return peer_from_wire(raw) if raw is not None else None
        except (RpcError, RequestError) as err:
            self.stats["failures"] += 1
            log.debug("predecessor of %s unknown: %s", peer.name, err)
            return None

    def _arc_start(self, preds: list[Peer], j: int) -> int | None:
        """Where the arc (pj, me] starts: the keys we share with s(r-j) (and every nearer successor);
        with j = r, every key we should hold. None if pj is not known."""
        if j <= len(preds):
            return preds[j - 1].id
        if preds and preds[-1].id == self.ring.me.id:
            return self.ring.me.id  # small ring: (me, me] is the whole circle
        return None

    async def _sync_with(self, peer: Peer, lo: int) -> None:
        """Compare the arc (lo, me] with `peer` by digest; push what is newer here, pull what is newer there."""
        hi = self.ring.me.id
        mine = {record.key: record for record in self._in_arc(lo, hi)}
        buckets = bucket_count(len(mine))
        try:
            self.stats["digests_sent"] += 1
            reply = await self._call(peer.addr, "dht.digest",
                                     {"lo": lo, "hi": hi, "buckets": digest(mine.values(), buckets)})
            covered, theirs = _digest_reply(reply, buckets)
            self.stats["buckets_differing"] += len(covered)
            push = [r for key, r in mine.items() if bucket_of(key, buckets) in covered
                    and (key not in theirs or (r.version, r.writer) > theirs[key])]
            pull = [key for key, stamp in theirs.items()
                    if key not in mine or stamp > (mine[key].version, mine[key].writer)]
            await self._exchange(peer.addr, push, pull)
        except (RpcError, RequestError) as err:
            self.stats["failures"] += 1
            log.info("anti-entropy with %s failed: %s", peer.name, err)

    async def _exchange(self, addr: str, push: list[Record], pull: list[str]) -> None:
        """Send `push` and fetch `pull` from `addr`, SYNC_BATCH of each per call."""
        for start in range(0, max(len(push), len(pull)), SYNC_BATCH):
            batch, keys = push[start:start + SYNC_BATCH], pull[start:start + SYNC_BATCH]
            answer = await self._call(addr, "dht.sync", {"push": [r.to_wire() for r in batch], "pull": keys})
            self.stats["records_pushed"] += len(batch)
            if not isinstance(answer, list):
                raise RequestError("dht.sync answered with something else than a list")
            wanted = set(keys)
            pulled = [record for record in map(record_from_wire, answer) if record.key in wanted]
            self.stats["records_pulled"] += len(pulled)
            await self.shard.merge_many(pulled)

    async def _hand_off(self, lo: int) -> None:
        """Give the records outside (lo, me] to their replicas; drop each once one of them holds it.

        Ownership is confirmed by a lookup before anything is dropped (our view of the predecessors
        may lag). One lookup serves every key up to the owner it finds, as they share its successors.
        """
        me = self.ring.me
        foreign = sorted((r for key, r in self.shard.records.items() if not in_arc(key, lo, me.id)),
                         key=lambda r: (key_position(r.key) - me.id) % RING)
        while foreign:
            start = key_position(foreign[0].key)
            self.stats["handoff_lookups"] += 1
            try:
                owners = await self.ring.lookup(start, self.r)
            except (RpcError, RequestError) as err:
                self.stats["failures"] += 1
                log.info("hand-off lookup failed: %s", err)
                return
            span = (owners[0].id - start) % RING if owners else 0
            group = [r for r in foreign if (key_position(r.key) - start) % RING <= span]
            foreign = [r for r in foreign if (key_position(r.key) - start) % RING > span]
            if owners and all(p.id != me.id for p in owners):
                await self._give_away([p.addr for p in owners], group)

    async def _give_away(self, addrs: list[str], records: list[Record]) -> None:
        """Offer (key, version, writer) to each replica, push only what it lacks, drop what one holds."""
        for start in range(0, len(records), SYNC_BATCH):
            batch = {r.key: r for r in records[start:start + SYNC_BATCH]}
            entries = [[r.key, r.version, r.writer] for r in batch.values()]
            self.stats["handoff_offered"] += len(batch)
            self.stats["rpcs"] += len(addrs)
            answers = await self.transport.call_many(addrs, "dht.offer", {"entries": entries}, CALL_TIMEOUT)
            held: set[str] = set()
            for addr, answer in answers.items():
                if not isinstance(answer, list):
                    self.stats["failures"] += 1
                    continue
                wanted = [key for key in answer if isinstance(key, str) and key in batch]
                held |= batch.keys() - set(wanted)
                try:
                    if wanted:
                        await self._call(addr, "dht.sync", {"push": [batch[k].to_wire() for k in wanted], "pull": []})
                        self.stats["handoff_pushed"] += len(wanted)
                        held |= set(wanted)
                except (RpcError, RequestError):
                    self.stats["failures"] += 1
            # a record replaced by a newer write meanwhile was not handed off: keep it for the next pass
            gone = [key for key in held if self.shard.records.get(key) is batch[key]]
            await self.shard.drop_many(gone)
            self.stats["handoff_dropped"] += len(gone)

    async def _call(self, addr: str, method: str, args: dict[str, Any]) -> Any:
        self.stats["rpcs"] += 1
        return await self.transport.call(addr, method, args, timeout=CALL_TIMEOUT)


def _digest_reply(reply: Any, buckets: int) -> tuple[set[int], dict[str, tuple[int, str]]]:
    """The buckets a digest answer covers, and its (version, writer) per key."""
    covered = reply.get("buckets") if isinstance(reply, dict) else None
    entries = reply.get("entries") if isinstance(reply, dict) else None
    if not (isinstance(covered, list) and all(isinstance(i, int) and 0 <= i < buckets for i in covered)
            and isinstance(entries, list)):
        raise RequestError("malformed dht.digest answer")
    theirs = {key: (version, writer) for key, version, writer in map(entry_from_wire, entries)}
    return set(covered), theirs


def _key_arg(args: dict[str, Any], name: str = "key") -> str:
    return _check_key(args.get(name), name)


def _check_key(value: Any, name: str) -> str:
    if not isinstance(value, str) or len(value) > 1024:
        raise RequestError(f"{name} must be a string of at most 1024 characters")
    return value


def _position_arg(args: dict[str, Any], name: str) -> int:
    value = args.get(name)
    if not isinstance(value, int) or not 0 <= value < RING:
        raise RequestError(f"{name} must be a position on the ring (0 <= {name} < 2**64)")
    return value


def _list_arg(args: dict[str, Any], name: str) -> list[Any]:
    value = args.get(name, [])
    if not isinstance(value, list) or len(value) > SYNC_BATCH:
        raise RequestError(f"{name} must be a list of at most {SYNC_BATCH} items")
    return value
