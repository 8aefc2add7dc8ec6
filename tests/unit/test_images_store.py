"""The image layer without a network: chunking, manifests, the chunk store, import and export."""

from __future__ import annotations

import errno
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from images.chunks import Chunking, chunk_id, cut
from images.importing import ImageFileError, export, import_file
from images.manifest import Manifest, ManifestError
from images.store import ChunkStore, CorruptChunk, PackWriter, StoreError, verify_frame

SMALL = Chunking(min_size=256, avg_size=1024, max_size=4096, zero_run=64)


def image(rng: random.Random, blocks: int, block: int = 4096) -> bytes:
    """A disk-like content: random extents separated by zeroed free space."""
    return b"".join(rng.randbytes(block) if rng.random() < 0.6 else bytes(block) for _ in range(blocks))


@given(st.binary(max_size=20_000), st.lists(st.tuples(st.integers(0, 20_000), st.integers(1, 3000)), max_size=4))
@settings(max_examples=60, deadline=None)
def test_pieces_cover_the_content_exactly_and_zero_runs_are_zero(data: bytes, holes: list[tuple[int, int]]) -> None:
    content = bytearray(data)
    for at, length in holes:
        content[at:at + length] = bytes(min(length, max(0, len(content) - at)))
    pieces = list(cut(memoryview(bytes(content)), SMALL))
    assert [p.offset for p in pieces] == [sum(q.length for q in pieces[:i]) for i in range(len(pieces))]
    assert sum(p.length for p in pieces) == len(content)
    for p in pieces:
        chunk = bytes(content[p.offset:p.offset + p.length])
        assert (p.id is None and chunk == bytes(p.length) and p.length >= SMALL.zero_run) or \
            (p.id == chunk_id(chunk) and 0 < p.length <= SMALL.max_size)
    assert [(p.offset, p.end) for p in pieces if p.id is None] == brute_zero_runs(bytes(content), SMALL.zero_run)


def brute_zero_runs(data: bytes, least: int) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, byte in enumerate(data + b"\x01"):
        if byte == 0 and start is None:
            start = i
        elif byte != 0 and start is not None:
            if i - start >= least:
                runs.append((start, i))
            start = None
    return runs


@given(st.lists(st.tuples(st.booleans(), st.integers(1, 9000)), max_size=12), st.integers(0, 7))
@settings(max_examples=80, deadline=None)
def test_zero_runs_are_exact_whatever_their_alignment(parts: list[tuple[bool, int]], shift: int) -> None:
    """Runs of zeros and of random bytes, the whole shifted by a few bytes: the holes found are exactly the
    zero runs of at least `zero_run` bytes, so the cut does not depend on where the content sits."""
    rng = random.Random(len(parts))
    data = bytes(shift) + b"".join(bytes(n) if zero else bytes(rng.randrange(1, 256) for _ in range(n))
                                   for zero, n in parts)
    assert [(p.offset, p.end) for p in cut(memoryview(data), SMALL) if p.id is None] == \
        brute_zero_runs(data, SMALL.zero_run)


def test_a_byte_inserted_at_an_unaligned_offset_shifts_few_chunks() -> None:
    """Content-defined: what follows an insertion is cut at the same places, so it deduplicates; fixed
    blocks would share nothing after it."""
    data = random.Random(1).randbytes(1 << 20)
    shifted = data[:1001] + b"!" + data[1001:]
    before = {p.id for p in cut(memoryview(data), SMALL)}
    after = [p.id for p in cut(memoryview(shifted), SMALL)]
    assert sum(1 for cid in after if cid not in before) <= 3
    fixed = {data[i:i + 4096] for i in range(0, len(data), 4096)}
    assert sum(1 for i in range(0, len(shifted), 4096) if shifted[i:i + 4096] in fixed) == 0


