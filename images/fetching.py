"""Pulling an image to this node: its manifest, then the chunks this store lacks, from several holders at once.

`images.pulling.Pull` (sans-IO) decides which chunks to ask of which live holder and when: C3-ranked
holders under rate control, an endgame that re-requests what a slow or dead holder holds up, liars
dropped. This is its trio shell: it sends each request (`image.chunks`) in a task of its own with the
request's deadline, verifies every chunk of a reply against its id before writing it and tells the core
which verified and which did not, and cancels the requests the core gives up. Fetched chunks are
committed to the store every COMMIT_BYTES, so an interrupted pull resumes from what it had (a new `Pull`
over what the store still lacks); the manifest lands last, and only then is this node listed as a holder.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from images.catalogue import Catalogue
from images.manifest import Manifest
from images.messages import IMAGE_CHUNKS, ChunkBatch, Chunks, Pulled
from images.pulling import Pull, PullStats, Request
from images.store import ChunkStore, PackWriter, StoreError, verify_frame
from images.transfer import fetch_manifest
from overlay.membership import Membership
from overlay.wire.rpc import Endpoint, RequestError, RpcError

log = logging.getLogger(__name__)
InStore = Callable[..., Awaitable[Any]]
COMMIT_BYTES = 64 << 20
CALL_TIMEOUT = 60.0


class Fetcher:
    def __init__(self, store: ChunkStore, catalogue: Catalogue, transport: Endpoint, membership: Membership,
                 in_store: InStore) -> None:
        self.store, self.catalogue, self.transport, self.membership = store, catalogue, transport, membership
        self.in_store = in_store
        self._locks: dict[str, trio.Lock] = {}
        self.moved: Counter[str] = Counter()
        """Bytes of chunk frames moved: "pulled" here, "served" and "uploaded" by `images.service` (the metrics)."""

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
            try:
                if missing:
                    await run.fetch(missing)
                await self.in_store(run.writer.commit, body, entry.name)
            except OSError as err:  # a full disk: what was committed is kept, and a later pull resumes from it
                raise RequestError(f"pull of {name} stopped: {err.strerror or err} (the chunks committed so far "
                                   "are kept: pull again once there is room)") from None
            finally:
                await self.in_store(run.writer.abandon)  # nothing left uncommitted: its temporary packs go
        await self.catalogue.add_holder(entry, me.name, me.site)
        got = run.stats.bytes if run.stats else {}
        return Pulled(name, entry.digest, me.name, len(missing), sum(got.values()),
                      run.stats.duplicate_bytes if run.stats else 0, dict(got),
                      sorted(run.stats.dropped) if run.stats else [], round(time.perf_counter() - started, 3))

    async def _manifest(self, digest: str, holders: dict[str, str]) -> bytes:
        """The manifest from the first holder that has it whole, checked against its digest."""
        errors = []
        for node, addr in holders.items():
            try:
                return await fetch_manifest(self.transport, addr, digest)
            except (RpcError, RequestError) as err:
                errors.append(f"{node}: {err}")
        raise RequestError(f"no holder served manifest {digest[:16]} ({'; '.join(errors) or 'no live holder'})")


class _Run:
    """One pull's chunk transfers: `images.pulling.Pull` decides what to ask of whom and when; this sends the
    requests, times them out, verifies and writes what comes back, and reports it."""

    def __init__(self, fetcher: Fetcher, sizes: dict[bytes, int], holders: dict[str, str]) -> None:
        self.fetcher, self.sizes, self.holders = fetcher, sizes, holders
        self.writer = PackWriter(fetcher.store)
        self.stats: PullStats | None = None
        self._uncommitted = 0

    async def fetch(self, missing: list[bytes]) -> None:
        pull = Pull([(cid, self.sizes[cid]) for cid in missing], list(self.holders), trio.current_time(),
                    random.Random())
        send, events = trio.open_memory_channel[tuple[Request, ChunkBatch | None]](math.inf)
        open_requests: dict[int, trio.CancelScope] = {}
        full: OSError | None = None
        async with trio.open_nursery() as nursery:
            while not pull.done and not pull.failed:
                for request in pull.requests(trio.current_time()):
                    open_requests[request.id] = trio.CancelScope(deadline=request.deadline)
                    nursery.start_soon(self._ask, request, open_requests[request.id], send)
                wakeup = pull.wakeup(trio.current_time())
                event: tuple[Request, ChunkBatch | None] | None = None
                with trio.move_on_at(math.inf if wakeup is None else wakeup):  # only the wait: an answer taken
                    event = await events.receive()  # is always reported to the core, whatever the clock says
                if event is None:
                    continue
                request, reply = event
                open_requests.pop(request.id, None)
                if reply is None:
                    pull.on_failure(request.id, trio.current_time())
                    continue
                self.fetcher.moved["pulled"] += sum(len(frame) for _, frame, _ in reply.chunks)
                try:
                    verified, bad = await self.fetcher.in_store(self._store, reply.chunks)
                except OSError as err:
                    full = err
                    break
                abandoned = pull.on_reply(request.id, trio.current_time(), verified, bad, reply.queue,
                                          reply.service_time)
                for given_up in abandoned:  # every chunk came from elsewhere: stop waiting for it
                    scope = open_requests.pop(given_up, None)
                    if scope is not None:
                        scope.cancel()
            nursery.cancel_scope.cancel()
        self.stats = pull.stats
        if full is not None:
            raise full
        if not pull.done:
            dropped = ", ".join(f"{n} ({why})" for n, why in sorted(pull.stats.dropped.items())) or "none"
            raise RequestError(f"{len(missing) - len(pull.received())} chunks could not be fetched from any holder "
                               f"({', '.join(sorted(self.holders)) or 'none live'}; given up on: {dropped})")

    async def _ask(self, request: Request, scope: trio.CancelScope,
                   events: trio.MemorySendChannel[tuple[Request, ChunkBatch | None]]) -> None:
        """Send one request; its answer, or None (failed, or timed out at its deadline), goes to `events`;
        nothing if it was given up (its scope cancelled by `fetch`)."""
        reply: ChunkBatch | None = None
        with scope:
            try:
                reply = await self.fetcher.transport.ask(self.holders[request.source], IMAGE_CHUNKS,
                                                         Chunks(list(request.chunks)), CALL_TIMEOUT)
            except (RpcError, RequestError) as err:
                log.info("pull: %s failed: %s", request.source, err)
        if scope.cancelled_caught and scope.deadline > trio.current_time():
            return  # given up, not timed out
        await events.send((request, reply))

    def _store(self, chunks: list[tuple[bytes, bytes, int]]) -> tuple[set[bytes], set[bytes]]:
        """Verify and write a reply's chunks (in a worker thread): the ids verified, and the ids whose bytes
        did not match (or that are not of this image)."""
        verified, bad = set(), set()
        for cid, frame, size in chunks:
            try:
                if size != self.sizes.get(cid, -1):
                    raise StoreError(f"chunk {cid.hex()[:16]}: not of this image, or of another size")
                verify_frame(cid, frame, size)
            except StoreError:
                bad.add(cid)
                continue
            verified.add(cid)
            if self.writer.add_stored(cid, frame, size):
                self._uncommitted += len(frame)
        if self._uncommitted >= COMMIT_BYTES:  # what is fetched so far survives an interrupted pull
            self.writer.commit()
            self._uncommitted = 0
        return verified, bad
