"""Pulling an image to this node: its manifest, then the chunks this store lacks, from several holders at once.

The chunks still missing are cut into batches (BATCH_BYTES of chunk bytes each); every live holder
serves them through PER_HOLDER workers that take the next batch as soon as they are free, so a fast
holder serves more batches than a slow one. Each chunk is verified against its id on arrival: a holder
that sends other bytes is dropped for the rest of the pull, one that fails FAILURES_TO_DROP times too;
their batches go back in the queue. A chunk that a holder does not have (it found it corrupt) is asked of
another. Fetched chunks are committed to the store every COMMIT_BYTES, so an interrupted pull resumes from
what it had; the manifest lands last, and only then is this node listed as a holder.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from images.catalogue import Catalogue
from images.manifest import Manifest
from images.messages import BATCH_BYTES, IMAGE_CHUNKS, IMAGE_MANIFEST, Chunks, ManifestSlice, Pulled
from images.store import ChunkStore, PackWriter, StoreError, verify_frame
from overlay.membership import Membership
from overlay.wire.rpc import Endpoint, RequestError, RpcError

log = logging.getLogger(__name__)
InStore = Callable[..., Awaitable[Any]]
PER_HOLDER = 2
FAILURES_TO_DROP = 2
COMMIT_BYTES = 64 << 20
CALL_TIMEOUT = 60.0


class Fetcher:
    def __init__(self, store: ChunkStore, catalogue: Catalogue, transport: Endpoint, membership: Membership,
                 in_store: InStore) -> None:
        self.store, self.catalogue, self.transport, self.membership = store, catalogue, transport, membership
        self.in_store = in_store
        self._locks: dict[str, trio.Lock] = {}

    async def pull(self, name: str) -> Pulled:
        """Make this node a holder of image `name` (one pull per image at a time: a second waits for the first
        and finds nothing left to fetch)."""
        entry = await self.catalogue.find(name)
        me = self.membership.me
        started = time.perf_counter()
        async with self._locks.setdefault(entry.digest, trio.Lock()):
            live = {m.name: m.addr for m in self.membership.alive(include_me=False)}
            holders = {n: live[n] for n in sorted(entry.holders) if n in live}
            body = await self.in_store(self.store.manifest_body, entry.digest)
            if body is None:
                body = await self._manifest(entry.digest, holders)
            manifest = Manifest.decode(body)
            missing = await self.in_store(self.store.missing, manifest)
            run = _Run(self, manifest.chunk_sizes(), holders)
            if missing:
                await run.fetch(missing)
            await self.in_store(run.writer.commit, body)
        await self.catalogue.add_holder(entry, me.name, me.site)
        return Pulled(name, entry.digest, me.name, run.fetched_chunks, sum(run.sources.values()), run.duplicates,
                      dict(run.sources), sorted(run.dropped), round(time.perf_counter() - started, 3))

    async def _manifest(self, digest: str, holders: dict[str, str]) -> bytes:
        """The manifest from the first holder that has it whole, checked against its digest."""
        errors = []
        for node, addr in holders.items():
            try:
                body = b""
                while True:
                    at = ManifestSlice(digest, len(body))
                    part = await self.transport.ask(addr, IMAGE_MANIFEST, at, CALL_TIMEOUT)
                    body += part.data
                    if len(body) >= part.total or not part.data:
                        break
                if Manifest.id_of(body) == digest:
                    return body
                errors.append(f"{node}: manifest does not match its digest")
            except (RpcError, RequestError) as err:
                errors.append(f"{node}: {err}")
        raise RequestError(f"no holder served manifest {digest[:16]} ({'; '.join(errors) or 'no live holder'})")


class _Run:
    """One pull's chunk transfers: the queue of batches, the workers, what each holder sent."""

    def __init__(self, fetcher: Fetcher, sizes: dict[bytes, int], holders: dict[str, str]) -> None:
        self.fetcher, self.sizes, self.holders = fetcher, sizes, holders
        self.writer = PackWriter(fetcher.store)
        self.queue: deque[list[bytes]] = deque()
        self.pending: set[bytes] = set()
        self.in_flight = 0
        self.failures: dict[str, int] = {}
        self.dropped: set[str] = set()
        self.sources: dict[str, int] = {}
        self.duplicates = 0
        self.fetched_chunks = 0
        self._uncommitted = 0
        self._write = trio.Lock()
        self._changed = trio.Event()

    async def fetch(self, missing: list[bytes]) -> None:
        self.pending = set(missing)
        batch: list[bytes] = []
        for cid in missing:
            if batch and sum(self.sizes[c] for c in batch) + self.sizes[cid] > BATCH_BYTES:
                self.queue.append(batch)
                batch = []
            batch.append(cid)
        self.queue.append(batch)
        async with trio.open_nursery() as nursery:
            for node in self.holders:
                for _ in range(PER_HOLDER):
                    nursery.start_soon(self._worker, node)
        if self.pending:
            raise RequestError(f"{len(self.pending)} chunks could not be fetched from any holder "
                               f"({', '.join(sorted(self.holders)) or 'none live'}; given up on: "
                               f"{', '.join(sorted(self.dropped)) or 'none'})")

    async def _worker(self, node: str) -> None:
        while node not in self.dropped and self.pending:
            if not self.queue:
                if self.in_flight == 0:
                    return  # what is left, no holder had
                await self._changed.wait()
                continue
            batch = [c for c in self.queue.popleft() if c in self.pending]
            if not batch:
                continue
            self.in_flight += 1
            try:
                await self._one(node, batch)
            finally:
                self.in_flight -= 1
                self._changed.set()
                self._changed = trio.Event()

    async def _one(self, node: str, batch: list[bytes]) -> None:
        addr = self.holders[node]
        try:
            reply = await self.fetcher.transport.ask(addr, IMAGE_CHUNKS, Chunks(batch), CALL_TIMEOUT)
        except (RpcError, RequestError) as err:
            self.failures[node] = self.failures.get(node, 0) + 1
            if self.failures[node] >= FAILURES_TO_DROP:
                log.info("pull: giving up on %s: %s", node, err)
                self.dropped.add(node)
            self.queue.appendleft(batch)
            return
        got = {cid for cid, _, _ in reply.chunks}
        try:
            async with self._write:
                written = await self.fetcher.in_store(self._store, reply.chunks)
        except RequestError as err:  # bytes that do not match their id: this holder is not trusted again
            log.warning("pull: %s sent a bad chunk (%s); dropping it", node, err)
            self.dropped.add(node)
            self.queue.appendleft(batch)
            return
        self.sources[node] = self.sources.get(node, 0) + sum(len(f) for _, f, _ in reply.chunks)
        self.duplicates += sum(len(f) for cid, f, _ in reply.chunks if cid not in written)
        self.pending -= written
        self.fetched_chunks += len(written)
        rest = [c for c in batch if c not in got and c in self.pending]
        if rest:  # the holder lacked these (or stopped at its batch limit): someone else's turn
            self.queue.append(rest)

    def _store(self, chunks: list[tuple[bytes, bytes, int]]) -> set[bytes]:
        """Verify and write a reply's chunks (in a worker thread); the ids newly written."""
        written = set()
        for cid, frame, size in chunks:
            if size != self.sizes.get(cid, -1):
                raise StoreError(f"chunk {cid.hex()[:16]}: not of this image, or of another size")
            verify_frame(cid, frame, size)
            if cid in self.pending:  # else another holder's copy came first: a duplicate
                if self.writer.add_stored(cid, frame, size):
                    self._uncommitted += len(frame)
                written.add(cid)
        if self._uncommitted >= COMMIT_BYTES:  # what is fetched so far survives an interrupted pull
            self.writer.commit()
            self._uncommitted = 0
        return written

