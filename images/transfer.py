"""The client's side of moving an image in or out of the cluster through one agent (`discovery image import`
and `export`).

`upload` chunks the file where it is (`images.chunks`), asks the agent which chunks it lacks, sends only
those, compressed, in batches under BATCH_BYTES, then commits the manifest: nothing is visible before
the commit, so an interrupted import leaves nothing but an upload session that expires. `download` reads
the manifest and the chunks from an agent that holds the image, verifies every chunk against its id and
writes the content sparse (`images.importing.ContentWriter`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import zstandard

from images.chunks import DEFAULT, Chunking, Piece, cut
from images.importing import ContentWriter, Progress, content_digest, open_content
from images.manifest import Manifest
from images.messages import (
    BATCH_BYTES,
    IMAGE_CHUNKS,
    IMAGE_COMMIT,
    IMAGE_MANIFEST,
    IMAGE_MANIFEST_PUT,
    IMAGE_OFFER,
    IMAGE_PUT,
    IMAGE_SHOW,
    IMAGE_UPLOAD,
    MAX_IDS,
    Chunks,
    Commit,
    Copies,
    ImageName,
    Imported,
    ManifestPut,
    ManifestSlice,
    Offer,
    Put,
)
from images.store import verify_frame
from overlay.wire.rpc import Endpoint, RequestError

CALL_TIMEOUT = 120.0


async def upload(transport: Endpoint, addr: str, path: Path, name: str, copies: int = 3,
                 chunking: Chunking = DEFAULT, progress: Progress | None = None) -> Imported:
    """Import the raw or qcow2 file at `path` as image `name` (kept on `copies` holders) through the agent at
    `addr`."""
    session = (await transport.ask(addr, IMAGE_UPLOAD, Copies(name, copies), CALL_TIMEOUT)).session
    compressor = zstandard.ZstdCompressor(level=3)
    with open_content(path, Path(tempfile.gettempdir())) as (content, source):
        pieces: list[Piece] = []
        offered: set[bytes] = set()
        batch: list[Piece] = []
        for piece in cut(content, chunking):
            pieces.append(piece)
            if piece.id is not None and piece.id not in offered:
                offered.add(piece.id)
                batch.append(piece)
            if len(batch) == MAX_IDS:
                await _send(transport, addr, session, batch, content, compressor)
                batch = []
            if progress is not None:
                progress(piece.offset + piece.length, len(content))
        await _send(transport, addr, session, batch, content, compressor)
        body = Manifest.of(pieces, len(content), content_digest(content), chunking, source).encode()
    *parts, last = [body[at:at + BATCH_BYTES] for at in range(0, max(len(body), 1), BATCH_BYTES)]
    for part in parts:  # a manifest above one request (some 50,000 chunks) goes in slices
        await transport.ask(addr, IMAGE_MANIFEST_PUT, ManifestPut(session, part), CALL_TIMEOUT)
    return await transport.ask(addr, IMAGE_COMMIT, Commit(session, last), CALL_TIMEOUT)


async def _send(transport: Endpoint, addr: str, session: str, batch: list[Piece], content: memoryview,
                compressor: zstandard.ZstdCompressor) -> None:
    """Offer the batch's chunks; put those the agent lacks, in puts under BATCH_BYTES."""
    if not batch:
        return
    lacking = await transport.ask(addr, IMAGE_OFFER, Offer(session, [p.id for p in batch if p.id]), CALL_TIMEOUT)
    chunks: list[tuple[bytes, bytes, int]] = []
    size = 0
    for i in lacking:
        piece = batch[i]
        assert piece.id is not None
        frame = compressor.compress(content[piece.offset:piece.offset + piece.length])
        if chunks and size + len(frame) > BATCH_BYTES:
            await transport.ask(addr, IMAGE_PUT, Put(session, chunks), CALL_TIMEOUT)
            chunks, size = [], 0
        chunks.append((piece.id, frame, piece.length))
        size += len(frame)
    if chunks:
        await transport.ask(addr, IMAGE_PUT, Put(session, chunks), CALL_TIMEOUT)


async def download(transport: Endpoint, addr: str, name: str, path: Path, progress: Progress | None = None) -> str:
    """Write image `name`'s content to `path` from the agent at `addr` (which must hold it); its digest."""
    entry = await transport.ask(addr, IMAGE_SHOW, ImageName(name), CALL_TIMEOUT)
    manifest = Manifest.decode(await fetch_manifest(transport, addr, entry.digest))
    sizes = manifest.chunk_sizes()
    with ContentWriter(path, manifest, progress) as out:
        held: dict[bytes, bytes] = {}
        for window in _windows(manifest):
            wanted = [c for c in dict.fromkeys(c for _, c in window if c is not None) if c not in held]
            while wanted:
                reply = await transport.ask(addr, IMAGE_CHUNKS, Chunks(wanted[:MAX_IDS]), CALL_TIMEOUT)
                if not reply.chunks:
                    raise RequestError(f"{addr} does not hold chunk {wanted[0].hex()[:16]} of {name!r}")
                for got, frame, size in reply.chunks:
                    if size != sizes.get(got):
                        raise RequestError(f"{addr} sent a chunk that is not part of {name!r}")
                    held[got] = verify_frame(got, frame, size)
                wanted = [c for c in wanted if c not in held]
            for length, piece in window:
                out.write(length if piece is None else held[piece])
            held = {}
    return entry.digest


async def fetch_manifest(transport: Endpoint, addr: str, digest: str) -> bytes:
    """Manifest `digest` from the agent at `addr`, slice by slice; RequestError if its bytes do not match the
    digest (RpcError if the agent does not answer or lacks it)."""
    body = b""
    while True:
        part = await transport.ask(addr, IMAGE_MANIFEST, ManifestSlice(digest, len(body)), CALL_TIMEOUT)
        body += part.data
        if len(body) >= part.total or not part.data:
            break
    if Manifest.id_of(body) != digest:
        raise RequestError(f"manifest {digest[:16]} from {addr} does not match its digest")
    return body


def _windows(manifest: Manifest, window: int = 32 << 20) -> Iterator[list[tuple[int, bytes | None]]]:
    """The manifest's pieces in runs of about `window` bytes of chunks: what a download holds in memory."""
    run: list[tuple[int, bytes | None]] = []
    size = 0
    for length, cid in manifest.pieces:
        run.append((length, cid))
        size += length if cid is not None else 0
        if size >= window:
            yield run
            run, size = [], 0
    if run:
        yield run


