"""Shipped snapshots, the host's part (`host.snapshot_image`): VM's disk as it is now, made an image of this
node's image store (`images.store`), for the VE layer to spread to other nodes (`discovery.ve.shipping`).

Why an image: a catalogued image is what every node can pull (only the chunks it lacks), keep on several
sites, and boot; so a snapshot that left its host is restored anywhere by booting it, as any image is. Why
through the chunk store: the content is cut and named by its bytes (`images.chunks`), so the second snapshot
of a disk stores, and its holders fetch, only the chunks that changed since the first.

A real guest's disk is a qcow2 overlay on its image's base. The VM is paused for the length of a local copy
of the overlay (`HostBase._copy_disk`, as for a standby copy: QEMU flushes its disks when it stops, so the
copy is the disk a power cut would leave), resumed, and the copy's guest-visible content (overlay over base)
is imported. The VM's lock is held for the copy, never for the import, which reads the whole disk. A VM
without a disk (the test driver) is its domain XML: its image's content is the XML, padded with zeros to
whole sectors.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import trio

from agents.host.base import HostBase
from agents.hypervisor.actor import HypervisorError
from agents.messages import HOST_SNAPSHOT_IMAGE, SnapshotImage, SnapshotImaged
from overlay.wire.rpc import Caller, Endpoint, NotFound, RequestError

SECTOR = 512


class SnapshotImages(HostBase):
    """`host.snapshot_image`."""

    def _serve_snapshot_images(self, transport: Endpoint) -> None:
        transport.route(HOST_SNAPSHOT_IMAGE, self._served(self._on_snapshot_image))

    async def _on_snapshot_image(self, caller: Caller, request: SnapshotImage) -> SnapshotImaged:
        """Make image `image` of VM `name`'s disk now, held by this node alone (the caller spreads it)."""
        name = request.name
        if self.images is None:
            raise RequestError("this agent has no image store")
        async with self.vm_locks.hold(name):
            if name not in self.ledger.allocated:
                raise NotFound(f"no VM {name} on this node")
            try:
                copy, paused = await self._disk_now(name)
            except (HypervisorError, OSError) as err:
                raise RequestError(f"snapshot image of {name}: {err}") from None
        try:
            done = await self.images.publish(copy, request.image, request.owner, 1)
        finally:
            copy.unlink(missing_ok=True)
        return SnapshotImaged(request.image, done.digest, done.size, done.chunks, done.new_chunks, done.new_bytes,
                              done.manifest_bytes, round(paused, 3))

    async def _disk_now(self, name: str) -> tuple[Path, float]:
        """A file holding VM `name`'s disk as it is now (a consistent copy of its overlay, or its XML), and how
        long the VM was paused for it."""
        disk = self.domains.disk(name)
        if disk is None:
            xml = (await self.hypervisor.xml(name)).encode()
            path = self.db_path.parent / f".{name.replace(':', '--')}.snapshot-{secrets.token_hex(4)}.raw"
            await trio.to_thread.run_sync(path.write_bytes, xml + bytes(-len(xml) % SECTOR))
            return path, 0.0
        # beside the disk: the copy names its base by a path relative to its own directory
        copy = disk.with_name(f".{disk.stem}.snapshot-{secrets.token_hex(4)}.qcow2")
        try:
            return copy, await self._copy_disk(name, disk, (await self.hypervisor.info(name)).state, copy)
        except BaseException:
            copy.unlink(missing_ok=True)
            raise
