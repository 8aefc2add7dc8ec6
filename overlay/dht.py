"""Replicated records on the ring: the VE directory and anything else that must survive node losses.

A record lives on the r nodes that follow hash(key) on the ring (Dynamo/Cassandra style). Records
are versioned; the higher (version, writer) wins everywhere, and a delete is a tombstone so a stale
replica cannot resurrect what was deleted. Reads ask every replica, return the newest and repair the
stale ones; writes need `w` acknowledgements. A periodic pass pushes each local record to its current
replica set and hands off records this node no longer owns, so records follow ring changes
(joins, leaves, crashes).

Each node's shard is persisted in SQLite so a restarted agent still holds what it held.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import trio

from overlay.chord import hash_id
from overlay.ring import Ring
from overlay.rpc import Caller, Endpoint, RequestError, RpcError

log = logging.getLogger(__name__)
CALL_TIMEOUT = 3.0
REPLICA_CACHE_SECONDS = 2.0


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


class Shard:
    """The records this node holds, in memory and in SQLite."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path)
        self._db.execute("CREATE TABLE IF NOT EXISTS records (key TEXT PRIMARY KEY, value BLOB, "
                         "version INTEGER, writer TEXT)")
        self.records: dict[str, Record] = {}
        for key, value, version, writer in self._db.execute("SELECT key, value, version, writer FROM records"):
            self.records[key] = Record(key, msgpack.unpackb(value, raw=False), version, writer)

    def merge(self, record: Record) -> bool:
        """Keep `record` if it is newer than what we hold; True if it was stored."""
        if not record.newer_than(self.records.get(record.key)):
            return False
        with self._db:
            self._db.execute("INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?)",
                             (record.key, msgpack.packb(record.value, use_bin_type=True),
                              record.version, record.writer))
        self.records[record.key] = record
        return True

    def drop(self, key: str) -> None:
        with self._db:
            self._db.execute("DELETE FROM records WHERE key = ?", (key,))
        self.records.pop(key, None)

    def close(self) -> None:
        self._db.close()


class DHT:
    """put/get/scan over the ring with r replicas per key."""

    def __init__(self, transport: Endpoint, ring: Ring, shard: Shard, member_addrs: Any,
                 r: int = 3, w: int = 2) -> None:
        self.transport = transport
        self.ring = ring
        self.shard = shard
        self.member_addrs = member_addrs  # () -> list of addresses of live members, for scans
        self.r = r
        self.w = w
        self._replica_cache: dict[str, tuple[float, list[str]]] = {}
        transport.route("dht.store", self._on_store)
        transport.route("dht.fetch", self._on_fetch)
        transport.route("dht.scan", self._on_scan)

    async def _on_store(self, caller: Caller, args: dict[str, Any]) -> bool:
        self.shard.merge(record_from_wire(args.get("record")))
        return True

    async def _on_fetch(self, caller: Caller, args: dict[str, Any]) -> list[Any] | None:
        record = self.shard.records.get(_key_arg(args))
        return record.to_wire() if record else None

    async def _on_scan(self, caller: Caller, args: dict[str, Any]) -> list[list[Any]]:
        prefix = _key_arg(args, "prefix")
        return [r.to_wire() for k, r in self.shard.records.items() if k.startswith(prefix)]

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

    async def scan(self, prefix: str) -> list[Record]:
        """Every live record whose key starts with `prefix`, gathered from all live members."""
        answers = await self.transport.call_many(self.member_addrs(), "dht.scan", {"prefix": prefix}, CALL_TIMEOUT)
        newest: dict[str, Record] = {}
        for answer in answers.values():
            if isinstance(answer, list):
                for raw in answer:
                    record = record_from_wire(raw)
                    if record.newer_than(newest.get(record.key)):
                        newest[record.key] = record
        return sorted((r for r in newest.values() if not r.deleted), key=lambda r: r.key)

    async def maintain(self) -> None:
        """Push each local record to its current replicas; hand off what is no longer ours."""
        for record in list(self.shard.records.values()):
            try:
                addrs = await self.replicas(record.key)
            except (RpcError, RequestError):
                continue
            others = [a for a in addrs if a != self.ring.me.addr]
            answers = await self.transport.call_many(others, "dht.store", {"record": record.to_wire()}, CALL_TIMEOUT)
            if self.ring.me.addr not in addrs and any(v is True for v in answers.values()):
                self.shard.drop(record.key)


def _key_arg(args: dict[str, Any], name: str = "key") -> str:
    value = args.get(name)
    if not isinstance(value, str) or len(value) > 1024:
        raise RequestError(f"{name} must be a string of at most 1024 characters")
    return value
