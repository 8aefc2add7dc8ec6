"""A node's chunk store: compressed chunks packed into files, an SQLite index, the manifests it holds.

Layout under its root::

    packs/<hex>.pack   zstd frames of chunks, one after the other (PACK_SIZE each at most)
    packs/tmp-*        a pack being written: removed when the store opens
    index.sqlite       chunk id -> (pack, offset, stored length, size); manifests; which manifest uses
                       which chunk

Why packs: with chunks of a few KiB, one file per chunk means hundreds of thousands of files per image.
Why SQLite: the index must change all at once with the manifest that needs it.

**Atomicity.** A writer appends to a temporary pack; `commit` flushes and fsyncs it, renames it into
place, fsyncs the directory, and only then inserts its chunks' rows and the manifest (with its uses) in
one transaction. A crash or a full disk before that transaction leaves no row pointing at anything
missing: a temporary pack is removed at the next open, and a renamed pack that no row names is removed by
`gc`. So an import or a pull is either wholly there or not at all, and the store stays consistent.

**Verification.** Every chunk read is decompressed and hashed; bytes that do not match their id raise
`CorruptChunk`, and the chunk's row is dropped so that it can be fetched again (`stats["corrupt"]`).

**References and garbage.** A manifest held here uses its chunks (table `uses`); a chunk's reference
count is the number of manifests that use it. `gc` drops the chunks no manifest uses, deletes the packs
left without a live chunk, and repacks those less than half live.

This module is blocking (files, SQLite, zstd): the agent calls it from a worker thread, one writer at a
time; it never touches the network.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import zstandard

from images.chunks import chunk_id
from images.manifest import Manifest

PACK_SIZE = 32 << 20
LEVEL = 3
"""zstd level: level 1-3 compress at ~1.5 GB/s here; higher levels cost far more than they save on disks."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks (id BLOB PRIMARY KEY, pack TEXT NOT NULL, offset INTEGER NOT NULL,
                                   stored INTEGER NOT NULL, size INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS chunks_pack ON chunks (pack);
