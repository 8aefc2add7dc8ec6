"""The pull's trio shell (`images.fetching`) against holders in memory: what verified is written, a liar's
bytes are not, and a write that fails stops the pull with the store's one-line error."""

from __future__ import annotations

import random
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
import zstandard

from images.chunks import chunk_id
from images.fetching import _Run
from images.messages import ChunkBatch, Chunks
from images.store import ChunkStore, StoreError
from overlay.wire.rpc import RequestError

T = TypeVar("T")


class Holders:
    """`ask` as the transport has it, answered from chunks held in memory; a liar flips a byte of each."""

    def __init__(self, chunks: dict[bytes, bytes], liars: set[str]) -> None:
        self.frames = {cid: zstandard.ZstdCompressor().compress(data) for cid, data in chunks.items()}
        self.sizes = {cid: len(data) for cid, data in chunks.items()}
        self.liars = liars
        self.asked: dict[str, int] = {}

    async def ask(self, addr: str, method: Any, request: Chunks, timeout: float) -> ChunkBatch:
        await trio.sleep(0.001)
        self.asked[addr] = self.asked.get(addr, 0) + 1
        out = []
        for cid in request.ids:
            frame = self.frames[cid]
            if addr in self.liars:
                data = bytearray(zstandard.ZstdDecompressor().decompress(frame))
                data[0] ^= 1
                frame = zstandard.ZstdCompressor().compress(bytes(data))
            out.append((cid, frame, self.sizes[cid]))
        return ChunkBatch(out, 0, 0.001)


class Fetcher:
    """What `_Run` uses of `images.fetching.Fetcher`: the store, the transport, a way into the store, and the
    count of bytes moved (the metrics)."""

    def __init__(self, store: ChunkStore, transport: Holders, fail_writes: bool = False) -> None:
        self.store, self.transport, self.fail_writes = store, transport, fail_writes
        self.moved: Counter[str] = Counter()

    async def in_store(self, fn: Any, *args: Any) -> Any:
        if self.fail_writes and getattr(fn, "__name__", "") == "_write":
            raise RequestError("the disk is full")
        try:
            return await trio.to_thread.run_sync(partial(fn, *args))
        except StoreError as err:
            raise RequestError(str(err)) from None


def make_chunks(count: int) -> dict[bytes, bytes]:
    rng = random.Random(5)
    return {chunk_id(data): data for data in (rng.randbytes(rng.randrange(2000, 60000)) for _ in range(count))}


def test_what_verified_is_written_and_a_liars_bytes_are_not(tmp_path: Path) -> None:
    chunks = make_chunks(300)
    store = ChunkStore(tmp_path / "store")
    holders = Holders(chunks, liars={"liar"})
    run = _Run(Fetcher(store, holders), dict(holders.sizes), {"a": "a", "b": "b", "liar": "liar"})  # type: ignore[arg-type]
    trio.run(run.fetch, list(chunks))
    run.writer.commit()
    assert run.stats is not None and set(run.stats.dropped) == {"liar"} and run.stats.bytes["liar"] == 0
    assert store.present(chunks) == set(chunks)
    for cid, data in chunks.items():
        frame, size = store.read_stored(cid)
        assert size == len(data) and zstandard.ZstdDecompressor().decompress(frame) == data
    assert set(holders.asked) == {"a", "b", "liar"}


def test_a_write_that_fails_stops_the_pull_with_its_error_and_nothing_is_committed(tmp_path: Path) -> None:
    chunks = make_chunks(50)
    store = ChunkStore(tmp_path / "store")
    holders = Holders(chunks, liars=set())
    run = _Run(Fetcher(store, holders, fail_writes=True), dict(holders.sizes), {"a": "a"})  # type: ignore[arg-type]
    with pytest.raises(RequestError, match="the disk is full"):
        trio.run(run.fetch, list(chunks))
    assert store.present(chunks) == set()
