"""Snapshots of a VE (`ve snapshot`, `ve snapshots`, `ve restore`, `ve snapshot-delete`): consistent across
the VE's VMs, and kept by each VM's host, so they travel with a VM when it is relocated (`Snapshots._on_snapshot`).
Those that leave the host (shipped snapshots, a VM at a time) are `discovery.ve.shipping`'s; `ve snapshots` lists both.
"""

from __future__ import annotations

import time

from discovery.ve.base import domain_name
from discovery.ve.directory import Stored
from discovery.ve.driver import drive
from discovery.ve.messages import Named, RecordView, SnapshotList, Tagged, TakeSnapshot, VESnapshot
from discovery.ve.records import VERecord, view
from discovery.ve.shipping import Shipping
from discovery.ve.snapshotting import Snapshot, SnapshotFinish, delete_snapshot, restore
from overlay.wire.rpc import Caller


class Snapshots(Shipping):
    """`ve.snapshot`, `ve.snapshots`, `ve.restore`, `ve.snapshot_delete`, and the undoing of a snapshot left
    half-taken; the shipped snapshots are `Shipping`'s."""

    async def _on_snapshot(self, caller: Caller, request: TakeSnapshot) -> VESnapshot:
        """A snapshot of every VM of the VE under `tag`, consistent across them: the running VMs are paused,
        each VM's host stores its domain XML and the state to restore (`host.snapshot`), then the paused
        VMs run again. The record lists the snapshot (tag, time, VE state, each VM's node and state).
        The steps, and why a crash never leaves a VM paused nor lists a snapshot a host lacks, are the
        transaction `discovery.ve.snapshotting.Snapshot`; this only drives it (`discovery.ve.driver`).

        The data stays with each VM's host and travels with the VM when it is relocated (`host.export`
        carries it), so a restore finds it where the VM is now; records stay small (they are DHT values,
        and Kademlia carries them in UDP datagrams). The node listed per VM is where it was when the
        snapshot was taken. A `snapshotting` marker written before the pause lets recovery (`_settle`)
        resume the VMs if the coordinator dies while they are paused."""
        tag = request.tag or time.strftime("snap-%Y%m%d-%H%M%S", time.gmtime())
        async with self._locked(caller, request.name) as record:
            snapshot = Snapshot(record.ve, tag, _domains(record.ve), self.node)
            record, entry = await drive(snapshot, record, self.transport, self.directory)
        return VESnapshot(**vars(entry), name=record.ve.name)

    async def _finish_snapshot(self, record: Stored) -> Stored:
        """Run again the VMs an interrupted snapshot paused and drop its marker
        (`discovery.ve.snapshotting.SnapshotFinish`)."""
        finish = SnapshotFinish(record.ve, _domains(record.ve))
        record, _ = await drive(finish, record, self.transport, self.directory)
        return record

    async def _on_snapshots(self, caller: Caller, request: Named) -> SnapshotList:
        """The snapshots the record lists, and the VMs' shipped snapshots with their holders."""
        ve = (await self._record(caller, request.name)).ve
        return SnapshotList(ve.name, list(ve.snapshots), shipped=await self._shipped_list(ve) or None)

    async def _on_restore(self, caller: Caller, request: Tagged) -> RecordView:
        """Bring every VM back to snapshot `tag` (each host re-creates the domain from what it stored, the VM
        relocated since or not) and the VE to the state it had then. Idempotent."""
        async with self._locked(caller, request.name) as record:
            _, ve = await drive(restore(record.ve, request.tag, _domains(record.ve)), record, self.transport,
                                     self.directory)
        return view(ve)

    async def _on_snapshot_delete(self, caller: Caller, request: Tagged) -> SnapshotList:
        """Delete snapshot `tag`: each VM's current host forgets its copy, then the record stops listing it
        (`discovery.ve.snapshotting.delete_snapshot`)."""
        async with self._locked(caller, request.name) as record:
            _, ve = await drive(delete_snapshot(record.ve, request.tag, _domains(record.ve)), record,
                                     self.transport, self.directory)
        return SnapshotList(ve.name, list(ve.snapshots), request.tag)


def _domains(ve: VERecord) -> dict[str, str]:
    return {vm: domain_name(ve.name, vm) for vm in ve.placement}
