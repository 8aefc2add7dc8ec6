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

Each node's shard is persisted in SQLite so a restarted agent still holds what it held (`Shard`: memory
changes at once, the statements run in a worker thread, and an acknowledged store is on disk).

**A ring that has not caught up.** An agent that has just (re)started learns its members from gossip
(a seed pushes its whole table) well before its ring holds them: for a second or two its ring holds
only itself, or only its first successor, and names one replica for every key. A write acknowledged
there reaches one node, and a read returns that node's stale copy. So until this node's successor list
first holds min(r, live members - 1) other nodes, `replicas` waits for it (RingService adopts the
members as successors within a ring interval, and a stabilize then copies the successor's list) and
refuses after RING_PATIENCE with `RingUnsettled`, which asks to retry. Once caught up, the ring is
trusted as before: it drops a dead successor at once while membership still counts the node as a
suspect for seconds, and the shorter list is then the right one. Replica sets are cached briefly, and
forgotten whenever this node's successors or predecessor change.

**Conditional writes** (`DHT.put_if`, compare-and-set on the version, what `ve create` and the VE index
use). The writer sends `dht.prepare(key, expected (version, writer), token)` to the key's r replicas. A
replica grants it unless it holds a newer version than expected (answer "newer": the caller lost and
must read again) or another claimer's unexpired slot on the key ("claimed": retry after a random
backoff). Granting is one synchronous step, so each replica grants one claimer at a time; with a
majority granted the writer commits (`dht.store` with the token, which frees the slot), otherwise it
releases every slot and tries again, until CLAIM_PATIENCE. Two writers cannot both hold a majority,
so each version is decided once, and anti-entropy and read repair (which spread committed records
only, never slots) never meet two records of one version. Slots live in memory: a claimer commits
only within COMMIT_WINDOW of sending its prepare and a slot lasts CLAIM_LEASE (longer), and a replica
that restarts (its shard file existed) grants nothing for CLAIM_LEASE, so a slot lost in a crash
cannot be granted twice while its claimer may still commit. A commit whose answers were lost may still
have stored its record on a minority of the replicas, with the version a later writer then commits to a
majority: the committed record's writer is a ballot (its commit time, then the node: `ballot`), so the
later commit wins that tie wherever the two meet. The majority is of the replicas the
writer's ring view names: two writers that see different replica sets (a node joining or dying at
that moment) could both win; Chord's view settles within seconds, and that window is accepted.

