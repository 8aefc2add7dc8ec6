"""host.sqlite, off the event loop: the domains of this node, their snapshots, and the standby copies it keeps.

Every statement runs in a worker thread (`trio.to_thread`), one at a time: a `CapacityLimiter` of one
over a single connection opened with `check_same_thread=False`. Why one connection and not one per
thread: sqlite3 forbids using a connection from two threads at once, which the limiter rules out, and
trio's worker threads come and go, so per-thread connections would be opened and leaked at random; one
writer at a time is also all SQLite allows. The limiter is the node-wide critical section of the store:
a transaction (`transaction`) runs whole in one thread, never interleaved with another statement.
A cancelled caller waits for its statement to finish (nothing is left half-done).

The schema is here, in one place, for the host service and its mixins (`agents.host.moves`,
`agents.host.standby`). This module must never call libvirt or the network.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS domains (name TEXT PRIMARY KEY, xml TEXT, vcpus INTEGER, memory_mb INTEGER, "
    "disk_gb INTEGER, desired TEXT)",
    "CREATE TABLE IF NOT EXISTS snapshots (name TEXT, tag TEXT, xml TEXT, state TEXT, taken REAL, "
    "libvirt TEXT DEFAULT '', PRIMARY KEY (name, tag))",
    "CREATE TABLE IF NOT EXISTS standbys (name TEXT PRIMARY KEY, xml TEXT, vcpus INTEGER, memory_mb INTEGER, "
    "disk_gb INTEGER, snapshots TEXT, taken REAL)",
)

Params = Sequence[Any] | list[Sequence[Any]]
"""A statement's parameters, or a list of them (the statement then runs once per item)."""


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False)
    for statement in SCHEMA:
        db.execute(statement)
    if "libvirt" not in {row[1] for row in db.execute("PRAGMA table_info(snapshots)")}:
        db.execute("ALTER TABLE snapshots ADD COLUMN libvirt TEXT DEFAULT ''")  # an older store
    db.commit()
    return db


class Store:
    """The node's SQLite store; open it with `await Store.open(path)`."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._limiter = trio.CapacityLimiter(1)

    @classmethod
    async def open(cls, path: Path) -> Store:
        return cls(await trio.to_thread.run_sync(_connect, path))

    async def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """The rows a query returns."""
        return await self._run(lambda db: db.execute(sql, params).fetchall())

    async def one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        """The first row a query returns, None if none."""
        return await self._run(lambda db: db.execute(sql, params).fetchone())

    async def write(self, sql: str, params: Params = ()) -> int:
        """One statement (or one per item of a list of parameters) in its own transaction; rows changed."""
        return (await self.transaction((sql, params)))[0]

    async def transaction(self, *statements: tuple[str, Params]) -> list[int]:
        """Statements in one transaction (all or nothing); the rows each changed."""
        def run(db: sqlite3.Connection) -> list[int]:
            with db:
                return [_execute(db, sql, params).rowcount for sql, params in statements]
        return await self._run(run)

    async def _run(self, work: Any) -> Any:
        return await trio.to_thread.run_sync(work, self._db, limiter=self._limiter)

    def close(self) -> None:
        """Close the connection (when no statement runs: the service has stopped)."""
        self._db.close()


def _execute(db: sqlite3.Connection, sql: str, params: Params) -> sqlite3.Cursor:
    if isinstance(params, list):
        return db.executemany(sql, params)
    return db.execute(sql, params)
