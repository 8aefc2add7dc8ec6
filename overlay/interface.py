"""What a service needs from an overlay, and the Binding that lets it change overlay while it runs.

Several overlays co-exist in an agent (the Chord DHT, Kademlia). A service holds a `Binding`, not an
overlay, so it can be re-bound from one to the other at run time (the DISCOVERY paper's Peer Actor)
without knowing which one answers. `overlay.dht.DHT` and `overlay.kad.KademliaOverlay` both satisfy
`Overlay` structurally; neither inherits from it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import trio

from overlay.dht import Record


class Overlay(Protocol):
    """Versioned records: the higher (version, writer) wins; `after` is the version a write follows
    (None: one more than the overlay holds); a delete is a write of None."""

    async def get(self, key: str) -> Record | None: ...

    async def put(self, key: str, value: Any, after: int | None = None) -> Record: ...

    async def delete(self, key: str, after: int | None = None) -> Record: ...


class Binding:
    """get/put/delete on the overlay a service is bound to now."""

    def __init__(self, overlay: Overlay) -> None:
        self.overlay = overlay
        self._writes = trio.Lock()  # held by rebind, so no write through us lands on an overlay being left

    async def get(self, key: str) -> Record | None:
        return await self.overlay.get(key)

    async def put(self, key: str, value: Any, after: int | None = None) -> Record:
        async with self._writes:
            return await self.overlay.put(key, value, after)

    async def delete(self, key: str, after: int | None = None) -> Record:
        async with self._writes:
            return await self.overlay.delete(key, after)

    async def rebind(self, overlay: Overlay, keys: Iterable[str]) -> None:
        """Copy the newest record of each of `keys` to `overlay`, then switch to it.

        Each copy is written with `after=None`, so it out-ranks whatever the new overlay held for the
        key (a leftover from an earlier binding); a key absent from the old overlay is deleted from the
        new one if it is live there, so a stale record cannot reappear. Writes through this binding
        wait until the switch (reads keep going to the old overlay, which stays authoritative until
        then). If a copy fails, the binding stays on the old overlay and the error propagates.
        """
        async with self._writes:
            for key in keys:
                record = await self.overlay.get(key)
                if record is not None:
                    await overlay.put(key, record.value)
                elif await overlay.get(key) is not None:
                    await overlay.delete(key)
            self.overlay = overlay