**Tombstones** (see `Freshness`). Every record carries its writer's wall-clock write time. A
tombstone is collected, on every replica independently, once it is older than the grace period
G = 2Q + 4·CLOCK_SKEW, where Q = STALE_PASSES repair intervals (60 s at the agents' 5 s) bounds how
long a live replica may go without a complete comparison with every replica peer (its own digests
to s1..s(r-1) and theirs from p1..p(r-1), none truncated). A replica that is not stale compares with
each holder of a tombstone at least once per Q, so it has the tombstone long before anyone collects
it. A replica that was down or cut off longer than Q is *stale*: every record it held then is
doubtful, and a doubtful record older than 2Q (= G - 4·CLOCK_SKEW, so one whose deletion may have
been collected elsewhere) is hidden: not served to reads, digests, pulls or offers, and never pushed.
Once complete again, it asks the key's replicas (`dht.check`) and keeps a doubtful record only if one
of them holds exactly that version; otherwise it drops it. So a replica that missed a delete and
comes back after the tombstone was collected does not resurrect the record, and a whole cluster
restarted after a long stop loses nothing (every replica confirms the others' copies).
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import msgpack
import trio

from overlay import messages as m
from overlay.chord import RING, Peer, between_right, hash_id
from overlay.messages import MAX_BUCKETS, SYNC_BATCH
from overlay.quorum import FixedSets
from overlay.ring import Ring, peer_from_wire
from overlay.wire.rpc import A, Caller, Endpoint, Method, R, RequestError, RpcError

log = logging.getLogger(__name__)
CALL_TIMEOUT = 3.0
REPLICA_CACHE_SECONDS = 2.0
RING_PATIENCE = 2.0
"""How long `replicas` waits for a ring that has not caught up with membership since the start (module docstring)."""
RING_POLL = 0.1
MAX_ENTRIES = 4096
"""(key, version, writer) entries in one digest answer; differing buckets past it wait for the next pass."""
STATS = ("passes", "rpcs", "failures", "digests_sent", "digests_answered", "buckets_differing",
         "records_pushed", "records_pulled", "handoff_lookups", "handoff_offered", "handoff_pushed",
         "handoff_dropped", "tombstones_collected", "doubts_confirmed", "doubts_dropped")
CLAIM_LEASE = 6.0
"""How long a replica keeps a granted claim slot for its claimer (see "Conditional writes")."""
COMMIT_WINDOW = 4.0
"""A claimer commits only this soon after sending its prepare (more than CALL_TIMEOUT, less than the lease).
A restarted replica grants no slot for CLAIM_LEASE (a slot it lost may still be committed meanwhile)."""
CLAIM_PATIENCE = 8.0
"""How long `put_if` keeps retrying against other claims in progress: longer than CLAIM_LEASE, so the slot of
a claimer that died lapses meanwhile; with a last prepare and release (CALL_TIMEOUT each) it stays under the
15 s the agent gives an overlay operation (cancelling RPCs in flight would break their pooled connections)."""
CLAIM_BACKOFF = 0.05
"""First retry delay after a split vote (random below it, doubling up to 1 s)."""
STALE_PASSES = 12
"""Q: a replica without a complete comparison with every replica peer for this many repair intervals is stale."""
CLOCK_SKEW = 30.0
"""How far apart the agents' wall clocks may be (NTP keeps them far closer); it widens the tombstone grace."""


@dataclass(frozen=True)
class Record:
    key: str
    value: Any  # None marks a deletion (tombstone)
    version: int
    writer: str
    written: float = 0.0
    """The writer's wall-clock time (seconds since the epoch); 0 where unknown (Kademlia, older shards)."""

    @property
    def deleted(self) -> bool:
        return self.value is None

    @property
    def stamp(self) -> tuple[int, str]:
        """What orders versions: (version, writer) names one value everywhere."""
        return self.version, self.writer

    def newer_than(self, other: Record | None) -> bool:
        return other is None or self.stamp > other.stamp

    def to_wire(self) -> m.RecordWire:
        return self.key, self.value, self.version, self.writer, self.written


def record_from_wire(data: Any) -> Record:
    """`data` as a Record: a request's `RecordWire` as it came (a list), or an answer's as decoded (a tuple)."""
    if not (isinstance(data, list | tuple) and len(data) in (4, 5) and isinstance(data[0], str)
            and isinstance(data[2], int) and data[2] >= 0 and isinstance(data[3], str)
            and (len(data) == 4 or (isinstance(data[4], int | float) and data[4] >= 0))):
        raise RequestError(f"malformed record {str(data)[:60]!r}")
    return Record(data[0], data[1], data[2], data[3], float(data[4]) if len(data) == 5 else 0.0)


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
    """The records this node holds, and when it last compared them with its peers: in memory (what every
    read uses) and in SQLite (what a restart reads).

    A change is made in memory at once, inside the caller's synchronous section, so concurrent handlers
    always see one consistent shard; its SQLite statement then runs in a worker thread and the caller
    returns once it is committed, so an acknowledged store is on disk and the event loop never waits on
    the disk. One connection, used by one thread at a time (a limiter of one: sqlite3 forbids using a
    connection from two threads at once, and SQLite takes one writer anyway). A cancelled caller still
    waits for its statement: memory has changed already, and the disk must follow. Statements may commit
    in another order than memory changed, so each carries the rule itself: an upsert keeps the newer
    (version, writer), a drop deletes only the version it dropped, `synced_at` only moves forward.

    Opening reads the whole file, so the agent opens a shard in a worker thread. A new shard (no record,
    never compared) is stamped in step at its opening by `wall`, the wall clock of the DHT that will use
    it: nothing it holds can be doubtful. `inline=True` runs the statements in the caller instead: under a
    virtual clock (tests, simulations) a thread would let the clock jump past every deadline while it works.
    """

    def __init__(self, path: Path, inline: bool = False, wall: Callable[[], float] = time.time) -> None:
        self.reopened = path.exists()
        """The file was there: this node ran before (and may have granted claim slots it forgot)."""
        self._db = sqlite3.connect(path, check_same_thread=False)
        self._inline = inline
        self._limiter = trio.CapacityLimiter(1)
        self._db.execute("CREATE TABLE IF NOT EXISTS records (key TEXT PRIMARY KEY, value BLOB, "
                         "version INTEGER, writer TEXT, written REAL DEFAULT 0)")
        if "written" not in {row[1] for row in self._db.execute("PRAGMA table_info(records)")}:
            self._db.execute("ALTER TABLE records ADD COLUMN written REAL DEFAULT 0")  # an older shard
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value REAL)")
        self.records: dict[str, Record] = {}
        for key, value, version, writer, written in self._db.execute(
                "SELECT key, value, version, writer, written FROM records"):
            self.records[key] = Record(key, msgpack.unpackb(value, raw=False), version, writer, written or 0.0)
        row = self._db.execute("SELECT value FROM meta WHERE name = 'synced_at'").fetchone()
        self.synced_at: float | None = row[0] if row else None
        """Wall-clock time of the last complete comparison with every replica peer (`Freshness`)."""
        if self.synced_at is None and not self.records:
            self.synced_at = wall()
            self._execute(_SYNCED, [(self.synced_at,)])

    async def save_synced_at(self, when: float) -> None:
        self.synced_at = when if self.synced_at is None else max(self.synced_at, when)
        await self._write(_SYNCED, [(when,)])

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
            await self._write(_UPSERT, [(r.key, msgpack.packb(r.value, use_bin_type=True), r.version, r.writer,
                                         r.written) for r in newer.values()])
        return len(newer)

    async def drop_many(self, keys: Iterable[str]) -> None:
        dropped = [self.records.pop(key) for key in list(keys) if key in self.records]
        if dropped:
            await self._write(_DELETE, [(r.key, r.version, r.writer) for r in dropped])

    async def _write(self, statement: str, rows: list[tuple[Any, ...]]) -> None:
        """Run `statement` once per row, in one transaction, and return once it is committed."""
        if self._inline:
            self._execute(statement, rows)
            return
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._execute, statement, rows, limiter=self._limiter)

    def _execute(self, statement: str, rows: list[tuple[Any, ...]]) -> None:
        with self._db:
            self._db.executemany(statement, rows)

    def close(self) -> None:
        """Close the connection (when no statement runs: the DHT's callers have returned)."""
        self._db.close()