def test_a_manifest_round_trips_and_refuses_what_it_cannot_read() -> None:
    pieces = ((1024, bytes(32)), (4096, None), (10, b"\x01" * 32))
    manifest = Manifest(5130, "ab" * 32, SMALL, pieces, "qcow2")
    body = manifest.encode()
    assert Manifest.decode(body) == manifest and len(Manifest.id_of(body)) == 64
    assert manifest.chunk_ids() == [bytes(32), b"\x01" * 32]
    with pytest.raises(ManifestError, match="^manifest does not decode"):
        Manifest.decode(body[:-3])
    import msgpack
    with pytest.raises(ManifestError, match="^manifest version 2: this agent reads version 1$"):
        Manifest.decode(msgpack.packb([2, *msgpack.unpackb(body)[1:]]))
    with pytest.raises(ManifestError, match="cover 5130 bytes, its size says 99"):
        Manifest.decode(msgpack.packb([1, 99, *msgpack.unpackb(body)[2:]]))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ChunkStore]:
    s = ChunkStore(tmp_path / "store", pack_size=256 << 10)
    yield s
    s.close()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_import_export_round_trip_dedup_and_a_second_import_adds_nothing(store: ChunkStore, tmp_path: Path) -> None:
    rng = random.Random(2)
    a = image(rng, 256)
    b = a[:500_000] + rng.randbytes(3000) + a[500_000:-3000]  # a next version: bytes inserted, same size
    first = import_file(store, write(tmp_path / "a.raw", a), SMALL)
    assert first.size == len(a) and first.new_chunks == first.chunks and first.new_bytes == store.usage()["pack_bytes"]
    again = import_file(store, tmp_path / "a.raw", SMALL)
    assert (again.digest, again.new_chunks, again.new_bytes) == (first.digest, 0, 0)
    second = import_file(store, write(tmp_path / "b.raw", b), SMALL)
    assert second.new_bytes < first.new_bytes // 4  # most of b is a's, shifted by 3000 bytes
    for digest, data in ((first.digest, a), (second.digest, b)):
        manifest = store.manifest(digest)
        assert manifest is not None
        export(store, manifest, tmp_path / "out.raw")
        assert (tmp_path / "out.raw").read_bytes() == data
    assert store.references(store.manifest(second.digest))["shared"] > 0  # type: ignore[arg-type]


def test_a_qcow2_is_chunked_as_its_raw_content(store: ChunkStore, tmp_path: Path) -> None:
    data = image(random.Random(3), 64)
    raw = import_file(store, write(tmp_path / "a.raw", data), SMALL)
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(tmp_path / "a.raw"), str(tmp_path / "a.qcow2")],
                   check=True)
    qcow = import_file(store, tmp_path / "a.qcow2", SMALL)
    assert qcow.source_format == "qcow2" and qcow.new_chunks == 0 and qcow.size == raw.size
    assert store.manifest(qcow.digest).digest == store.manifest(raw.digest).digest  # type: ignore[union-attr]


def test_bad_image_files_are_refused_in_one_line_and_store_nothing(store: ChunkStore, tmp_path: Path) -> None:
    data = image(random.Random(4), 64)
    write(tmp_path / "a.raw", data)
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(tmp_path / "a.raw"), str(tmp_path / "a.qcow2")],
                   check=True)
    qcow = (tmp_path / "a.qcow2").read_bytes()
    write(tmp_path / "cut.qcow2", qcow[:len(qcow) // 2])
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(tmp_path / "a.vmdk"), "1M"], check=True)
    cases = {tmp_path / "cut.qcow2": "^qemu-img (check|convert): ", tmp_path / "a.vmdk": "unknown format 'vmdk'",
             write(tmp_path / "odd.raw", data[:1000]): "not a whole number of 512-byte sectors",
             write(tmp_path / "empty.raw", b""): "the image is empty", tmp_path / "none.raw": "no such file"}
    for path, error in cases.items():
        with pytest.raises(ImageFileError, match=error) as raised:
            import_file(store, path, SMALL)
        assert "\n" not in str(raised.value)
    assert store.usage()["chunks"] == 0 and store.manifests() == [] and list(store.root.glob("incoming-*")) == []