CREATE TABLE IF NOT EXISTS manifests (digest TEXT PRIMARY KEY, body BLOB NOT NULL, size INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS uses (manifest TEXT NOT NULL, chunk BLOB NOT NULL, PRIMARY KEY (manifest, chunk))
    WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS uses_chunk ON uses (chunk);
CREATE TABLE IF NOT EXISTS names (name TEXT PRIMARY KEY, digest TEXT NOT NULL);
"""


class StoreError(Exception):
    """What a caller did wrong or the disk refused; one line."""


class CorruptChunk(StoreError):
    """A stored chunk whose bytes do not match its id; its row has been dropped."""

    def __init__(self, cid: bytes) -> None:
        super().__init__(f"chunk {cid.hex()[:16]} is corrupt on disk (dropped; fetch it again)")
        self.cid = cid


class MissingChunk(StoreError):
    def __init__(self, cid: bytes) -> None:
        super().__init__(f"chunk {cid.hex()[:16]} is not in this store")
        self.cid = cid


@dataclass(frozen=True)
class Where:
    pack: str
    offset: int
    stored: int
    size: int


class ChunkStore:
    def __init__(self, root: Path, pack_size: int = PACK_SIZE) -> None:
        self.root, self.pack_size = root, pack_size
        self.packs = root / "packs"
        self.packs.mkdir(parents=True, exist_ok=True)
        for stale in self.packs.glob("tmp-*"):
            stale.unlink()
        self._db = sqlite3.connect(root / "index.sqlite", check_same_thread=False, isolation_level=None)
        self._db.executescript(SCHEMA)
        self._lock = threading.RLock()
        self.stats = {"corrupt": 0}

    def close(self) -> None:
        self._db.close()

    # -- reading ------------------------------------------------------------------------------------

    def where(self, cid: bytes) -> Where | None:
        row = self._query("SELECT pack, offset, stored, size FROM chunks WHERE id = ?", (cid,))
        return Where(*row[0]) if row else None

    def present(self, ids: Iterable[bytes]) -> set[bytes]:
        """Which of `ids` this store holds."""
        return {bytes(row[0]) for row in self._each_of("SELECT id FROM chunks WHERE id IN ({})", list(ids))}

    def read_stored(self, cid: bytes) -> tuple[bytes, int]:
        """The chunk as stored (a zstd frame) and its size: what a transfer sends; the receiver verifies it."""
        at = self.where(cid)
        if at is None:
            raise MissingChunk(cid)
        try:
            with open(self.packs / at.pack, "rb") as f:
                frame = os.pread(f.fileno(), at.stored, at.offset)
        except FileNotFoundError:
            frame = b""
        if len(frame) != at.stored:
            self._drop(cid)
            raise CorruptChunk(cid)
        return frame, at.size

    def read(self, cid: bytes) -> bytes:
        """The chunk's bytes, verified against its id."""
        frame, size = self.read_stored(cid)
        try:
            return verify_frame(cid, frame, size)
        except StoreError:
            self._drop(cid)
            raise CorruptChunk(cid) from None

    def content(self, manifest: Manifest) -> Iterator[bytes | int]:
        """The image's content, piece by piece: bytes, or a count of zero bytes."""
        for length, cid in manifest.pieces:
            yield length if cid is None else self.read(cid)

    # -- manifests ----------------------------------------------------------------------------------

    def manifest(self, digest: str) -> Manifest | None:
        body = self.manifest_body(digest)
        return None if body is None else Manifest.decode(body)

    def manifest_body(self, digest: str) -> bytes | None:
        rows = self._query("SELECT body FROM manifests WHERE digest = ?", (digest,))
        return bytes(rows[0][0]) if rows else None

    def manifests(self) -> list[str]:
        return [r[0] for r in self._query("SELECT digest FROM manifests ORDER BY digest", ())]

    def missing(self, manifest: Manifest) -> list[bytes]:
        """The chunks of `manifest` this store lacks, in content order."""
        ids = manifest.chunk_ids()
        have = self.present(ids)
        return [cid for cid in ids if cid not in have]

    def stored_bytes(self, manifest: Manifest) -> int:
        """Compressed bytes of the manifest's distinct chunks held here."""
        rows = self._each_of("SELECT COALESCE(SUM(stored), 0) FROM chunks WHERE id IN ({})", manifest.chunk_ids())
        return sum(int(row[0]) for row in rows)

    def check(self, manifest: Manifest) -> int:
        """Read back and verify every chunk of `manifest`; how many were corrupt or missing (a corrupt one is
        dropped, so that `missing` names it for a refetch)."""
        bad = 0
        for cid in manifest.chunk_ids():
            try:
                self.read(cid)
            except (CorruptChunk, MissingChunk):
                bad += 1
        return bad

    def names(self) -> dict[str, str]:
        """NAME:TAG -> digest of the images held here under that name (what this node's upkeep looks after)."""
        return dict(self._query("SELECT name, digest FROM names", ()))

    def forget_name(self, name: str) -> None:
        """The catalogue no longer names this node's image `name` so (removed, or now another content)."""
        with self._lock, self._transaction() as db:
            db.execute("DELETE FROM names WHERE name = ?", (name,))

    def remove_manifest(self, digest: str) -> bool:
        """Stop holding an image here (its chunks become garbage unless another manifest uses them)."""
        with self._lock, self._transaction() as db:
            db.execute("DELETE FROM names WHERE digest = ?", (digest,))
            db.execute("DELETE FROM uses WHERE manifest = ?", (digest,))
            return db.execute("DELETE FROM manifests WHERE digest = ?", (digest,)).rowcount > 0

    def references(self, manifest: Manifest) -> dict[str, int]:
        """How many of the manifest's chunks no other manifest here uses (`own`), and how many are shared."""
        digest = Manifest.id_of(manifest.encode())
        rows = self._query("SELECT COUNT(*) FROM uses u WHERE u.manifest = ? AND EXISTS "
                           "(SELECT 1 FROM uses o WHERE o.chunk = u.chunk AND o.manifest != u.manifest)", (digest,))
        shared = int(rows[0][0])
        return {"own": len(manifest.chunk_ids()) - shared, "shared": shared}

    # -- writing ------------------------------------------------------------------------------------

    @contextmanager
    def writer(self, replace: bool = False) -> Iterator[PackWriter]:
        """A writer whose chunks land only at its `commit`; leaving without one (an error, a full disk)
        leaves the store as it was. With `replace`, its chunks' rows replace those held (a repack)."""
        w = PackWriter(self, replace)
        try:
            yield w
        finally:
            w.abandon()

    def _commit(self, packs: list[tuple[str, list[tuple[bytes, int, int, int]]]], manifest: bytes | None,
                replace: bool, name: str | None = None) -> None:
        with self._lock, self._transaction() as db:
            for pack, rows in packs:
                db.executemany(f"INSERT OR {'REPLACE' if replace else 'IGNORE'} INTO chunks VALUES (?, ?, ?, ?, ?)",
                               [(cid, pack, offset, stored, size) for cid, offset, stored, size in rows])
            if manifest is not None:
                parsed = Manifest.decode(manifest)
                digest = Manifest.id_of(manifest)
                lacking = [c for c in parsed.chunk_ids() if not db.execute(
                    "SELECT 1 FROM chunks WHERE id = ?", (c,)).fetchone()]
                if lacking:
                    raise StoreError(f"manifest {digest[:16]} needs {len(lacking)} chunks this store lacks")
                db.execute("INSERT OR IGNORE INTO manifests VALUES (?, ?, ?)", (digest, manifest, parsed.size))
                db.executemany("INSERT OR IGNORE INTO uses VALUES (?, ?)", [(digest, c) for c in parsed.chunk_ids()])
                if name is not None:
                    db.execute("INSERT OR REPLACE INTO names VALUES (?, ?)", (name, digest))

    # -- maintenance --------------------------------------------------------------------------------

    def gc(self) -> dict[str, int]:
        """Drop unused chunks, delete dead packs, repack the mostly dead; what was freed."""
        with self._lock:
            with self._transaction() as db:
                dropped = db.execute("DELETE FROM chunks WHERE id NOT IN (SELECT chunk FROM uses)").rowcount
            live = {r[0]: (int(r[1]), int(r[2])) for r in self._query(
                "SELECT pack, COUNT(*), SUM(stored) FROM chunks GROUP BY pack", ())}
        freed = packs_deleted = repacked = 0
        for path in sorted(self.packs.glob("*.pack")):
            size = path.stat().st_size
            count, stored = live.get(path.name, (0, 0))
            if count == 0:
                path.unlink()
                freed += size
                packs_deleted += 1
            elif stored * 2 < size:
                freed += size - self._repack(path.name)
                repacked += 1
        return {"chunks_dropped": dropped, "packs_deleted": packs_deleted, "packs_repacked": repacked,
                "bytes_freed": freed}

    def _repack(self, pack: str) -> int:
        """Copy a pack's live chunks into a new pack and delete it; the new pack's size."""
        rows = self._query("SELECT id FROM chunks WHERE pack = ?", (pack,))
        with self.writer(replace=True) as w:
            for (cid,) in rows:
                w.add_stored(bytes(cid), *self.read_stored(bytes(cid)))
            w.commit()
            written = w.written
        (self.packs / pack).unlink()
        return written

    def usage(self) -> dict[str, int]:
        rows = self._query("SELECT COUNT(*), COALESCE(SUM(stored), 0), COALESCE(SUM(size), 0) FROM chunks", ())
        chunks, stored, size = (int(v) for v in rows[0])
        on_disk = sum(p.stat().st_size for p in self.packs.glob("*.pack"))
        return {"chunks": chunks, "stored_bytes": stored, "chunk_bytes": size, "pack_bytes": on_disk,
                "manifests": len(self.manifests()), "index_bytes": (self.root / "index.sqlite").stat().st_size}

    # -- plumbing -----------------------------------------------------------------------------------

    def _drop(self, cid: bytes) -> None:
        self.stats["corrupt"] += 1
        with self._lock, self._transaction() as db:
            db.execute("DELETE FROM chunks WHERE id = ?", (cid,))

    def _each_of(self, sql: str, ids: list[bytes]) -> list[tuple[Any, ...]]:
        """`sql` (whose `IN ({})` takes the ids) run over `ids` in batches SQLite accepts; every row."""
        rows = []
        for start in range(0, len(ids), 500):
            batch = ids[start:start + 500]
            rows += self._query(sql.format(",".join("?" * len(batch))), batch)
        return rows

    def _query(self, sql: str, args: Iterable[object]) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, tuple(args)).fetchall()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")