_UPSERT = ("INSERT INTO records VALUES (?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
           "version = excluded.version, writer = excluded.writer, written = excluded.written "
           "WHERE (excluded.version, excluded.writer) > (records.version, records.writer)")
"""Store a record unless the row holds a newer (version, writer): `Record.newer_than`, in SQL."""
_DELETE = "DELETE FROM records WHERE key = ? AND version = ? AND writer = ?"
"""Drop the version that was dropped from memory, not a newer one written since."""
_SYNCED = ("INSERT INTO meta VALUES ('synced_at', ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value "
           "WHERE excluded.value > meta.value")
"""Move `synced_at` forward, never back."""


class RingUnsettled(RequestError):
    """This node has just started and its ring has not caught up with its membership yet: it cannot tell
    a key's replicas. Retry in a moment."""

    kind = "unavailable"

    def __init__(self, key: str, known: int, wanted: int) -> None:
        super().__init__(f"cannot tell the replicas of {key!r} yet: this node's ring holds {known} of the {wanted} "
                         f"successors its live members imply (it is still joining the ring); retry in a moment")


class WriteConflict(RequestError):
    """A conditional write lost: a replica holds a newer version than the writer expected. Read again."""

    kind = "conflict"

    def __init__(self, key: str, held: tuple[int, str]) -> None:
        super().__init__(f"{key!r} changed meanwhile: a replica holds version {held[0]} by {held[1]}")
        self.held = held


@dataclass
class ClaimSlots:
    """The replica's side of `DHT.put_if` (sans-IO: `now` is passed in): at most one claimer holds a key's
    slot at a time, for `lease` seconds, and only while no newer version than it expects is held here."""

    lease: float
    refuse_until: float = 0.0
    slots: dict[str, tuple[str, float]] = field(default_factory=dict)

    def prepare(self, key: str, token: str, expected: tuple[int, str], held: Record | None,
                now: float) -> m.Claim:
        if now < self.refuse_until:
            return m.Claim(False, "restarting")
        if held is not None and held.stamp > expected:
            return m.Claim(False, "newer", held.stamp)
        slot = self.slots.get(key)
        if slot is not None and slot[0] != token and slot[1] > now:
            return m.Claim(False, "claimed")
        self.slots[key] = (token, now + self.lease)
        return m.Claim(True)

    def release(self, key: str, token: str) -> None:
        if self.slots.get(key, ("",))[0] == token:
            del self.slots[key]

    def expire(self, now: float) -> None:
        self.slots = {k: slot for k, slot in self.slots.items() if slot[1] > now}


@dataclass
class Freshness:
    """Whether this node's copies may be trusted, and when a tombstone may be collected (module docstring,
    "Tombstones"). Sans-IO: `now` is wall-clock seconds, passed in.

    States: *current* (a complete comparison with every replica peer within `stale_after`) and *stale*.
    Entering stale makes every record held then doubtful; while stale, a doubtful record written before
    `horizon(now)` is hidden. Leaving stale keeps doubtful only those older than the horizon; they stay
    hidden until a replica peer confirms them (`confirmed`) or they are dropped.
    """

    stale_after: float
    synced_at: float | None = None
    stale: bool = False
    doubtful: set[str] = field(default_factory=set)

    @property
    def grace(self) -> float:
        """How old a tombstone must be before it is collected: G = 2Q + 4·CLOCK_SKEW."""
        return 2 * self.stale_after + 4 * CLOCK_SKEW

    def horizon(self, now: float) -> float:
        """A record written before this may have been deleted by a tombstone that is already collected: a
        tombstone goes G after it was written, and clocks may differ by CLOCK_SKEW at each of the three
        clocks involved (writer, deleter, collector) plus ours."""
        return now - self.grace + 4 * CLOCK_SKEW

    def check(self, now: float, keys: Iterable[str]) -> None:
        if not self.stale and (self.synced_at is None or now - self.synced_at > self.stale_after):
            self.stale = True
            self.doubtful.update(keys)

    def hidden(self, record: Record, now: float) -> bool:
        if record.key not in self.doubtful:
            return False
        return not self.stale or record.written <= self.horizon(now)

    def synced(self, since: float, now: float, records: dict[str, Record]) -> bool:
        """A complete comparison with every replica peer happened, none before `since`; True if this ends a
        stale period."""
        ended = self.stale
        if ended:
            horizon = self.horizon(now)
            self.doubtful = {k for k in self.doubtful if k in records and records[k].written <= horizon}
            self.stale = False
        self.synced_at = since
        return ended

    def confirmed(self, key: str) -> None:
        self.doubtful.discard(key)

    def collectable(self, record: Record, now: float) -> bool:
        return record.deleted and now - record.written > self.grace


def ballot(now: float, node: str) -> str:
    """The writer of a conditional write's record: its commit's wall-clock time, fixed width so that strings
    order as times, then the node. Records order by (version, writer), so two records of one version (one
    committed to a majority, the other left on a minority when its commit's answers were lost) are settled
    by the later commit, which is the one that won: a second writer wins a majority only once the first
    one's slots lapsed (CLAIM_LEASE) or a restarted replica's hold ended (as long), at least
    CLAIM_LEASE - COMMIT_WINDOW after the first one's last store. So ties settle right while the agents'
    clocks are closer than that (2 s; NTP keeps them within milliseconds)."""
    return f"{now:017.6f}|{node}"


