"""Putting a disk image file into a chunk store, and getting its content back out.

`import_file` reads a raw or qcow2 file (a qcow2 is turned into its raw content with `qemu-img convert`
first: what is chunked is what the guest sees, `images.manifest`), cuts it (`images.chunks`), stores the
chunks the store lacks and commits them with the manifest at once (`images.store`): an import that fails
halfway (a truncated qcow2, a full disk) leaves nothing behind. `export` writes the content back, sparse,
checked against the manifest's digest before it is renamed into place.

Blocking (files, `qemu-img`): the agent runs it in a worker thread.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import blake3

from images.chunks import DEFAULT, Chunking, Piece, cut
from images.manifest import Manifest
from images.store import ChunkStore, StoreError

QCOW2_MAGIC = b"QFI\xfb"
SECTOR = 512
LOOKUP_BATCH = 1024
"""Chunks looked up in the store's index at once during an import."""
ZEROS = bytes(1 << 20)
T = TypeVar("T")
Progress = Callable[[int, int], None]
"""Called with (bytes done, bytes in all) as an import or export goes."""


class ImageFileError(StoreError):
    """The file is not an image this store takes (format, size, corruption); one line."""


@dataclass(frozen=True)
class Imported:
    digest: str
    """The manifest's digest: the image's identity."""
    size: int
    chunks: int
    """Distinct chunks of the content (zero runs are not chunks)."""
    new_chunks: int
    new_bytes: int
    """What the store grew by: compressed bytes written to packs."""
    source_format: Literal["raw", "qcow2"]
    manifest_bytes: int
    """The encoded manifest's size: what a node that holds every chunk still fetches to hold the image."""


def import_file(store: ChunkStore, path: Path, chunking: Chunking = DEFAULT,
                progress: Progress | None = None, name: str | None = None) -> Imported:
    """Import the raw or qcow2 image at `path` (held here as image `name`, if given); ImageFileError if it is
    neither, truncated or corrupt, StoreError (with nothing stored) if the disk fills up."""
    with open_content(path, store.root) as (content, source):
        try:
            return _store(store, content, chunking, source, progress, name)
        except OSError as err:
            raise StoreError(f"import of {path} failed, nothing stored: {err.strerror or err}") from None


@contextlib.contextmanager
def open_content(path: Path, scratch: Path) -> Iterator[tuple[memoryview, Literal["raw", "qcow2"]]]:
    """The guest-visible content of the raw or qcow2 image at `path` (mapped, read-only), and its format; a
    qcow2 is converted into `scratch` first. ImageFileError if it is neither, empty, truncated or corrupt."""
    source = detect_format(path)
    with _raw_content(path, source, scratch) as raw, open(raw, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise ImageFileError(f"{path}: the image is empty")
        if size % SECTOR:
            raise ImageFileError(f"{path}: {size} bytes is not a whole number of {SECTOR}-byte sectors "
                                 "(a truncated raw image?)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped, memoryview(mapped) as content:
            yield content, source


def _store(store: ChunkStore, content: memoryview, chunking: Chunking, source: Literal["raw", "qcow2"],
           progress: Progress | None, name: str | None) -> Imported:
    pieces: list[Piece] = []
    new = 0
    with store.writer() as writer, contextlib.closing(cut(content, chunking)) as cuts:
        for batch in batches(cuts, LOOKUP_BATCH):
            pieces += batch
            wanted = set(writer.wants([p.id for p in batch if p.id is not None]))  # one index lookup a batch
            for piece in batch:  # a chunk twice in one batch is added once
                if piece.id in wanted and writer.add(piece.id, bytes(content[piece.offset:piece.end])):
                    new += 1
            if progress is not None:
                progress(batch[-1].offset + batch[-1].length, len(content))
        manifest = Manifest.of(pieces, len(content), content_digest(content), chunking, source)
        body = manifest.encode()
        writer.commit(body, name)
    return Imported(Manifest.id_of(body), len(content), len(manifest.chunk_ids()), new, writer.written, source,
                    len(body))


def batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """`items` in lists of `size` (the last one shorter); itertools.batched from Python 3.12."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def content_digest(content: memoryview) -> str:
    return blake3.blake3(content, max_threads=blake3.blake3.AUTO).hexdigest()


def detect_format(path: Path) -> Literal["raw", "qcow2"]:
    """raw or qcow2, by `qemu-img info`; ImageFileError for another format or a file it cannot read."""
    if not path.is_file():
        raise ImageFileError(f"{path}: no such file")
    with open(path, "rb") as f:
        if f.read(4) == QCOW2_MAGIC:
            return "qcow2"
    info = _qemu_img("info", "--output=json", "--", str(path))
    fmt = json.loads(info).get("format")
    if fmt != "raw":
        raise ImageFileError(f"{path}: unknown format {fmt!r}: images are raw or qcow2")
    return "raw"


@contextlib.contextmanager
def _raw_content(path: Path, source: str, scratch: Path) -> Iterator[Path]:
    """The file whose bytes are the guest-visible content: `path` itself, or a sparse raw conversion."""
    if source == "raw":
        yield path
        return
    _qemu_img("check", "-q", "-f", "qcow2", "--", str(path))
    with tempfile.TemporaryDirectory(dir=scratch, prefix="incoming-") as tmp:
        raw = Path(tmp) / "content.raw"
        _qemu_img("convert", "-f", "qcow2", "-O", "raw", "-S", "4k", "--", str(path), str(raw))
        yield raw


def _qemu_img(*args: str) -> str:
    try:
        done = subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise ImageFileError("qemu-img is not installed (Debian package qemu-utils)") from None
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise ImageFileError(f"qemu-img {args[0]}: {lines[-1] if lines else 'failed'}")
    return done.stdout


def export(store: ChunkStore, manifest: Manifest, path: Path, progress: Progress | None = None) -> None:
    """Write the image's raw content to `path` from this store."""
    with ContentWriter(path, manifest, progress) as out:
        for piece in store.content(manifest):
            out.write(piece)


class ContentWriter:
    """Writes an image's content, piece by piece (bytes, or a count of zero bytes: left sparse), to a temporary
    file beside `path`, and renames it into place only if the whole matches the manifest's digest."""

    def __init__(self, path: Path, manifest: Manifest, progress: Progress | None = None) -> None:
        self.path, self.manifest, self.progress = path, manifest, progress
        self._hasher = blake3.blake3()
        self._done = 0
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        self._tmp = Path(tmp)
        self._out = os.fdopen(fd, "wb")

    def write(self, piece: bytes | int) -> None:
        if isinstance(piece, int):
            self._out.seek(piece, os.SEEK_CUR)
            for start in range(0, piece, len(ZEROS)):
                self._hasher.update(ZEROS[:min(len(ZEROS), piece - start)])
            self._done += piece
        else:
            self._out.write(piece)
            self._hasher.update(piece)
            self._done += len(piece)
        if self.progress is not None:
            self.progress(self._done, self.manifest.size)

    def __enter__(self) -> ContentWriter:
        return self

    def __exit__(self, kind: object, error: object, trace: object) -> None:
        try:
            with self._out:
                self._out.truncate(self.manifest.size)
            if kind is None and self._hasher.hexdigest() != self.manifest.digest:
                raise StoreError(f"exported content does not match the image's digest {self.manifest.digest[:16]}")
            if kind is None:
                os.replace(self._tmp, self.path)
        finally:
            self._tmp.unlink(missing_ok=True)