class PackWriter:
    """Appends compressed chunks to temporary packs; `commit` makes them, and a manifest, part of the store
    at once. Chunks the store already holds, or this writer already took, are skipped."""

    def __init__(self, store: ChunkStore, replace: bool = False) -> None:
        self.store, self.replace = store, replace
        self._compressor = zstandard.ZstdCompressor(level=LEVEL)
        self._sealed: list[tuple[Path, list[tuple[bytes, int, int, int]]]] = []
        self._file: Path | None = None
        self._out: BinaryIO | None = None
        self._temps: list[Path] = []
        """Every temporary pack not renamed yet, for `abandon`."""
        self._rows: list[tuple[bytes, int, int, int]] = []
        self._offset = 0
        self._taken: set[bytes] = set()
        self.written = 0
        """Bytes written to packs so far: what the store grows by."""

    def wants(self, ids: Iterable[bytes]) -> list[bytes]:
        """Which of `ids` neither the store nor this writer holds yet."""
        ids = [c for c in ids if c not in self._taken]
        have = self.store.present(ids)
        return [c for c in ids if c not in have]

    def add(self, cid: bytes, data: bytes | memoryview) -> bool:
        """Store a chunk whose id the caller computed from `data`; False if it was already taken."""
        if cid in self._taken:
            return False
        return self.add_stored(cid, self._compressor.compress(data), len(data))

    def add_stored(self, cid: bytes, frame: bytes, size: int) -> bool:
        """Store a chunk already compressed (from a peer: verify it first with `verify_frame`)."""
        if cid in self._taken or (not self.replace and self.store.where(cid) is not None):
            return False
        if self._out is None or self._offset + len(frame) > self.store.pack_size:
            self._seal()
            self._file = self.store.packs / f"tmp-{secrets.token_hex(8)}"
            self._temps.append(self._file)
            self._out = open(self._file, "wb")  # noqa: SIM115 (closed by _seal)
            self._offset = 0
        self._out.write(frame)
        self._rows.append((cid, self._offset, len(frame), size))
        self._offset += len(frame)
        self.written += len(frame)
        self._taken.add(cid)
        return True

    def commit(self, manifest: bytes | None = None, name: str | None = None) -> None:
        """Seal the packs, make them durable, then index their chunks and `manifest` (held as image `name`)
        in one transaction."""
        self._seal()
        named = []
        for tmp, rows in self._sealed:
            pack = f"{secrets.token_hex(12)}.pack"
            tmp.rename(self.store.packs / pack)
            self._temps.remove(tmp)
            named.append((pack, rows))
        self._sealed = []
        if named:
            fd = os.open(self.store.packs, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self.store._commit(named, manifest, self.replace, name)

    def abandon(self) -> None:
        """Forget what was not committed (temporary packs removed; renamed ones no row names are `gc`'s)."""
        if self._out is not None:
            with contextlib.suppress(OSError):  # its buffer cannot be flushed on a full disk; it closes anyway
                self._out.close()
            self._out = None
        for tmp in self._temps:
            tmp.unlink(missing_ok=True)
        self._temps, self._sealed, self._file, self._rows = [], [], None, []

    def _seal(self) -> None:
        """Close the pack being written, flushed and fsynced (so that a rename makes it durable)."""
        if self._out is not None:
            try:
                self._out.flush()
                os.fsync(self._out.fileno())
            finally:
                self._out.close()
                self._out = None
        if self._file is not None and self._rows:
            self._sealed.append((self._file, self._rows))
        self._file, self._rows = None, []


def verify_frame(cid: bytes, frame: bytes, size: int) -> bytes:
    """The chunk a peer sent as a zstd frame, if it decompresses to `size` bytes hashing to `cid`; else
    StoreError (the peer sent bytes that do not match their id)."""
    try:
        data = zstandard.ZstdDecompressor().decompress(frame, max_output_size=size)
    except zstandard.ZstdError as err:
        raise StoreError(f"chunk {cid.hex()[:16]}: not a zstd frame ({err})") from None
    if len(data) != size or chunk_id(data) != cid:
        raise StoreError(f"chunk {cid.hex()[:16]}: bytes do not match the id")
    return data
