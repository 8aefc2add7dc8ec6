"""The VE directory: the VE records in the overlay's records (key `ve/<name>`), read and written as
`discovery.ve.records.VERecord`.

The one place where a VE record meets the records of the overlay the cluster is bound to: reads decode
(`records.read`), writes encode, and a stored value this agent cannot read (a newer format, a broken
record) is one `Unreadable` line naming the VE, which a request gets as its error. It keeps no state and
decides nothing: conditional writes, versions and tombstones are the overlay's
(`overlay.interface.Overlay`).

Every write follows the record it read (`Stored`) and is conditional: it lands only if the record is still
that version (`update`: compare-and-set on Chord, decided by a majority of the key's fixed replicas, which the
agent pins for `ve/`), so two agents that read one version cannot both write after it, and the one that
loses gets a conflict to read again after, never a lost update.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

from discovery.ve.index import Index
from discovery.ve.records import RecordError, VERecord, read, write
from overlay.dht import Record
from overlay.wire.rpc import RequestError

log = logging.getLogger(__name__)
PREFIX = "ve/"


class Unreadable(RequestError):
    """A stored value this agent cannot read as a VE record (a newer format, a broken record)."""


class Records(Protocol):
    """What the directory needs of the agent's records (`agents.overlays.Records`: the overlay bound now)."""

    async def get(self, key: str) -> Record | None: ...

    async def get_record(self, key: str) -> Record | None: ...

    async def put(self, key: str, value: Any, after: int | None = None) -> Record: ...

    async def put_if(self, key: str, value: Any, expect: Record | None) -> Record: ...

    async def update(self, key: str, value: Any, expect: Record | None) -> Record: ...

    async def delete(self, key: str, after: int | None = None) -> Record: ...

    async def scan(self, prefix: str) -> list[Record]: ...


@dataclass(frozen=True)
class Stored:
    """A VE record as the directory holds it, and its version there (version and writer; 0 and "" for one
    never written): what a write that follows it expects, so a write never lands on a record it did not read."""

    ve: VERecord
    version: int
    writer: str = ""

    def expect(self, key: str) -> Record | None:
        """The stored record a write after this one expects to find under `key`."""
        return Record(key, None, self.version, self.writer) if self.version else None


class Directory:
    """The VE records, and their index (`discovery.ve.index`: which VEs exist, for a paged `ve list`)."""

    def __init__(self, records: Records) -> None:
        self.records = records
        self.index = Index(records, PREFIX)

    async def get(self, name: str) -> Stored | None:
        """VE `name`'s record; None if there is none, or only its tombstone."""
        record = await self.records.get(PREFIX + name)
        return None if record is None or record.deleted else self.decode(record)

    async def newest(self, name: str) -> tuple[Record | None, Stored | None]:
        """The newest record under VE `name`'s key, tombstones included (what a conditional write follows),
        and the VE it holds if it is live."""
        record = await self.records.get_record(PREFIX + name)
        return record, None if record is None or record.deleted else self.decode(record)

    async def put(self, ve: VERecord, after: Stored) -> Stored:
        """Write `ve` as the version that follows `after`, if the directory still holds that one
        (`overlay.dht.WriteConflict` otherwise: read again, decide again)."""
        key = PREFIX + ve.name
        record = await self.records.update(key, write(ve), after.expect(key))
        return Stored(ve, record.version, record.writer)

    async def put_if(self, ve: VERecord, expect: Record | None) -> Stored:
        """Write `ve` if the newest record under its key is still `expect` (`overlay.dht.WriteConflict`
        otherwise). A claim: the overlay must decide it (Kademlia refuses)."""
        record = await self.records.put_if(PREFIX + ve.name, write(ve), expect)
        return Stored(ve, record.version, record.writer)

    async def delete(self, name: str, after: Stored) -> None:
        """Delete VE `name`'s record (a tombstone), if the directory still holds `after`."""
        key = PREFIX + name
        await self.records.update(key, None, after.expect(key))

    async def scan(self) -> list[Stored]:
        """Every live VE record this agent can read (one it cannot is logged and left to agents that can)."""
        found = []
        for record in await self.records.scan(PREFIX):
            try:
                found.append(self.decode(record))
            except Unreadable as err:
                log.warning("%s", err)
        return found

    def decode(self, record: Record) -> Stored:
        """The VE a live record of the directory holds; Unreadable, one line, if this agent cannot read it."""
        try:
            return Stored(read(record.value), record.version, record.writer)
        except RecordError as err:
            raise Unreadable(str(err)) from None
