"""The image catalogue in the DHT: `image/<NAME:TAG>` -> an `ImageEntry` (its manifest digest, size, chunks,
owner, and which nodes hold it whole, with their site).

Every change is a compare-and-set on the entry (`put_if`), read again and retried on a conflict: two
holders adding themselves at once both end up listed, and two imports of one name cannot both win. A
name is bound to one digest: importing other content under a taken name is refused (remove it, or use
another tag), the same content adds a holder. The entry lists holders; the chunks live in the holders'
stores (`images.store`), never in the DHT.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace
from typing import Protocol

import trio

from images.messages import ImageEntry
from overlay.dht import Record, WriteConflict
from overlay.interface import Overlay
from overlay.wire.codec import CodecError, decode, encode
from overlay.wire.rpc import Conflict, NotFound, RequestError

PREFIX = "image/"
ATTEMPTS = 12


class Records(Overlay, Protocol):
    async def scan(self, prefix: str) -> list[Record]: ...


Change = Callable[[ImageEntry | None], ImageEntry | None]
"""What to make of an entry (None: absent); returning None deletes it (or leaves it absent)."""


class Catalogue:
    def __init__(self, records: Records, rng: random.Random | None = None) -> None:
        self.records = records
        self._rng = rng or random.Random()

    async def get(self, name: str) -> ImageEntry | None:
        return _entry(await self.records.get(PREFIX + name))

    async def find(self, name: str) -> ImageEntry:
        entry = await self.get(name)
        if entry is None:
            raise NotFound(f"no image named {name!r} (see: discovery image list)")
        return entry

    async def list(self) -> list[ImageEntry]:
        entries = [_entry(r) for r in await self.records.scan(PREFIX)]
        return sorted((e for e in entries if e is not None), key=lambda e: e.name)

    async def change(self, name: str, change: Change) -> ImageEntry | None:
        """Apply `change` to the newest entry by compare-and-set, again on a conflict; the entry written."""
        key = PREFIX + name
        for _ in range(ATTEMPTS):
            current = await self.records.get_record(key)
            entry = _entry(current)
            wanted = change(entry)
            if wanted == entry:
                return entry
            try:
                await self.records.put_if(key, None if wanted is None else encode(wanted), current)
                return wanted
            except WriteConflict:
                await trio.sleep(self._rng.uniform(0, 0.05))
        raise RequestError(f"image {name!r} kept changing for {ATTEMPTS} attempts; try again")

    async def add_holder(self, entry: ImageEntry, node: str, site: str) -> ImageEntry:
        """List `node` as a holder of `entry`'s content under its name, creating the entry if the name is
        free; Conflict if the name holds other content."""
        def change(current: ImageEntry | None) -> ImageEntry:
            if current is None:
                return replace(entry, holders={node: site})
            if current.digest != entry.digest:
                raise Conflict(f"image {entry.name!r} already exists with other content (digest "
                               f"{current.digest[:16]}); remove it first or use another tag")
            return replace(current, holders={**current.holders, node: site})

        written = await self.change(entry.name, change)
        assert written is not None
        return written

    async def drop_holder(self, name: str, node: str) -> ImageEntry | None:
        def change(current: ImageEntry | None) -> ImageEntry | None:
            if current is None or node not in current.holders:
                return current
            return replace(current, holders={n: s for n, s in current.holders.items() if n != node})

        return await self.change(name, change)

    async def remove(self, name: str) -> ImageEntry:
        gone = await self.find(name)
        await self.change(name, lambda current: None)
        return gone


def _entry(record: Record | None) -> ImageEntry | None:
    if record is None or record.deleted:
        return None
    try:
        entry: ImageEntry = decode(ImageEntry, record.value, record.key)
    except CodecError as err:
        raise RequestError(f"catalogue entry unreadable: {err}") from None
    return entry
