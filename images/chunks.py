"""Cutting a disk image's content into chunks, and naming each chunk by its content.

Why content-defined: an image built again with a few packages added or upgraded shares most of its bytes
with the one before, but not at the same offsets; fixed blocks deduplicate only what stayed aligned, and
one byte inserted at an unaligned offset shifts every block after it. Content-defined chunking (FastCDC,
`pyfastcdc`) cuts where the content says, so cut points move with the content.

Why zero runs first: a filesystem pads each file's last block with zeros and leaves free space zeroed, so
a run of at least `zero_run` zero bytes almost always ends where a file (or the next metadata) starts.
Every such run is a hole (stored as nothing: a manifest says "so many zero bytes"), and FastCDC cuts
only the non-zero stretches between holes: a chunk starts where a file starts instead of straddling two,
whatever was cut before it. Both steps depend on the bytes only, never on offsets, so the whole cut is
shift-resistant. docs/benchmarks.md ("Images: deduplication") measured the choice on three Debian
images: 63.0 % saved (fixed 4 KiB blocks: 64.2 %, but nothing after a shift), the fewest stored bytes
after zstd of all chunkers tried, half as many chunks as 4 KiB blocks.

A chunk's id is the BLAKE3 digest of its bytes (32 bytes): the same content has the same id on every
node, and a holder that serves bytes not matching the id it was asked for is caught on arrival.

This module only cuts and hashes memory; it never touches a file or a socket. numpy is imported by the
first cut, not with the module: agents name and verify chunks, and only an import cuts them.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from dataclasses import dataclass
from itertools import pairwise

import blake3
from pyfastcdc import FastCDC

BLOCK = 4096
"""Zero runs are looked for in words only inside runs of non-zero blocks of this size (a speed-up: the runs
found do not depend on it)."""


@dataclass(frozen=True)
class Chunking:
    """How an image was cut; a manifest records it, so an image cut otherwise still reads back (its chunks
    simply deduplicate less against the others)."""

    min_size: int = 2048
    avg_size: int = 8192
    max_size: int = 32768
    zero_run: int = 256
    """Zero runs at least this long are holes, and cut points."""

    def __post_init__(self) -> None:
        if not (self.min_size < self.avg_size < self.max_size and 64 <= self.min_size <= 1 << 20
                and 256 <= self.avg_size <= 4 << 20 and 1024 <= self.max_size <= 16 << 20):  # FastCDC's bounds
            raise ValueError(f"chunk sizes must satisfy min < avg < max, 64 B <= min <= 1 MiB, 256 B <= avg <= 4 MiB "
                             f"and 1 KiB <= max <= 16 MiB; got {self}")
        if not 16 <= self.zero_run <= BLOCK:
            raise ValueError(f"zero_run must be between 16 and {BLOCK}, got {self.zero_run}")


DEFAULT = Chunking()


@dataclass(frozen=True)
class Piece:
    """`length` bytes at `offset` of the content: a chunk named `id`, or zeros (`id` None)."""

    offset: int
    length: int
    id: bytes | None

    @property
    def end(self) -> int:
        return self.offset + self.length


def chunk_id(data: bytes | memoryview) -> bytes:
    return blake3.blake3(data).digest()


def cut(content: memoryview, how: Chunking = DEFAULT) -> Generator[Piece, None, None]:
    """Every piece of `content`, in order, covering it exactly: the holes (zero runs of `how.zero_run` bytes
    or more), and the FastCDC chunks of the stretches between them."""
    cdc = FastCDC(avg_size=how.avg_size, min_size=how.min_size, max_size=how.max_size)
    at = 0
    for start, end in [*zero_runs(content, how.zero_run), (len(content), len(content))]:
        if start > at:
            stretch = content[at:start]
            if len(stretch) <= how.min_size:
                yield Piece(at, len(stretch), chunk_id(stretch))
            else:
                for chunk in cdc.cut_buf(stretch):
                    yield Piece(at + chunk.offset, chunk.length, chunk_id(chunk.data))
        if end > start:
            yield Piece(start, end - start, None)
        at = end


def zero_runs(content: memoryview, least: int) -> list[tuple[int, int]]:
    """The maximal runs of zero bytes at least `least` long, as (start, end), in order. Whole zero blocks
    are found at once; inside runs of non-zero blocks, runs of zero 8-byte words long enough to matter,
    then widened byte by byte to their exact ends (so the result depends on the bytes, not on alignment)."""
    import numpy as np  # see the module docstring

    found: list[tuple[int, int]] = []
    words_needed = max((least - 7) // 8, 1)
    for start, end, zero in _block_runs(content):
        if zero:
            found.append(_widened(content, start, end))
            continue
        words = np.frombuffer(content, dtype=np.uint64, count=(end - start) // 8, offset=start)
        flags = np.concatenate(([0], (words == 0).astype(np.int8), [0]))
        edges = np.flatnonzero(np.diff(flags))
        for first, last in zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True):
            at_edge = first == 0 or last == len(words)  # it goes on in the zero block beside, if any
            if last - first >= words_needed or at_edge:
                found.append(_widened(content, start + first * 8, start + last * 8))
    merged: list[tuple[int, int]] = []
    for start, end in found:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return [(start, end) for start, end in merged if end - start >= least]


def _widened(content: memoryview, start: int, end: int) -> tuple[int, int]:
    """A run of zero words, with the zero bytes just before and after it (fewer than 8 on each side)."""
    for _ in range(7):
        if start > 0 and content[start - 1] == 0:
            start -= 1
    for _ in range(7):
        if end < len(content) and content[end] == 0:
            end += 1
    return start, end


def _block_runs(content: memoryview) -> Iterator[tuple[int, int, bool]]:
    """(start, end, all zero) of the maximal runs of whole zero BLOCKs and of what lies between them; the
    tail shorter than a block belongs to the non-zero side."""
    import numpy as np  # see the module docstring

    whole = len(content) // BLOCK
    if whole == 0:
        if len(content):
            yield 0, len(content), False
        return
    blocks = np.frombuffer(content, dtype=np.uint8, count=whole * BLOCK).reshape(whole, BLOCK)
    nonzero = np.asarray(blocks.any(axis=1), dtype=bool)
    edges = np.flatnonzero(np.diff(nonzero.astype(np.int8))) + 1
    bounds = [0, *edges.tolist(), whole]
    runs = [(first * BLOCK, last * BLOCK, not nonzero.item(first)) for first, last in pairwise(bounds)]
    if len(content) > whole * BLOCK:
        start, _, zero = runs[-1]
        runs[-1:] = [runs[-1], (whole * BLOCK, len(content), False)] if zero else [(start, len(content), False)]
    yield from runs
