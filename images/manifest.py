"""An image's manifest: the ordered pieces of its content (chunk ids and zero runs), how it was cut, its size
and the digest of the whole content. The manifest's own digest (BLAKE3 of its encoding) is the image's
identity: the catalogue maps a name to it, a pull fetches it first and verifies it like a chunk.

What is chunked is the guest-visible raw content, whatever the imported file's format (qcow2 is read
through `qemu-img`): the same disk content stored twice as two qcow2 files with different cluster layouts
would share nothing at the file level (docs/benchmarks.md, "Images: deduplication"). `source_format`
only says what was imported.

A manifest is encoded once, with msgpack, and never re-encoded: its digest must not depend on the
encoder's version. A newer format bumps `version`, and this one refuses what it cannot read.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import blake3
import msgpack

from images.chunks import Chunking, Piece

VERSION = 1
MAX_MANIFEST = 64 << 20
"""Largest encoded manifest accepted (about 1.7 million chunks: some 14 GiB of non-zero content)."""


class ManifestError(ValueError):
    """A manifest that does not decode, or whose pieces do not add up; one line."""


@dataclass(frozen=True)
class Manifest:
    size: int
    """Bytes of content: the disk's virtual size."""
    digest: str
    """BLAKE3 of the whole content, hex."""
    chunking: Chunking
    pieces: tuple[tuple[int, bytes | None], ...]
    """(length, chunk id or None for zeros), in content order."""
    source_format: Literal["raw", "qcow2"] = "raw"
    version: int = VERSION

    @classmethod
    def of(cls, pieces: Iterable[Piece], size: int, digest: str, chunking: Chunking,
           source_format: Literal["raw", "qcow2"] = "raw") -> Manifest:
        return cls(size, digest, chunking, tuple((p.length, p.id) for p in pieces), source_format)

    def __post_init__(self) -> None:
        total = sum(length for length, _ in self.pieces)
        if total != self.size:
            raise ManifestError(f"manifest pieces cover {total} bytes, its size says {self.size}")

    def chunk_ids(self) -> list[bytes]:
        """Each distinct chunk id, in order of first use."""
        return list(dict.fromkeys(cid for _, cid in self.pieces if cid is not None))

    def chunk_sizes(self) -> dict[bytes, int]:
        return {cid: length for length, cid in self.pieces if cid is not None}

    def encode(self) -> bytes:
        c = self.chunking
        return msgpack.packb([self.version, self.size, self.digest, [c.min_size, c.avg_size, c.max_size, c.zero_run],
                              self.source_format, [[length, cid] for length, cid in self.pieces]])

    @staticmethod
    def id_of(body: bytes) -> str:
        """The manifest digest that names an image: BLAKE3 of its encoding, hex."""
        return blake3.blake3(body).hexdigest()

    @classmethod
    def decode(cls, body: bytes) -> Manifest:
        if len(body) > MAX_MANIFEST:
            raise ManifestError(f"manifest of {len(body)} bytes is larger than {MAX_MANIFEST}")
        try:
            version, size, digest, sizes, source, pieces = msgpack.unpackb(body)
        except (ValueError, TypeError, msgpack.UnpackException) as err:
            raise ManifestError(f"manifest does not decode: {err}") from None
        if version != VERSION:
            raise ManifestError(f"manifest version {version!r}: this agent reads version {VERSION}")
        try:
            chunking = Chunking(*sizes)
            out = tuple((int(length), None if cid is None else bytes(cid)) for length, cid in pieces)
        except (ValueError, TypeError) as err:
            raise ManifestError(f"manifest is malformed: {err}") from None
        if not (isinstance(size, int) and isinstance(digest, str) and source in ("raw", "qcow2")
                and all(length > 0 and (cid is None or len(cid) == 32) for length, cid in out)):
            raise ManifestError("manifest is malformed: bad size, digest, format or piece")
        return cls(size, digest, chunking, out, source)
