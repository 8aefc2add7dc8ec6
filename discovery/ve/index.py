"""The VE directory's index: which VEs exist, kept in the DHT itself, so that `ve list` reads a few
records instead of asking every node.

Shape. BUCKETS records, `ve-index/00` .. `ve-index/0f`; a VE's entry (name, owner, uid) sits in the bucket
of hash(name), the entries of a bucket sorted by name. A page walks the buckets in order from a cursor,
"<bucket>:<last name shown>" (names cannot contain ':'), and reads each VE's record: a page of L VEs
costs L record reads plus one per bucket it spans (at most BUCKETS), in a few rounds of parallel reads,
whatever the number of nodes. A VE that exists for
the whole listing is shown exactly once, as (bucket, name) orders every VE and a cursor is a position
in that order, not an offset.

Updates. Creating a VE adds its entry (beside its later steps, `discovery.ve.creating`) and destroying it
removes it (once the destroy has answered: `Unindexing`), each by compare-and-set on the
bucket's version (`put_if`), read again and retried on a conflict, so two agents updating one bucket at
once never lose each other's entry. Entries carry the owner (a page for a user is filled with the
user's VEs, not filtered down afterwards) and the uid of the VE's incarnation, so an entry can only be
removed by the incarnation that owns it: a VE destroyed and created again under the same name is never
unlisted by the first one's late removal.

The record is the truth, the index a guide: an entry is shown only if its record is live and of the
same incarnation; an entry whose record is a tombstone (its removal failed) or another incarnation (whose
create adds its own entry, replacing this one) is removed by the lister;
a record without an entry (its creator died between the two writes) is indexed again by the agent's
start-up recovery (`ensure`). An absent record (the tombstone collected, or the replicas' copies
still doubtful after a restart) hides the entry but does not remove it.

Never: hold what changes during a VE's life (state, placement), which would make every operation write
the index; never write a bucket unconditionally. BUCKETS is part of the format: changing it needs a
re-index. A bucket holds about 80 bytes per VE, so 16 buckets carry some 800,000 VEs before a record
reaches the 4 MiB frame (Kademlia's 512 KiB value limit: about 100,000).
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from agents.runtime import Actor
from discovery.ve.records import incarnation
from overlay.dht import Record, WriteConflict
from overlay.wire.rpc import RequestError, RpcError

log = logging.getLogger(__name__)
INDEX_PREFIX = "ve-index/"
BUCKETS = 16
WINDOW = 4
"""Buckets read at once first; then as many as the entries seen so far say the page still needs."""
PARALLEL_READS = 64
"""VE records read at once for a page."""
UPDATE_ATTEMPTS = 12
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


class IndexedRecords(Protocol):
    """What the index needs of the records: reads and the conditional write (a DHT or the agent's binding)."""

    async def get_record(self, key: str) -> Record | None: ...

    async def put_if(self, key: str, value: Any, expect: Record | None) -> Record: ...


@dataclass(frozen=True, order=True)
class Entry:
    name: str
    owner: str
    uid: str

    def to_wire(self) -> list[str]:
        return [self.name, self.owner, self.uid]


@dataclass(frozen=True)
class Cursor:
    """Where a page ended: the next one starts after `after` in `bucket` ("" = at its start)."""

    bucket: int
    after: str = ""

    def encode(self) -> str:
        return f"{self.bucket:02x}:{self.after}"

    @classmethod
    def parse(cls, text: Any) -> Cursor | None:
        if text is None:
            return None
        bucket, sep, after = text.partition(":") if isinstance(text, str) else ("", "", "")
        try:
            number = int(bucket, 16)
        except ValueError:
            number = -1
        if not sep or not 0 <= number < BUCKETS or len(bucket) != 2 or len(after) > 63:
            raise RequestError(f"cursor must be what a previous page returned as next_cursor, got {text!r}")
        return cls(number, after)


def bucket_of(name: str) -> int:
    """The same on every node and in every process (Python's hash() is salted per process)."""
    return hashlib.blake2b(name.encode(), digest_size=8).digest()[0] % BUCKETS


def bucket_key(bucket: int) -> str:
    return f"{INDEX_PREFIX}{bucket:02x}"


def decode(record: Record | None) -> list[Entry]:
    """A bucket's entries; refuses what this version did not write."""
    if record is None or record.deleted:
        return []
    entries = record.value.get("entries") if isinstance(record.value, dict) else None
    if not (isinstance(entries, list) and all(
            isinstance(e, list) and len(e) == 3 and all(isinstance(f, str) for f in e) for e in entries)):
        raise RequestError(f"index bucket {record.key!r} is malformed")
    return [Entry(*e) for e in entries]


def encode(entries: Iterable[Entry]) -> dict[str, Any]:
    return {"entries": [e.to_wire() for e in sorted(entries)]}


def with_entry(entries: list[Entry], entry: Entry) -> list[Entry] | None:
    """The bucket with `entry` in place of any entry of the same name; None if it is there already."""
    if entry in entries:
        return None
    return [e for e in entries if e.name != entry.name] + [entry]


def without_entry(entries: list[Entry], name: str, uid: str) -> list[Entry] | None:
    """The bucket without the entry of incarnation `uid` of `name`; None if there is no such entry."""
    kept = [e for e in entries if not (e.name == name and e.uid == uid)]
    return None if len(kept) == len(entries) else kept


def take(buckets: dict[int, list[Entry]], start: Cursor, limit: int,
         wanted: Callable[[Entry], bool]) -> tuple[list[Entry], Cursor | None, bool]:
    """Up to `limit` wanted entries from consecutive buckets, starting at `start`, reading only the buckets
    given (consecutive from start.bucket). Returns the entries, where the page ends (None: the end of the
    index) and whether that was decided (False: the given buckets ran out first)."""
    found: list[Entry] = []
    bucket, after = start.bucket, start.after
    while bucket in buckets:
        candidates = [e for e in sorted(buckets[bucket]) if e.name > after and wanted(e)]
        room = limit - len(found)
        if len(candidates) > room:
            found += candidates[:room]
            return found, Cursor(bucket, found[-1].name), True
        found += candidates
        bucket, after = bucket + 1, ""
        if bucket == BUCKETS:
            return found, None, True
        if len(found) == limit:
            return found, Cursor(bucket), True
    return found, Cursor(bucket, after), False


class Index:
    """The index over the VE records (see the module docstring)."""

    def __init__(self, records: IndexedRecords, prefix: str, rng: random.Random | None = None) -> None:
        self.records = records
        self.prefix = prefix
        self._rng = rng or random.Random()

    async def add(self, entry: Entry) -> None:
        await self._update(bucket_of(entry.name), lambda entries: with_entry(entries, entry))

    async def remove(self, name: str, uid: str) -> None:
        await self._update(bucket_of(name), lambda entries: without_entry(entries, name, uid))

    async def ensure(self, entries: Iterable[Entry]) -> int:
        """Add the entries of names the index has no entry for (start-up recovery: a creator died between
        its record and its entry); how many were added. A name with an entry of another incarnation is
        left alone: the create that wrote it replaces it, and the record read here may be the older."""
        by_bucket: dict[int, list[Entry]] = {}
        for entry in entries:
            by_bucket.setdefault(bucket_of(entry.name), []).append(entry)
        added = 0
        for bucket, wanted in sorted(by_bucket.items()):
            held = set(decode(await self.records.get_record(bucket_key(bucket))))
            for entry in wanted:
                if not any(e.name == entry.name for e in held):
                    await self.add(entry)
                    added += 1
        return added

    async def _update(self, bucket: int, change: Callable[[list[Entry]], list[Entry] | None]) -> None:
        """Read the bucket, change it, write it back if nobody wrote it meanwhile; again otherwise."""
        key = bucket_key(bucket)
        for _ in range(UPDATE_ATTEMPTS):
            current = await self.records.get_record(key)
            entries = change(decode(current))
            if entries is None:
                return
            try:
                await self.records.put_if(key, encode(entries), current)
                return
            except WriteConflict:
                await trio.sleep(self._rng.uniform(0, 0.05))
        raise RequestError(f"index bucket {key!r} kept changing for {UPDATE_ATTEMPTS} attempts; try again")

    async def page(self, limit: int, cursor: Cursor | None,
                   wanted: Callable[[Entry], bool]) -> tuple[list[Entry], Cursor | None]:
        """Up to `limit` (at least 1) wanted entries after `cursor`, and where the next page starts (None: no
        more)."""
        if limit < 1:
            raise ValueError("a page holds at least one entry")
        start = cursor or Cursor(0)
        found: list[Entry] = []
        read, width = 0, WINDOW
        while True:
            window = range(start.bucket, min(BUCKETS, start.bucket + width))
            buckets = await self._read(window)
            more, end, decided = take(buckets, start, limit - len(found), wanted)
            found += more
            if decided or end is None:
                return found, end
            start = end
            read += len(window)
            per_bucket = len(found) / read  # the buckets hold about as many entries as those read so far
            width = max(WINDOW, math.ceil((limit - len(found)) / per_bucket) + 1) if per_bucket else BUCKETS

    async def _read(self, window: range) -> dict[int, list[Entry]]:
        found: dict[int, list[Entry]] = {}

        async def one(bucket: int) -> None:
            found[bucket] = decode(await self.records.get_record(bucket_key(bucket)))

        async with trio.open_nursery() as nursery:
            for bucket in window:
                nursery.start_soon(one, bucket)
        return found

    async def listing(self, limit: int, cursor: Cursor | None,
                      wanted: Callable[[Entry], bool]) -> tuple[list[Record], Cursor | None]:
        """Up to `limit` live VE records after `cursor`, index order, and the next page's cursor. Entries
        whose record is gone or of another incarnation are skipped (and removed if their record is a
        tombstone), and the page filled from further buckets."""
        shown: list[Record] = []
        while True:
            entries, cursor = await self.page(limit - len(shown), cursor, wanted)
            for entry, record in zip(entries, await self._records(entries), strict=True):
                if record is not None and not record.deleted and incarnation(record.value) == entry.uid:
                    shown.append(record)
                elif record is not None:
                    await self._prune(entry, record)
            if cursor is None or len(shown) >= limit:
                return shown, cursor

    async def _records(self, entries: list[Entry]) -> list[Record | None]:
        """The records of `entries`, read at once; one that cannot be read fails the page, with its own error
        (not the nursery's group of them)."""
        found: list[Record | None] = [None] * len(entries)
        failed: list[str] = []
        limiter = trio.CapacityLimiter(PARALLEL_READS)

        async def one(i: int) -> None:
            async with limiter:
                try:
                    found[i] = await self.records.get_record(self.prefix + entries[i].name)
                except (RequestError, RpcError) as err:
                    failed.append(f"VE {entries[i].name}'s record could not be read: {err}")

        async with trio.open_nursery() as nursery:
            for i in range(len(entries)):
                nursery.start_soon(one, i)
        if failed:
            raise RequestError(failed[0])
        return found

    async def _prune(self, entry: Entry, record: Record) -> None:
        """Remove an entry its record disowns: a tombstone (the destroy could not remove it) or another
        incarnation (whose own entry replaces this one). Best effort: the next lister tries again."""
        log.info("index entry of VE %s (%s) outlived its record: removing it", entry.name, entry.uid)
        try:
            await self.remove(entry.name, entry.uid)
        except (RequestError, RpcError) as err:
            log.info("could not remove it yet: %s", err)


class Unindexing(Actor):
    """Removes destroyed VEs' index entries once `ve destroy` has answered: the record's tombstone already
    hides an entry from `ve list`, so nobody waits for the bucket's compare-and-set (a read and a quorum
    write, the slowest part of a destroy). An entry not removed (failed, or dropped from a full mailbox)
    is removed by the next `ve list` that meets it."""

    name = "ve-unindex"

    def __init__(self, index: Index) -> None:
        super().__init__()
        self.index = index

    async def handle(self, entry: Entry) -> None:
        try:
            await self.index.remove(entry.name, entry.uid)
        except (RequestError, RpcError) as err:
            log.warning("could not remove VE %s from the index yet: %s", entry.name, err)