def test_a_full_disk_during_an_import_leaves_the_store_as_it_was(store: ChunkStore, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(5)
    kept = import_file(store, write(tmp_path / "a.raw", image(rng, 64)), SMALL)
    before = store.usage()
    added = 0
    real_add = PackWriter.add_stored

    def filling(self: PackWriter, cid: bytes, frame: bytes, size: int) -> bool:
        nonlocal added
        added += 1
        if added > 40:  # past the first sealed pack
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_add(self, cid, frame, size)

    monkeypatch.setattr(PackWriter, "add_stored", filling)
    with pytest.raises(StoreError, match="nothing stored: No space left on device$"):
        import_file(store, write(tmp_path / "b.raw", image(rng, 512)), SMALL)
    assert store.usage() == before and store.manifests() == [kept.digest]
    assert [p.name for p in store.packs.iterdir() if p.name.startswith("tmp-")] == []


def test_a_corrupt_chunk_is_detected_dropped_and_counted(store: ChunkStore, tmp_path: Path) -> None:
    done = import_file(store, write(tmp_path / "a.raw", image(random.Random(6), 64)), SMALL)
    manifest = store.manifest(done.digest)
    assert manifest is not None
    victim = manifest.chunk_ids()[3]
    at = store.where(victim)
    assert at is not None
    with open(store.packs / at.pack, "r+b") as f:
        f.seek(at.offset + at.stored // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CorruptChunk):
        store.read(victim)
    assert store.stats["corrupt"] == 1 and store.where(victim) is None and store.missing(manifest) == [victim]
    other, size = store.read_stored(manifest.chunk_ids()[5])
    with pytest.raises(StoreError, match="bytes do not match the id$"):  # what a lying holder sends
        verify_frame(manifest.chunk_ids()[4], other, size)
    with pytest.raises(StoreError, match="not a zstd frame"):
        verify_frame(manifest.chunk_ids()[4], b"garbage", size)


def test_gc_drops_unused_chunks_deletes_dead_packs_and_repacks_half_dead_ones(store: ChunkStore,
                                                                               tmp_path: Path) -> None:
    rng = random.Random(7)
    a = import_file(store, write(tmp_path / "a.raw", image(rng, 128)), SMALL)
    b = import_file(store, write(tmp_path / "b.raw", image(rng, 128)), SMALL)
    (store.packs / "0rphan.pack").write_bytes(b"left by a crash between rename and commit")
    assert store.gc()["packs_deleted"] == 1  # the orphan: no row names it
    assert store.remove_manifest(a.digest) and not store.remove_manifest(a.digest)
    freed = store.gc()
    assert freed["chunks_dropped"] > 0 and freed["bytes_freed"] > 0
    usage = store.usage()
    assert usage["pack_bytes"] == usage["stored_bytes"]  # no dead bytes left in any pack
    manifest = store.manifest(b.digest)
    assert manifest is not None and store.missing(manifest) == []
    export(store, manifest, tmp_path / "out.raw")
    assert (tmp_path / "out.raw").read_bytes() == (tmp_path / "b.raw").read_bytes()


def test_the_store_knows_the_names_it_holds_each_image_under(store: ChunkStore) -> None:
    """What a node's upkeep looks after: the names committed with each manifest, until it is removed."""
    data = image(random.Random(8), 16)
    pieces = list(cut(memoryview(data), SMALL))
    body = Manifest.of(pieces, len(data), "d" * 64, SMALL).encode()
    with store.writer() as writer:
        for p in pieces:
            if p.id is not None:
                writer.add(p.id, data[p.offset:p.offset + p.length])
        writer.commit(body, "base:1")
    digest = Manifest.id_of(body)
    assert store.names() == {"base:1": digest}
    store.forget_name("base:1")
    assert store.names() == {}
    with store.writer() as writer:
        writer.commit(body, "base:latest")
    assert store.names() == {"base:latest": digest}
    store.remove_manifest(digest)
    assert store.names() == {}
