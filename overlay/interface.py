"""What a service needs from an overlay, and the Binding that lets it change overlay while it runs.

Several overlays co-exist in an agent (the Chord DHT, Kademlia). A service holds a `Binding`, not an
overlay, so it can be re-bound from one to the other at run time (the DISCOVERY paper's Peer Actor)
without knowing which one answers. `overlay.dht.DHT` and `overlay.kad.KademliaOverlay` both satisfy
`Overlay` structurally; neither inherits from it.

A re-bind must not lose a write: one that lands on the overlay being left after its records were
copied would vanish. So a binding can be *frozen*: new writes wait, and `freeze` returns once the
writes in flight have ended. `rebind` freezes, copies, switches and thaws; an agent that re-binds a
whole cluster freezes every member's binding first (`agents.overlays`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

import trio

from overlay.dht import Record


class Overlay(Protocol):
    """Versioned records: the higher (version, writer) wins; `after` is the version a write follows
    (None: one more than the overlay holds); a delete is a write of None.

    `put_if` writes the version after `expect` (the newest record the caller read, or None) only if the
    overlay holds nothing newer, decided by a majority of the key's replicas (compare-and-set); it raises
    `overlay.dht.WriteConflict` if something newer exists. An overlay that cannot decide it (Kademlia)
    raises RequestError and writes nothing.

    `update` writes the version after `expect` too: compare-and-set where the overlay can decide it (the
    Chord DHT: `put_if`), a versioned write where it cannot (Kademlia: `put(after=expect.version)`, where
    the higher (version, writer) wins). A service that reads a record and writes it back uses it, so it
    stays usable on either overlay and is safe on the one that can be."""

    async def get(self, key: str) -> Record | None: ...

    async def get_record(self, key: str) -> Record | None: ...

    async def put(self, key: str, value: Any, after: int | None = None) -> Record: ...

    async def put_if(self, key: str, value: Any, expect: Record | None) -> Record: ...

    async def update(self, key: str, value: Any, expect: Record | None) -> Record: ...

    async def delete(self, key: str, after: int | None = None) -> Record: ...


class Binding:
    """get/put/delete on the overlay a service is bound to now; `name` says which one."""

    def __init__(self, overlay: Overlay, name: str = "") -> None:
        self.overlay = overlay
        self.name = name
        self._thawed = trio.Event()
        self._thawed.set()
        self._in_flight = 0
        self._idle = trio.Event()
        self._idle.set()

    @property
    def frozen(self) -> bool:
        return not self._thawed.is_set()

    async def get(self, key: str) -> Record | None:
        return await self.overlay.get(key)

    async def get_record(self, key: str) -> Record | None:
        return await self.overlay.get_record(key)

    async def put(self, key: str, value: Any, after: int | None = None) -> Record:
        return await self._write(lambda: self.overlay.put(key, value, after))

    async def put_if(self, key: str, value: Any, expect: Record | None) -> Record:
        return await self._write(lambda: self.overlay.put_if(key, value, expect))

    async def update(self, key: str, value: Any, expect: Record | None) -> Record:
        return await self._write(lambda: self.overlay.update(key, value, expect))

    async def _write(self, write: Callable[[], Awaitable[Record]]) -> Record:
        while self.frozen:  # loop: a thaw followed at once by another freeze must hold us again
            await self._thawed.wait()
        if self._in_flight == 0:
            self._idle = trio.Event()
        self._in_flight += 1
        try:
            return await write()
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def delete(self, key: str, after: int | None = None) -> Record:
        return await self.put(key, None, after)

    async def freeze(self) -> None:
        """Hold new writes, and return once those in flight have ended. Idempotent."""
        if not self.frozen:
            self._thawed = trio.Event()
        while self._in_flight:
            await self._idle.wait()

    def thaw(self) -> None:
        self._thawed.set()

    def switch(self, overlay: Overlay, name: str = "") -> None:
        self.overlay, self.name = overlay, name

    async def rebind(self, overlay: Overlay, keys: Iterable[str], name: str = "") -> None:
        """Copy the newest record of each of `keys` to `overlay`, then switch to it.

        Each copy is written with `after=None`, so it out-ranks whatever the new overlay held for the
        key (a leftover from an earlier binding); a key absent from the old overlay is deleted from the
        new one if it is live there, so a stale record cannot reappear. Writes through this binding
        wait until the switch (reads keep going to the old overlay, which stays authoritative until
        then). If a copy fails, the binding stays on the old overlay and the error propagates.
        """
        await self.freeze()
        try:
            await copy_records(self.overlay, overlay, keys)
            self.switch(overlay, name)
        finally:
            self.thaw()


async def copy_records(source: Overlay, target: Overlay, keys: Iterable[str]) -> int:
    """Make `target` hold the newest live record of each key of `source` (see `Binding.rebind`); how many
    keys were written."""
    written = 0
    for key in keys:
        record = await source.get(key)
        if record is not None:
            await target.put(key, record.value)
        elif await target.get(key) is not None:
            await target.delete(key)
        else:
            continue
        written += 1
    return written
