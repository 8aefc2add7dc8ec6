"""Cutting a disk image's content into chunks, and naming each chunk by its content.

Why content-defined: an image built again with a few packages added or upgraded shares most of its bytes
with the one before, but not at the same offsets; fixed blocks deduplicate only what stayed aligned, and
one byte inserted at an unaligned offset shifts every block after it. Content-defined chunking (FastCDC,
`pyfastcdc`) cuts where the content says, so cut points move with the content.

Why zero blocks first: a disk image is mostly free space, zeroed; a filesystem places file data in extents
separated by that space, aligned on its blocks. Runs of ZERO_BLOCK-sized zero blocks are cut out first
(they cost nothing to store: a manifest says "so many zero bytes"), and chunking runs inside each run of
non-zero blocks, so a chunk starts where a run starts: most file extents, whatever content-defined cut
came before them. docs/benchmarks.md ("Images: deduplication") gives the figures that chose the sizes.

A chunk's id is the BLAKE3 digest of its bytes (32 bytes): the same content has the same id on every
node, and a holder that serves bytes not matching the id it was asked for is caught on arrival.

This module only cuts and hashes memory; it never touches a file or a socket.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from dataclasses import dataclass
from itertools import pairwise

import blake3
import numpy as np
from pyfastcdc import FastCDC

ZERO_BLOCK = 4096
"""Granularity of the zero runs that are cut out and not stored."""


@dataclass(frozen=True)
class Chunking:
    """How an image was cut; a manifest records it, so an image cut otherwise still reads back (its chunks
    simply deduplicate less against the others)."""

    min_size: int = 2048
    avg_size: int = 8192
    max_size: int = 65536
    zero_block: int = ZERO_BLOCK

    def __post_init__(self) -> None:
        if not 64 <= self.min_size < self.avg_size < self.max_size <= 1 << 24:
            raise ValueError(f"chunk sizes must satisfy 64 <= min < avg < max <= 16 MiB, got {self}")


DEFAULT = Chunking()


@dataclass(frozen=True)
class Piece:
    """`length` bytes at `offset` of the content: a chunk named `id`, or zeros (`id` None)."""

    offset: int
    length: int
    id: bytes | None


def chunk_id(data: bytes | memoryview) -> bytes:
    return blake3.blake3(data).digest()


def cut(content: memoryview, how: Chunking = DEFAULT) -> Generator[Piece, None, None]:
    """Every piece of `content`, in order, covering it exactly: zero runs of whole blocks, and the chunks
    of the content between them."""
    cdc = FastCDC(avg_size=how.avg_size, min_size=how.min_size, max_size=how.max_size)
    for start, end, zero in _runs(content, how.zero_block):
        if zero:
            yield Piece(start, end - start, None)
            continue
        for chunk in cdc.cut_buf(content[start:end]):
            yield Piece(start + chunk.offset, chunk.length, chunk_id(chunk.data))


def _runs(content: memoryview, block: int) -> Iterator[tuple[int, int, bool]]:
    """(start, end, all zero) of the maximal runs of whole zero blocks and of what lies between them; the
    tail shorter than a block belongs to the non-zero side."""
    whole = len(content) // block
    if whole == 0:
        if len(content):
            yield 0, len(content), False
        return
    blocks = np.frombuffer(content, dtype=np.uint8, count=whole * block).reshape(whole, block)
    nonzero = np.asarray(blocks.any(axis=1), dtype=bool)
    edges = np.flatnonzero(np.diff(nonzero.astype(np.int8))) + 1
    bounds = [0, *edges.tolist(), whole]
    runs = [(first * block, last * block, not nonzero.item(first)) for first, last in pairwise(bounds)]
    if len(content) > whole * block:
        start, _, zero = runs[-1]
        runs[-1:] = [runs[-1], (whole * block, len(content), False)] if zero else [(start, len(content), False)]
    yield from runs
