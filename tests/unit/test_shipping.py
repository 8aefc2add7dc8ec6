"""Shipping a VM's files in chunks over the agents' RPC: complete, in order, and never half in place."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agents.host.shipping import CHUNK, fetch_file, read_chunk
from overlay.wire.rpc import Endpoint, RemoteError


class FakeHost(Endpoint):
    """Answers `host.fetch` from a file, as a source host does; can fail after some chunks."""

    def __init__(self, path: Path, fail_after: int | None = None) -> None:
        super().__init__("fake")
        self.path, self.fail_after, self.calls = path, fail_after, 0

    async def call(self, addr: str, method: str, args: dict[str, Any] | None = None,
                   timeout: float | None = None) -> Any:
        assert method == "host.fetch" and args is not None and args["part"] == "disk"
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise OSError("the source went away")
        return read_chunk(self.path, args["offset"], CHUNK)


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, 2 * CHUNK + 17])
async def test_a_file_arrives_whole_whatever_its_size(tmp_path: Path, size: int) -> None:
    source = tmp_path / "disk.qcow2"
    source.write_bytes(bytes(i % 251 for i in range(size)))
    dest = tmp_path / "copy.qcow2"
    host = FakeHost(source)
    assert await fetch_file(host, "a:1", "ve:vm", "disk", dest) == size
    assert dest.read_bytes() == source.read_bytes()
    assert host.calls == size // CHUNK + 1  # the last chunk is short (maybe empty): that ends it


async def test_a_broken_transfer_leaves_nothing_in_place(tmp_path: Path) -> None:
    source = tmp_path / "disk.qcow2"
    source.write_bytes(b"x" * (3 * CHUNK))
    dest = tmp_path / "copy.qcow2"
    with pytest.raises(OSError):
        await fetch_file(FakeHost(source, fail_after=1), "a:1", "ve:vm", "disk", dest)
    assert not dest.exists() and not list(tmp_path.glob("*.part"))


async def test_a_chunk_that_is_not_bytes_is_refused(tmp_path: Path) -> None:
    class Garbled(FakeHost):
        async def call(self, addr: str, method: str, args: dict[str, Any] | None = None,
                       timeout: float | None = None) -> Any:
            return "not bytes"

    dest = tmp_path / "copy.qcow2"
    with pytest.raises(RemoteError, match="host.fetch answer: expected bytes, got str") as caught:
        await fetch_file(Garbled(tmp_path / "disk.qcow2"), "a:1", "ve:vm", "disk", dest)
    assert caught.value.kind == "bad_answer" and not dest.exists()
