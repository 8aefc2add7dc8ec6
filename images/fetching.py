"""Pulling an image to this node: its manifest, then the chunks this store lacks, from several holders at once.

`images.pulling.Pull` (sans-IO) decides which chunks to ask of which live holder and when: C3-ranked
holders under rate control and a window each, an endgame that re-requests what a slow or dead holder
holds up, liars dropped. This is its trio shell: it sends each request (`image.chunks`) in a task of its
own with the request's deadline, which also verifies every chunk of the reply against its id, tells the
core which verified and which did not, and cancels the requests the core gives up. The loop that feeds
the core neither checks nor writes: replies are checked side by side in their tasks, and what verified
goes to a writer task (WRITE_BACKLOG replies ahead of it at most), so that the next requests leave at
once whatever the CPU or the disk is doing (a commit's fsync can take a second): the holders' windows
are short, and a holder left without a request idles its uplink. Fetched chunks are committed to the
store every COMMIT_BYTES, so an interrupted pull resumes from what it had (a new `Pull` over what the
store still lacks); the writer has written everything before the manifest lands, last, and only then is
this node listed as a holder.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
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
WRITE_BACKLOG = 16
"""Verified replies waiting for the writer at most (32 MiB): past them, a disk slower than the network holds
the requests back."""
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


Stored = tuple[bytes, bytes, int]
"""A chunk as it travels and is stored: its id, its zstd frame, its size."""


@dataclass(frozen=True)
class _Checked:
    """A reply, its chunks verified by the task that received it."""

    batch: ChunkBatch
    good: list[Stored]
    bad: set[bytes]


class _Run:
    """One pull's chunk transfers: `images.pulling.Pull` decides what to ask of whom and when; this sends the
    requests, times them out, verifies and writes what comes back, and reports it."""

    def __init__(self, fetcher: Fetcher, sizes: dict[bytes, int], holders: dict[str, str]) -> None:
        self.fetcher, self.sizes, self.holders = fetcher, sizes, holders
        self.writer = PackWriter(fetcher.store)
        self.stats: PullStats | None = None
        self._uncommitted = 0
        self._write_error: RequestError | OSError | None = None

    async def fetch(self, missing: list[bytes]) -> None:
        pull = Pull([(cid, self.sizes[cid]) for cid in missing], list(self.holders), trio.current_time(),
                    random.Random())
        to_write, writes = trio.open_memory_channel[list[Stored]](WRITE_BACKLOG)
        async with trio.open_nursery() as writing:
            writing.start_soon(self._writer, writes, writing.cancel_scope)
            async with to_write:  # closed when the loop ends: the writer drains what is left, then returns
                await self._loop(pull, to_write)
        self.stats = pull.stats
        if self._write_error is not None:
            raise self._write_error
        if not pull.done:
            dropped = ", ".join(f"{n} ({why})" for n, why in sorted(pull.stats.dropped.items())) or "none"
            raise RequestError(f"{len(missing) - len(pull.received())} chunks could not be fetched from any holder "
                               f"({', '.join(sorted(self.holders)) or 'none live'}; given up on: {dropped})")

    async def _loop(self, pull: Pull, to_write: trio.MemorySendChannel[list[Stored]]) -> None:
        """Feed the core until the pull is done or has failed: send what it asks for, report what comes back."""
        send, events = trio.open_memory_channel[tuple[Request, _Checked | None]](math.inf)
        open_requests: dict[int, trio.CancelScope] = {}
        async with trio.open_nursery() as asking:
            while not pull.done and not pull.failed:
                for request in pull.requests(trio.current_time()):
                    open_requests[request.id] = trio.CancelScope(deadline=request.deadline)
                    asking.start_soon(self._ask, request, open_requests[request.id], send)
                wakeup = pull.wakeup(trio.current_time())
                event: tuple[Request, _Checked | None] | None = None
                with trio.move_on_at(math.inf if wakeup is None else wakeup):  # only the wait: an answer taken
                    event = await events.receive()  # is always reported to the core, whatever the clock says
                if event is None:
                    continue
                request, reply = event
                open_requests.pop(request.id, None)
                if reply is None:
                    pull.on_failure(request.id, trio.current_time())
                    continue
                self.fetcher.moved["pulled"] += sum(len(frame) for _, frame, _ in reply.good)
                await to_write.send(reply.good)
                abandoned = pull.on_reply(request.id, trio.current_time(), {cid for cid, _, _ in reply.good},
                                          reply.bad, reply.batch.queue, reply.batch.service_time)
                for given_up in abandoned:  # every chunk came from elsewhere: stop waiting for it
                    scope = open_requests.pop(given_up, None)
                    if scope is not None:
                        scope.cancel()
            asking.cancel_scope.cancel()

    async def _ask(self, request: Request, scope: trio.CancelScope,
                   events: trio.MemorySendChannel[tuple[Request, _Checked | None]]) -> None:
        """Send one request; its answer, checked, or None (failed, or timed out at its deadline), goes to
        `events`; nothing if it was given up (its scope cancelled by `_loop`)."""
        reply: ChunkBatch | None = None
        with scope:
            try:
                reply = await self.fetcher.transport.ask(self.holders[request.source], IMAGE_CHUNKS,
                                                         Chunks(list(request.chunks)), CALL_TIMEOUT)
            except (RpcError, RequestError) as err:
                log.info("pull: %s failed: %s", request.source, err)
        if scope.cancelled_caught and scope.deadline > trio.current_time():
            return  # given up, not timed out
        checked = None if reply is None else _Checked(reply, *await self.fetcher.in_store(self._verify, reply.chunks))
        await events.send((request, checked))

    def _verify(self, chunks: list[Stored]) -> tuple[list[Stored], set[bytes]]:
        """A reply's chunks that verified, and the ids whose bytes did not match (or that are not of this
        image); in a worker thread."""
        good, bad = [], set()
        for cid, frame, size in chunks:
            try:
                if size != self.sizes.get(cid, -1):
                    raise StoreError(f"chunk {cid.hex()[:16]}: not of this image, or of another size")
                verify_frame(cid, frame, size)
            except StoreError:
                bad.add(cid)
                continue
            good.append((cid, frame, size))
        return good, bad

    async def _writer(self, writes: trio.MemoryReceiveChannel[list[Stored]], pull: trio.CancelScope) -> None:
        """Write what verified, in order, until the loop is over; a write that fails (a full disk) stops the
        pull with its error."""
        async with writes:
            async for chunks in writes:
                try:
                    await self.fetcher.in_store(self._write, chunks)
                except (RequestError, OSError) as err:  # OSError: a full disk (`Fetcher.pull` says so in one line)
                    self._write_error = err
                    pull.cancel()
                    return

    def _write(self, chunks: list[Stored]) -> None:
        """Write verified chunks (in a worker thread), committing every COMMIT_BYTES: what is fetched so far
        survives an interrupted pull."""
        for cid, frame, size in chunks:
            if self.writer.add_stored(cid, frame, size):
                self._uncommitted += len(frame)
        if self._uncommitted >= COMMIT_BYTES:
            self.writer.commit()
            self._uncommitted = 0