class DHT:
    """put/get over the ring with r replicas per key, and `put_if` decided by a majority of them. Listing is
    the agent's (`agents.overlays`): it asks every member for its shard, whichever overlay is bound.

    `repair_interval` is how often the agent calls `maintain` (every agent of a cluster the same): the
    tombstone grace and the staleness bound derive from it. `wall` is the wall clock (records' write
    times, tombstone ages, persisted across restarts); tests pass a virtual one. `members` counts the live
    nodes membership knows, this one included: until the ring has caught up with it, nothing is read or
    written (module docstring); without it, the ring is trusted from the start. `fixed` names the fixed
    replica sets of the keys under the prefixes a service `pin`s.
    """

    def __init__(self, transport: Endpoint, ring: Ring, shard: Shard, r: int = 3, w: int = 2,
                 repair_interval: float = 5.0, wall: Callable[[], float] = time.time,
                 rng: random.Random | None = None, members: Callable[[], int] = lambda: 1,
                 fixed: FixedSets | None = None) -> None:
        self.transport = transport
        self.fixed = fixed
        self.pinned: tuple[str, ...] = ()
        """Key prefixes whose records live on fixed replica sets (`pin`)."""
        self.ring = ring
        self.shard = shard
        self.r = r
        self.w = w
        self.wall = wall
        self.members = members
        self._rng = rng or random.Random()
        self._replica_cache: dict[str, tuple[float, list[str]]] = {}
        self._ring_view: tuple[Peer | None, tuple[Peer, ...]] | None = None
        """This node's predecessor and successors when the cached replica sets were looked up."""
        self._caught_up = False
        """The ring has held as many successors as membership implies at least once (module docstring)."""
        self.stats: dict[str, int] = dict.fromkeys(STATS, 0)
        """What `maintain` cost and moved, cumulated: RPCs it made (`rpcs`, failed ones in `failures`),
        digests sent and answered, records pushed and pulled by anti-entropy, hand-off work, tombstones
        collected and doubtful records confirmed or dropped."""
        self.claims = ClaimSlots(CLAIM_LEASE, trio.current_time() + CLAIM_LEASE if shard.reopened else 0.0)
        self.freshness = Freshness(STALE_PASSES * repair_interval, shard.synced_at)
        self.freshness.check(wall(), shard.records)  # back after longer than Q: doubtful before serving anything
        self._digested: dict[str, float] = {}
        """When each peer last compared a whole arc with us by digest (wall clock): predecessors do."""
        transport.route(m.DHT_STORE, self._on_store)
        transport.route(m.DHT_FETCH, self._on_fetch)
        transport.route(m.DHT_DIGEST, self._on_digest)
        transport.route(m.DHT_SYNC, self._on_sync)
        transport.route(m.DHT_OFFER, self._on_offer)
        transport.route(m.DHT_PREPARE, self._on_prepare)
        transport.route(m.DHT_RELEASE, self._on_release)
        transport.route(m.DHT_CHECK, self._on_check)

    # -- what this node holds and shows ----------------------------------------------------------------

    def _visible(self, record: Record | None) -> Record | None:
        """`record`, or None if it is a doubtful copy hidden until peers confirm it (`Freshness`)."""
        if record is None:
            return None
        now = self.wall()
        self.freshness.check(now, self.shard.records)
        return None if self.freshness.hidden(record, now) else record

    async def _merge(self, records: list[Record]) -> int:
        """Keep what is newer than ours; a copy as new as a doubtful one of ours confirms it (the sender showed
        it, so it was not hidden there). A tombstone past the grace is not stored again (a replica that
        has not collected it yet would otherwise push it back to those that have): it only removes an
        older copy held here."""
        now = self.wall()
        keep, gone = [], []
        for record in records:
            held = self.shard.records.get(record.key)
            if held is not None and record.key in self.freshness.doubtful and record.stamp >= held.stamp:
                self.freshness.confirmed(record.key)
            if not self.freshness.collectable(record, now):
                keep.append(record)
            elif held is not None and record.newer_than(held):
                gone.append(record.key)
        if gone:
            await self.shard.drop_many(gone)
        return await self.shard.merge_many(keep) + len(gone)

    # -- handlers --------------------------------------------------------------------------------------

    async def _on_store(self, caller: Caller, request: m.DhtStore) -> bool:
        """Keep the record if newer; with a `token`, it is the commit of a conditional write: free its slot."""
        record = record_from_wire(request.record)
        await self._merge([record])
        if request.token is not None:
            self.claims.release(record.key, request.token)
        return True

    async def _on_fetch(self, caller: Caller, request: m.DhtFetch) -> m.RecordWire | None:
        record = self._visible(self.shard.records.get(request.key))
        return record.to_wire() if record else None

    async def _on_prepare(self, caller: Caller, request: m.DhtPrepare) -> m.Claim:
        """Grant the key's claim slot to `token` if nothing newer than `expect` is held here (hidden copies
        count: a doubtful record must be settled before its key is written again)."""
        return self.claims.prepare(request.key, request.token, request.expect, self.shard.records.get(request.key),
                                   trio.current_time())

    async def _on_release(self, caller: Caller, request: m.DhtRelease) -> bool:
        if request.token is not None:
            self.claims.release(request.key, request.token)
        return True

    async def _on_check(self, caller: Caller, request: m.DhtCheck) -> list[m.Stamp | None]:
        """For a peer settling doubtful copies: the (version, writer) we hold of each key, hidden or not."""
        return [held.stamp if (held := self.shard.records.get(key)) else None for key, _, _ in request.entries]

    async def _on_digest(self, caller: Caller, request: m.DhtDigest) -> m.DigestDiff:
        """A predecessor compares the arc (lo, hi] we share: answer with our entries in the buckets whose
        hashes differ (whole buckets, at most about MAX_ENTRIES entries; the rest waits, and the answer
        says it is not complete)."""
        theirs = request.buckets
        self.stats["digests_answered"] += 1
        count = len(theirs)
        mine = self._in_arc(request.lo, request.hi)
        differing: dict[int, list[m.Entry]] = {i: [] for i, h in enumerate(digest(mine, count)) if h != theirs[i]}
        for record in mine:
            group = differing.get(bucket_of(record.key, count))
            if group is not None:
                group.append((record.key, record.version, record.writer))
        covered: list[int] = []
        entries: list[m.Entry] = []
        for index, group in differing.items():
            if entries and len(entries) + len(group) > MAX_ENTRIES:
                break
            covered.append(index)
            entries += group
        complete = len(covered) == len(differing)
        if complete:
            self._digested[caller.node] = self.wall()
        return m.DigestDiff(covered, entries, complete)

    async def _on_sync(self, caller: Caller, request: m.DhtSync) -> list[m.RecordWire]:
        """Keep the pushed records that are newer than ours; answer with ours for the pulled keys."""
        await self._merge([record_from_wire(raw) for raw in request.push])
        shown = (self._visible(self.shard.records.get(key)) for key in request.pull)
        return [record.to_wire() for record in shown if record is not None]

    async def _on_offer(self, caller: Caller, request: m.DhtOffer) -> list[str]:
        """Hand-off: the keys of these (key, version, writer) entries that we lack or hold older (a hidden
        copy counts as lacking, so the offerer pushes it and thereby confirms ours)."""
        return [key for key, version, writer in request.entries
                if Record(key, None, version, writer).newer_than(self._visible(self.shard.records.get(key)))]

    def _in_arc(self, lo: int, hi: int) -> list[Record]:
        now = self.wall()
        self.freshness.check(now, self.shard.records)
        return [record for key, record in self.shard.records.items()
                if in_arc(key, lo, hi) and not self.freshness.hidden(record, now)]

    # -- reads and writes ------------------------------------------------------------------------------

    def pin(self, prefix: str) -> None:
        """Keep the records under `prefix` on fixed replica sets (`overlay.quorum`), read and written by a
        majority of them: each key then has one history across a partition, where the ring's live replicas
        would give each side its own."""
        if self.fixed is None:
            raise ValueError("this DHT was built without fixed replica sets")
        self.pinned += (prefix,)

    def _pinned_here(self, key: str) -> bool:
        """Whether `key` is pinned to a fixed set that counts this node: its copy is one of a majority a
        read may need, so it is never handed off (a fixed set may be wider than the ring's r)."""
        pinned = self._pinned(key)
        return pinned is not None and self.ring.me.addr in pinned[0]

    def _pinned(self, key: str) -> tuple[list[str], int] | None:
        """The fixed replicas of `key` and their quorum if its prefix is pinned, else None (the ring's)."""
        if self.fixed is None or not self.pinned or not key.startswith(self.pinned):
            return None
        return self.fixed.of(key)

    async def replicas(self, key: str, deadline: float = math.inf) -> list[str]:
        """The r nodes that should hold `key`. Cached briefly (one operation asks several times, and a stale
        answer only sends a copy to a node that the repair pass then hands off) until this node's ring
        changes. Waits for a ring that has not caught up since the start, and raises RingUnsettled after
        RING_PATIENCE, or at `deadline` if sooner (module docstring)."""
        now = trio.current_time()
        cached = self._cached_replicas(key, now)
        if cached is not None:
            return cached
        give_up = min(deadline, now + RING_PATIENCE)
        while (missing := self._ring_missing()) is not None:
            if trio.current_time() + RING_POLL > give_up:
                raise RingUnsettled(key, *missing)
            await trio.sleep(RING_POLL)
        addrs = [peer.addr for peer in await self.ring.lookup(hash_id(key), self.r)]
        if len(self._replica_cache) > 4096:
            self._replica_cache = {k: v for k, v in self._replica_cache.items() if v[0] > now}
        self._replica_cache[key] = (now + REPLICA_CACHE_SECONDS, addrs)
        return addrs

    def _ring_missing(self) -> tuple[int, int] | None:
        """None once the ring has caught up with membership: its successor list holds min(r, live members - 1)
        other nodes (a ring of n <= r nodes names n - 1, leaving out the node that answers), else how many it
        holds and wants. A lone member proves nothing, so it is asked again once membership knows others."""
        if self._caught_up:
            return None
        wanted = min(self.r, self.members() - 1)
        known = sum(1 for peer in self.ring.state.successors if peer.id != self.ring.me.id)
        if known < wanted:
            return known, wanted
        self._caught_up = wanted > 0
        return None

    def _cached_replicas(self, key: str, now: float) -> list[str] | None:
        """The cached replica set of `key`, if still valid; all are forgotten once our neighbours change."""
        view = (self.ring.state.predecessor, tuple(self.ring.state.successors))
        if view != self._ring_view:
            self._replica_cache.clear()
            self._ring_view = view
        cached = self._replica_cache.get(key)
        return cached[1] if cached is not None and cached[0] > now else None

    async def _call_replicas(self, key: str, method: Method[R, A], request: R, fixed: Sequence[str] | None = None,
                             timeout: float = CALL_TIMEOUT) -> dict[str, A | RpcError]:
        addrs = list(fixed) if fixed is not None else await self.replicas(key)
        answers = await self.transport.ask_many(addrs, method, request, timeout)
        if any(isinstance(a, Exception) for a in answers.values()):
            self._replica_cache.pop(key, None)  # someone did not answer: look the replicas up afresh next time
        return answers

    async def get_record(self, key: str) -> Record | None:
        """The newest copy among the replicas, tombstones included; stale replicas are repaired. A pinned key's
        are its fixed replicas, a majority of which must answer."""
        if (pinned := self._pinned(key)) is not None:
            return await self.read_from(key, *pinned)
        return await self.read_from(key, await self.replicas(key))

    async def read_from(self, key: str, fixed: Sequence[str], quorum: int = 1,
                        timeout: float = CALL_TIMEOUT) -> Record | None:
        """`get_record` from the `fixed` replicas (`overlay.quorum`), each given `timeout` seconds. Fewer than
        `quorum` answers (a majority of the fixed set) is a RequestError: such a read meets every `put_if` made
        to the same set with the same quorum, so it never returns a stale record."""
        answers = await self._call_replicas(key, m.DHT_FETCH, m.DhtFetch(key), fixed, timeout)
        copies = {addr: record_from_wire(v) if v is not None else None
                  for addr, v in answers.items() if not isinstance(v, RpcError)}
        if len(copies) < max(quorum, 1):
            raise RequestError(f"{len(copies)} of {len(answers)} replicas of {key!r} answered, {quorum} needed"
                               if answers else f"no replica of {key!r} answered")
        newest = None
        for record in copies.values():
            if record is not None and record.newer_than(newest):
                newest = record
        if newest is not None:
            stale = [a for a, rec in copies.items() if rec is None or newest.newer_than(rec)]
            await self.transport.ask_many(stale, m.DHT_STORE, m.DhtStore(newest.to_wire()), timeout)
        return newest

    async def get(self, key: str) -> Record | None:
        """The live record for `key`, or None if it is absent or deleted."""
        record = await self.get_record(key)
        return None if record is None or record.deleted else record

    async def put(self, key: str, value: Any, after: int | None = None) -> Record:
        """Write a new version of `key`: version `after + 1` when the caller knows the version it
        follows (0 for a key never written), else one more than the replicas hold. Unconditional: a
        concurrent write of the same version by another node is decided by the writer's name. A pinned
        key's write needs a majority of its fixed replicas."""
        pinned = self._pinned(key)
        fixed = pinned[0] if pinned is not None else None
        if after is None:
            copies = await self._call_replicas(key, m.DHT_FETCH, m.DhtFetch(key), fixed)
            after = max((v[2] for v in copies.values() if isinstance(v, tuple)), default=0)
        record = Record(key, value, after + 1, self.ring.me.name, self.wall())
        answers = await self._call_replicas(key, m.DHT_STORE, m.DhtStore(record.to_wire()), fixed)
        acks = sum(1 for v in answers.values() if v is True)
        if acks < (pinned[1] if pinned is not None else min(self.w, len(answers))):
            raise RequestError(f"write of {key!r} reached {acks} of {len(answers)} replicas")
        return record

    async def delete(self, key: str, after: int | None = None) -> Record:
        return await self.put(key, None, after)

    async def put_if(self, key: str, value: Any, expect: Record | None, fixed: Sequence[str] | None = None,
                     quorum: int | None = None, timeout: float = CALL_TIMEOUT) -> Record:
        """Write the version that follows `expect` (the newest record the caller read, None if it found
        none) only if no replica of a majority holds anything newer: compare-and-set, decided by a majority
        of the key's replicas (module docstring, "Conditional writes"), or `quorum` grants of the `fixed`
        ones asked (`overlay.quorum`: the same set on both sides of a partition, less those known dead, which
        could not grant anyway; `quorum` stays a majority of the whole set), each call given `timeout`
        seconds (a lease's writes cannot wait 3 s on a replica that died). Raises WriteConflict if a newer
        version exists (read again and decide again),
        RequestError if the replicas cannot be reached or other claims kept the key busy for CLAIM_PATIENCE
        seconds."""
        if fixed is None and (pinned := self._pinned(key)) is not None:
            fixed, quorum = pinned[0], quorum or pinned[1]
        expected = expect.stamp if expect is not None else (0, "")
        record = Record(key, value, expected[0] + 1, self.ring.me.name, self.wall())
        token = f"{self.ring.me.name}/{self._rng.getrandbits(64):016x}"
        give_up = trio.current_time() + CLAIM_PATIENCE
        backoff = CLAIM_BACKOFF
        while True:
            addrs = list(fixed) if fixed is not None else await self.replicas(key, deadline=give_up)
            needed = quorum or len(addrs) // 2 + 1
            sent = trio.current_time()
            # every answer is awaited, as `put` does: cancelling the slowest call would break its pooled TLS
            # connection (a send cancelled half-way leaves a TLS stream unusable, and the transport keeps it)
            answers = await self.transport.ask_many(addrs, m.DHT_PREPARE, m.DhtPrepare(key, token, expected),
                                                    timeout)
            claims = [v for v in answers.values() if isinstance(v, m.Claim)]
            granted = sum(1 for v in claims if v.granted)
            if granted >= needed and trio.current_time() - sent < COMMIT_WINDOW:
                return await self._commit(addrs, record, token, timeout)
            await self.transport.ask_many(addrs, m.DHT_RELEASE, m.DhtRelease(key, token), timeout)
            newer = [v.held for v in claims if v.why == "newer" and v.held is not None]
            if newer:
                raise WriteConflict(key, max(newer))
            if any(isinstance(v, Exception) for v in answers.values()):
                self._replica_cache.pop(key, None)
            if trio.current_time() >= give_up:
                why = sorted({(v.why or "?") if isinstance(v, m.Claim) else str(v) for v in answers.values()})
                raise RequestError(f"could not write {key!r}: {granted} of {len(addrs)} replicas granted it "
                                   f"for {CLAIM_PATIENCE:.0f} s ({'; '.join(why)})")
            await trio.sleep(self._rng.uniform(0, backoff))
            backoff = min(2 * backoff, 1.0)

    async def update(self, key: str, value: Any, expect: Record | None) -> Record:
        """A write after `expect` (`overlay.interface.Overlay`): here, always the compare-and-set `put_if`."""
        return await self.put_if(key, value, expect)

    async def _commit(self, addrs: list[str], record: Record, token: str, timeout: float = CALL_TIMEOUT) -> Record:
        """Store the record on the replicas that granted the claim, its writer the commit's ballot: the commit
        time, then this node (`ballot`; module docstring, "Conditional writes")."""
        now = self.wall()
        record = replace(record, writer=ballot(now, self.ring.me.name), written=now)
        answers = await self.transport.ask_many(addrs, m.DHT_STORE, m.DhtStore(record.to_wire(), token), timeout)
        acks = sum(1 for v in answers.values() if v is True)
        if acks < min(self.w, len(addrs)):
            raise RequestError(f"write of {record.key!r} reached {acks} of {len(addrs)} replicas")
        return record

    # -- anti-entropy and hand-off (see the module docstring) ----------------------------------------

    async def maintain(self) -> None:
        """One pass: compare with each successor we share records with, then hand off the records that
        are no longer ours. Successors are compared one after the other, so a record we lack and both
        hold is pulled once (the second digest already has it). A failure only makes the pass partial;
        the next one retries."""
        self.stats["passes"] += 1
        started = self.wall()
        self.freshness.check(started, self.shard.records)
        preds = await self._predecessors()
        successors = self._sharing_successors()
        complete = True
        for i, peer in enumerate(successors, start=1):
            lo = self._arc_start(preds, self.r - i)
            complete = lo is not None and await self._sync_with(peer, lo) and complete
        lo = self._arc_start(preds, self.r)
        if lo is not None:
            await self._hand_off(lo)
        elif successors:
            complete = False  # our arc is not known, so neither are the peers that should compare it with us
        await self._after_pass(started, preds, complete)
        if self.freshness.doubtful and not self.freshness.stale:
            await self._settle_doubts()
        await self._collect()
        self.claims.expire(trio.current_time())

    async def _after_pass(self, started: float, preds: list[Peer], complete: bool) -> None:
        """Record a complete comparison with every replica peer: ours with s1..s(r-1) in this pass, and
        theirs with us from p1..p(r-1), each within the staleness bound (`Freshness`)."""
        if not complete:
            return
        since = started
        for peer in (p for p in preds[: self.r - 1] if p.id != self.ring.me.id):
            when = self._digested.get(peer.name)
            if when is None or started - when > self.freshness.stale_after:
                return
            since = min(since, when)
        if self.freshness.synced(since, self.wall(), self.shard.records):
            log.info("in step with every replica peer again; %d doubtful records to settle",
                     len(self.freshness.doubtful))
        await self.shard.save_synced_at(since)

    async def _collect(self) -> None:
        """Drop the tombstones older than the grace period (module docstring, "Tombstones")."""
        now = self.wall()
        gone = [key for key, record in self.shard.records.items() if self.freshness.collectable(record, now)]
        if gone:
            await self.shard.drop_many(gone)
            self.stats["tombstones_collected"] += len(gone)

    async def _settle_doubts(self) -> None:
        """Ask the replicas of each doubtful record whether they hold exactly that version: keep it if one
        does (confirmed), drop it if every other replica answered and none does, else ask again next pass.
        One lookup serves every key up to the owner it finds, as in hand-off."""
        me = self.ring.me
        doubtful = sorted((self.shard.records[k] for k in self.freshness.doubtful if k in self.shard.records),
                          key=lambda r: (key_position(r.key) - me.id) % RING)
        self.freshness.doubtful = {r.key for r in doubtful}
        while doubtful:
            start = key_position(doubtful[0].key)
            try:
                owners = await self.ring.lookup(start, self.r)
            except (RpcError, RequestError) as err:
                self.stats["failures"] += 1
                log.info("lookup to settle doubtful records failed: %s", err)
                return
            span = (owners[0].id - start) % RING if owners else 0
            group = [r for r in doubtful if (key_position(r.key) - start) % RING <= span]
            doubtful = [r for r in doubtful if (key_position(r.key) - start) % RING > span]
            others = [p.addr for p in owners if p.id != me.id]
            for begin in range(0, len(group), SYNC_BATCH):
                await self._settle_batch(others, group[begin:begin + SYNC_BATCH])

    async def _settle_batch(self, others: list[str], batch: list[Record]) -> None:
        if not others:  # nobody else holds these keys: nobody can have collected their deletion
            for record in batch:
                self.freshness.confirmed(record.key)
            return
        entries = [(r.key, r.version, r.writer) for r in batch]
        self.stats["rpcs"] += len(others)
        answers = await self.transport.ask_many(others, m.DHT_CHECK, m.DhtCheck(entries), CALL_TIMEOUT)
        replies = [a for a in answers.values() if isinstance(a, list) and len(a) == len(batch)]
        self.stats["failures"] += len(others) - len(replies)
        drop = []
        for i, record in enumerate(batch):
            if any(reply[i] == record.stamp for reply in replies):
                self.freshness.confirmed(record.key)
                self.stats["doubts_confirmed"] += 1
            elif len(replies) == len(others) and self.shard.records.get(record.key) is record:
                drop.append(record.key)
        if drop:
            log.info("dropping %d records no replica confirms (deleted while this node was away)", len(drop))
            await self.shard.drop_many(drop)
            for key in drop:
                self.freshness.confirmed(key)
            self.stats["doubts_dropped"] += len(drop)

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
            view = await self._ask(peer.addr, m.CHORD_STATE, m.NoArgs())
            return peer_from_wire(view.predecessor) if view.predecessor is not None else None
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

    async def _sync_with(self, peer: Peer, lo: int) -> bool:
        """Compare the arc (lo, me] with `peer` by digest; push what is newer here, pull what is newer there.
        True if the whole arc was compared (no failure, no differing bucket left for the next pass)."""
        hi = self.ring.me.id
        mine = {record.key: record for record in self._in_arc(lo, hi)}
        buckets = bucket_count(len(mine))
        try:
            self.stats["digests_sent"] += 1
            diff = await self._ask(peer.addr, m.DHT_DIGEST, m.DhtDigest(lo, hi, digest(mine.values(), buckets)))
            if not all(0 <= i < buckets for i in diff.buckets):
                raise RequestError(f"dht.digest answered buckets out of 0..{buckets - 1}")
            covered = set(diff.buckets)
            theirs = {key: (version, writer) for key, version, writer in diff.entries}
            self.stats["buckets_differing"] += len(covered)
            push = [r for key, r in mine.items() if bucket_of(key, buckets) in covered
                    and (key not in theirs or r.stamp > theirs[key])]
            pull = [key for key, stamp in theirs.items() if key not in mine or stamp > mine[key].stamp]
            await self._exchange(peer.addr, push, pull)
            return diff.complete
        except (RpcError, RequestError) as err:
            self.stats["failures"] += 1
            log.info("anti-entropy with %s failed: %s", peer.name, err)
            return False

    async def _exchange(self, addr: str, push: list[Record], pull: list[str]) -> None:
        """Send `push` and fetch `pull` from `addr`, SYNC_BATCH of each per call."""
        for start in range(0, max(len(push), len(pull)), SYNC_BATCH):
            batch, keys = push[start:start + SYNC_BATCH], pull[start:start + SYNC_BATCH]
            answer = await self._ask(addr, m.DHT_SYNC, m.DhtSync([r.to_wire() for r in batch], keys))
            self.stats["records_pushed"] += len(batch)
            wanted = set(keys)
            pulled = [record for record in map(record_from_wire, answer) if record.key in wanted]
            self.stats["records_pulled"] += len(pulled)
            await self._merge(pulled)

    async def _hand_off(self, lo: int) -> None:
        """Give the records outside (lo, me] to their replicas; drop each once one of them holds it. A pinned
        record this node is a fixed replica of stays (`_pinned_here`).

        Ownership is confirmed by a lookup before anything is dropped (our view of the predecessors
        may lag). One lookup serves every key up to the owner it finds, as they share its successors.
        """
        me = self.ring.me
        now = self.wall()
        foreign = sorted((r for key, r in self.shard.records.items()
                          if not in_arc(key, lo, me.id) and not self.freshness.hidden(r, now)
                          and not self._pinned_here(key)),
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
            entries = [(r.key, r.version, r.writer) for r in batch.values()]
            self.stats["handoff_offered"] += len(batch)
            self.stats["rpcs"] += len(addrs)
            answers = await self.transport.ask_many(addrs, m.DHT_OFFER, m.DhtOffer(entries), CALL_TIMEOUT)
            held: set[str] = set()
            for addr, answer in answers.items():
                if isinstance(answer, RpcError):
                    self.stats["failures"] += 1
                    continue
                wanted = [key for key in answer if key in batch]
                held |= batch.keys() - set(wanted)
                try:
                    if wanted:
                        await self._ask(addr, m.DHT_SYNC, m.DhtSync([batch[k].to_wire() for k in wanted]))
                        self.stats["handoff_pushed"] += len(wanted)
                        held |= set(wanted)
                except (RpcError, RequestError):
                    self.stats["failures"] += 1
            # a record replaced by a newer write meanwhile was not handed off: keep it for the next pass
            gone = [key for key in held if self.shard.records.get(key) is batch[key]]
            await self.shard.drop_many(gone)
            self.stats["handoff_dropped"] += len(gone)

    async def _ask(self, addr: str, method: Method[R, A], request: R) -> A:
        self.stats["rpcs"] += 1
        return await self.transport.ask(addr, method, request, timeout=CALL_TIMEOUT)

