"""The shipped-snapshot logs in the records (`shipped/<ve>`, `discovery.ve.shipped.ShippedLog`): read, and changed
by compare-and-set, read again and retried on a conflict, so two hosts of one VE's VMs recording at once both
land. The one place that decodes and encodes them.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import trio

from discovery.ve.directory import Records
from discovery.ve.records import VERecord
from discovery.ve.shipped import PREFIX, LogError, ShippedLog, read, write
from overlay.dht import Record, WriteConflict
from overlay.wire.rpc import RequestError

ATTEMPTS = 12


class ShippedLogs:
    def __init__(self, records: Records, rng: random.Random | None = None) -> None:
        self.records = records
        self._rng = rng or random.Random()

    async def get(self, ve: VERecord) -> ShippedLog:
        """The log of `ve`'s incarnation (empty if it has none yet)."""
        return _decoded(await self.records.get(PREFIX + ve.name), ve)

    async def change(self, ve: VERecord, change: Callable[[ShippedLog], ShippedLog]) -> ShippedLog:
        """Apply `change` to the newest log of `ve`'s incarnation; the log written."""
        key = PREFIX + ve.name
        for _ in range(ATTEMPTS):
            current = await self.records.get_record(key)
            log = _decoded(current, ve)
            wanted = change(log)
            if wanted == log:
                return log
            try:
                await self.records.put_if(key, write(wanted), current)
                return wanted
            except WriteConflict:
                await trio.sleep(self._rng.uniform(0, 0.05))
        raise RequestError(f"the shipped-snapshot log of {ve.name!r} kept changing for {ATTEMPTS} attempts")


def _decoded(record: Record | None, ve: VERecord) -> ShippedLog:
    try:
        return read(None if record is None or record.deleted else record.value, ve.uid)
    except LogError as err:
        raise RequestError(f"VE {ve.name!r}: {err}") from None
