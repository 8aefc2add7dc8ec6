"""Carrying a VM's files between nodes over the agents' own RPC (save → ship → restore).

Where live migration cannot run (a stopped VM, a VM with internal snapshots that an NBD disk copy
would drop, a node without its own libvirtd), relocation stops the VM into a memory image and the
target pulls that image and the qcow2 disk from the source in chunks (`host.fetch`), over the same
mutually authenticated TLS connections as everything else. Chunks stay well under the frame limit
(`overlay.wire.frames.MAX_FRAME`), and the file is renamed into place only once complete, so a half
transfer never looks like a disk.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import trio

from agents.messages import HOST_FETCH, Fetch
from overlay.wire.rpc import Endpoint

CHUNK = 2 * 1024 * 1024
FETCH_TIMEOUT = 30.0


def copy_file(source: Path, dest: Path) -> None:
    """A whole copy of `source` at `dest`, renamed into place once complete."""
    partial = dest.with_name(dest.name + ".part")
    try:
        shutil.copyfile(source, partial)
        partial.replace(dest)
    finally:
        partial.unlink(missing_ok=True)


def read_chunk(path: Path, offset: int, size: int) -> bytes:
    with path.open("rb") as file:
        file.seek(offset)
        return file.read(size)


async def fetch_file(transport: Endpoint, addr: str, name: str, part: str, dest: Path) -> int:
    """Copy `part` ("disk" or "image") of VM `name` from the host at `addr` into `dest`; returns bytes."""
    partial = dest.with_name(dest.name + ".part")
    offset = 0
    try:
        with partial.open("wb") as out:
            while True:
                chunk = await transport.ask(addr, HOST_FETCH, Fetch(name, part, offset), timeout=FETCH_TIMEOUT)
                await trio.to_thread.run_sync(out.write, chunk)
                offset += len(chunk)
                if len(chunk) < CHUNK:
                    break
            out.flush()
            os.fsync(out.fileno())
        partial.replace(dest)
    finally:
        partial.unlink(missing_ok=True)
    return offset
