"""An agent's image service: its chunk store (`images.store`), the catalogue (`images.catalogue`), and the
`image.*` RPCs (`images.messages`).

Uploads. `image.upload` opens a session with its own pack writer; `image.offer` says which chunks the
store lacks, `image.put` verifies and writes them, `image.commit` checks the manifest against the chunks
and makes everything visible at once, then lists this node as a holder in the catalogue. A session idle
for UPLOAD_IDLE seconds is abandoned with nothing stored.

Pulls (`image.pull`, `images.fetching`) bring an image's missing chunks from its holders; `image.rm`
removes a name no VE uses and has every holder drop its copy; `image.verify` reads every chunk back and
fetches again what was corrupt.

The store is blocking: every call into it runs in a worker thread (`trio.to_thread`, STORE_THREADS at
once).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TypeVar

import trio

from images.boot import BootError, BootImage, materialize, prune
from images.catalogue import Catalogue
from images.fetching import Fetcher
from images.importing import Imported as FileImported
from images.importing import import_file
from images.manifest import MAX_MANIFEST, Manifest, ManifestError
from images.messages import (
    BATCH_BYTES,
    IMAGE_CHUNKS,
    IMAGE_COMMIT,
    IMAGE_DROP,
    IMAGE_GC,
    IMAGE_LIST,
    IMAGE_MANIFEST,
    IMAGE_MANIFEST_PUT,
    IMAGE_OFFER,
    IMAGE_PULL,
    IMAGE_PUT,
    IMAGE_REPLICATE,
    IMAGE_RM,
    IMAGE_SHOW,
    IMAGE_UPLOAD,
    IMAGE_VERIFY,
    SERVE_BYTES,
    ChunkBatch,
    Chunks,
    Commit,
    Copies,
    Digest,
    ImageEntry,
    ImageName,
    Imported,
    ManifestPart,
    ManifestPut,
    ManifestSlice,
    Offer,
    Pulled,
    Put,
    Session,
    Verified,
    check_image_name,
)
from images.replication import targets
from images.store import ChunkStore, CorruptChunk, MissingChunk, PackWriter, StoreError, verify_frame
from overlay.membership import DEAD, LEFT, Membership
from overlay.messages import NoArgs
from overlay.wire.rpc import OPERATOR, Caller, Conflict, Endpoint, Forbidden, NotFound, RequestError

log = logging.getLogger(__name__)
T = TypeVar("T")
UPLOAD_IDLE = 120.0
PULL_TIMEOUT = 3600.0
UPKEEP_INTERVAL = 10.0
STORE_THREADS = 2
BASE_MIN_AGE = 600.0
"""Seconds a base no VM boots is kept by `image gc`: a younger one may be a new VM's, not yet defined."""
Users = Callable[[str], Awaitable[list[str]]]
"""The VEs whose spec names image NAME:TAG (the VE layer's answer, wired in `discovery.agent`)."""


@dataclass
class _Upload:
    name: str
    copies: int
    owner: str
    writer: PackWriter
    last: float
    new_chunks: int = 0
    manifest: bytearray = field(default_factory=bytearray)
    """The manifest's slices sent so far (`image.manifest_put`), for a manifest above one request."""


@dataclass(frozen=True)
class Bases:
    """Where this node makes the bases its real guests boot, and which images its VMs boot now."""

    directory: Path
    in_use: Callable[[], Awaitable[set[str]]]


class ImageService:
    def __init__(self, store: ChunkStore, catalogue: Catalogue, transport: Endpoint, membership: Membership,
                 users: Users, bases: Bases | None = None) -> None:
        self.store, self.catalogue, self.transport, self.membership = store, catalogue, transport, membership
        self.users, self.bases = users, bases
        self.fetcher = Fetcher(store, catalogue, transport, membership, self._in_store)
        self._uploads: dict[str, _Upload] = {}
        self._limiter = trio.CapacityLimiter(STORE_THREADS)
        self._serving = 0

    def serve(self, endpoint: Endpoint) -> None:
        endpoint.route(IMAGE_UPLOAD, self._on_upload)
        endpoint.route(IMAGE_OFFER, self._on_offer)
        endpoint.route(IMAGE_PUT, self._on_put)
        endpoint.route(IMAGE_MANIFEST_PUT, self._on_manifest_put)
        endpoint.route(IMAGE_COMMIT, self._on_commit)
        endpoint.route(IMAGE_LIST, self._on_list)
        endpoint.route(IMAGE_SHOW, self._on_show)
        endpoint.route(IMAGE_MANIFEST, self._on_manifest)
        endpoint.route(IMAGE_CHUNKS, self._on_chunks)
        endpoint.route(IMAGE_PULL, self._on_pull)
        endpoint.route(IMAGE_REPLICATE, self._on_replicate)
        endpoint.route(IMAGE_RM, self._on_rm)
        endpoint.route(IMAGE_VERIFY, self._on_verify)
        endpoint.route(IMAGE_GC, self._on_gc)
        endpoint.route(IMAGE_DROP, self._on_drop)

    async def _in_store(self, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)` on the store, in a worker thread; the store's errors become one-line request errors."""
        try:
            return await trio.to_thread.run_sync(partial(fn, *args), limiter=self._limiter)
        except (StoreError, ManifestError) as err:
            raise RequestError(str(err)) from None

    # -- uploads ------------------------------------------------------------------------------------

    async def _on_upload(self, caller: Caller, request: Copies) -> Session:
        self._expire()
        session = secrets.token_hex(16)
        self._uploads[session] = _Upload(check_image_name(request.name), request.copies, caller.cn,
                                         PackWriter(self.store), trio.current_time())
        return Session(session)

    def _upload(self, caller: Caller, session: str) -> _Upload:
        self._expire()
        upload = self._uploads.get(session)
        if upload is None or upload.owner != caller.cn:
            raise NotFound(f"no upload session {session[:8]}… (expired after {UPLOAD_IDLE:.0f} s idle?)")
        upload.last = trio.current_time()
        return upload

    def _expire(self) -> None:
        now = trio.current_time()
        for session, upload in list(self._uploads.items()):
            if now - upload.last > UPLOAD_IDLE:
                upload.writer.abandon()
                del self._uploads[session]

    async def _on_offer(self, caller: Caller, request: Offer) -> list[int]:
        upload = self._upload(caller, request.session)
        wanted = set(await self._in_store(upload.writer.wants, request.ids))
        return [i for i, cid in enumerate(request.ids) if cid in wanted]

    async def _on_put(self, caller: Caller, request: Put) -> int:
        upload = self._upload(caller, request.session)

        def write() -> int:
            added = 0
            for cid, frame, size in request.chunks:
                verify_frame(cid, frame, size)
                added += upload.writer.add_stored(cid, frame, size)
            return added

        added = await self._in_store(write)
        self.fetcher.moved["uploaded"] += sum(len(frame) for _, frame, _ in request.chunks)
        upload.new_chunks += added
        return added

    async def _on_manifest_put(self, caller: Caller, request: ManifestPut) -> int:
        """Append a slice of the manifest; the bytes held so far."""
        upload = self._upload(caller, request.session)
        if len(upload.manifest) + len(request.data) > MAX_MANIFEST:
            raise RequestError(f"a manifest is at most {MAX_MANIFEST} bytes")
        upload.manifest += request.data
        return len(upload.manifest)

    async def _on_commit(self, caller: Caller, request: Commit) -> Imported:
        upload = self._upload(caller, request.session)
        del self._uploads[request.session]
        body = bytes(upload.manifest + request.manifest)
        try:
            manifest = Manifest.decode(body)
            digest = Manifest.id_of(body)
            taken = await self.catalogue.get(upload.name)
            if taken is not None and taken.digest != digest:
                raise Conflict(f"image {upload.name!r} already exists with other content (digest "
                               f"{taken.digest[:16]}); remove it first or use another tag")
            await self._in_store(upload.writer.commit, body, upload.name)
        except ManifestError as err:
            raise RequestError(str(err)) from None
        finally:
            upload.writer.abandon()
        stored = await self._in_store(self.store.stored_bytes, manifest)
        me = self.membership.me
        entry = ImageEntry(upload.name, digest, manifest.size, len(manifest.chunk_ids()), stored, upload.owner,
                           time.time(), {}, upload.copies)
        await self.catalogue.add_holder(entry, me.name, me.site)
        return Imported(upload.name, digest, manifest.size, len(manifest.chunk_ids()), upload.new_chunks,
                        upload.writer.written)

    # -- reading ------------------------------------------------------------------------------------

    async def _on_list(self, caller: Caller, request: NoArgs) -> list[ImageEntry]:
        return await self.catalogue.list()

    async def _on_show(self, caller: Caller, request: ImageName) -> ImageEntry:
        return await self.catalogue.find(check_image_name(request.name))

    async def _on_manifest(self, caller: Caller, request: ManifestSlice) -> ManifestPart:
        body = await self._in_store(self.store.manifest_body, request.digest)
        if body is None:
            raise NotFound(f"this node holds no manifest {request.digest[:16]}")
        return ManifestPart(body[request.offset:request.offset + BATCH_BYTES], len(body))

    async def _on_chunks(self, caller: Caller, request: Chunks) -> ChunkBatch:
        """The asked chunks this store holds, up to SERVE_BYTES; a corrupt one is left out (and dropped
        here: `verify` or the next pull fetches it again)."""
        queue = self._serving
        self._serving += 1
        started = time.perf_counter()
        try:
            def read() -> list[tuple[bytes, bytes, int]]:
                out: list[tuple[bytes, bytes, int]] = []
                total = 0
                for cid in request.ids:
                    try:
                        frame, size = self.store.read_stored(cid)
                    except (MissingChunk, CorruptChunk):
                        continue
                    if out and total + len(frame) > SERVE_BYTES:
                        break
                    out.append((cid, frame, size))
                    total += len(frame)
                return out

            chunks = await self._in_store(read)
        finally:
            self._serving -= 1
        self.fetcher.moved["served"] += sum(len(frame) for _, frame, _ in chunks)
        return ChunkBatch(chunks, queue, time.perf_counter() - started)

    # -- pulls, removal, upkeep ---------------------------------------------------------------------

    async def _on_pull(self, caller: Caller, request: ImageName) -> Pulled:
        return await self.fetcher.pull(check_image_name(request.name))

    # -- for this node's VMs (`agents.host.base.NodeImages`) ------------------------------------------

    async def bring(self, image: str) -> str:
        """Make this node hold image NAME[:TAG], pulling only the chunks it lacks; its manifest digest."""
        return (await self.fetcher.pull(check_image_name(image))).digest

    async def boot(self, digest: str, bases: Path) -> BootImage:
        """Image `digest` ready to boot: its base under `bases`, made from this store the first time."""
        try:
            return await trio.to_thread.run_sync(materialize, self.store, bases, digest, limiter=self._limiter)
        except BootError as err:
            raise RequestError(str(err)) from None

    async def publish(self, path: Path, name: str, owner: str, copies: int) -> FileImported:
        """Import the raw or qcow2 file at `path` into this store as image `name` (storing only the chunks it
        lacks), owned by `owner`, kept on `copies` live holders, this node the first: how a host turns a VM's
        disk into a shipped snapshot (`agents.host.snapshot_images`). Conflict if the name is taken."""
        name = check_image_name(name)
        if await self.catalogue.get(name) is not None:
            raise Conflict(f"image {name!r} already exists; use another tag")
        try:
            done = await trio.to_thread.run_sync(partial(import_file, self.store, path, name=name),
                                                 limiter=self._limiter)
        except StoreError as err:
            raise RequestError(str(err)) from None
        manifest = await self._in_store(self.store.manifest, done.digest)
        assert manifest is not None, "committed by the import"
        stored = await self._in_store(self.store.stored_bytes, manifest)
        me = self.membership.me
        entry = ImageEntry(name, done.digest, done.size, done.chunks, stored, owner, time.time(), {}, copies)
        await self.catalogue.add_holder(entry, me.name, me.site)
        return done

    async def _on_replicate(self, caller: Caller, request: Copies) -> ImageEntry:
        return await self.replicate(check_image_name(request.name), request.copies)

    async def replicate(self, name: str, copies: int) -> ImageEntry:
        """Keep `copies` live holders of image `name` from now on, and have nodes pull it until it has them."""
        await self.catalogue.find(name)
        entry = await self.catalogue.change(name, lambda e: e if e is None else replace(e, copies=copies))
        assert entry is not None
        failed = await self._replicate(entry)
        entry = await self.catalogue.find(name)
        if failed:
            raise RequestError(f"image {name!r} has {len(entry.holders)} holders; pulls failed: {'; '.join(failed)}")
        return entry

    async def _replicate(self, entry: ImageEntry) -> list[str]:
        """Have the nodes `images.replication.targets` names pull the image; the pulls that failed."""
        members = {m.name: m for m in self.membership.alive()}
        chosen = targets(entry, {n: m.site for n, m in members.items()}, entry.copies)
        answers = await self.transport.call_many([members[n].addr for n in chosen], IMAGE_PULL.name,
                                                 {"name": entry.name}, PULL_TIMEOUT)
        return [f"{n}: {answers[members[n].addr]}" for n in chosen
                if isinstance(answers[members[n].addr], Exception)]

    async def upkeep(self) -> None:
        """The catalogue's anti-entropy, run periodically by every agent over the images it holds (so each
        round costs a node one catalogue read per image it holds, not a scan of the catalogue): list this node
        again under one it holds whole (after a restart, say), and, for each of which it is the first live
        holder by name, drop the holders membership knows are dead and have new ones pull it until it has its
        `copies` live holders over the sites again. A name the catalogue no longer gives this content is
        forgotten here."""
        me = self.membership.me
        live = {m.name for m in self.membership.alive()}
        gone = {n for n, m in self.membership.members.items() if n not in live and m.status in (DEAD, LEFT)}
        for name, digest in sorted((await self._in_store(self.store.names)).items()):
            entry = await self.catalogue.get(name)
            if entry is None or entry.digest != digest:
                await self._in_store(self.store.forget_name, name)
                continue
            if me.name not in entry.holders:
                entry = await self.catalogue.add_holder(entry, me.name, me.site)
            if min((n for n in entry.holders if n in live), default=None) != me.name:
                continue
            for node in sorted(set(entry.holders) & gone):
                entry = await self.catalogue.drop_holder(entry.name, node) or entry
            if len(set(entry.holders) & live) < entry.copies:
                failed = await self._replicate(entry)
                if failed:
                    log.info("image %s: upkeep pulls failed: %s", entry.name, "; ".join(failed))

    async def _on_rm(self, caller: Caller, request: ImageName) -> ImageEntry:
        name = check_image_name(request.name)
        entry = await self.catalogue.find(name)
        if caller.role != OPERATOR and caller.cn != entry.owner:
            raise Forbidden(f"image {name!r} belongs to {entry.owner!r}; {caller.cn!r} may not remove it")
        return await self.remove(name)

    async def get(self, name: str) -> ImageEntry | None:
        """Image `name`'s catalogue entry (None: no such image)."""
        return await self.catalogue.get(name)

    async def remove(self, name: str) -> ImageEntry:
        """Remove image `name` (NotFound: there is none) and have its holders drop it unless another name holds
        the same content; Conflict while a VE's spec names it. `image rm` after its ownership check, and the
        pruning of shipped snapshots (`discovery.ve.shipping`)."""
        entry = await self.catalogue.find(name)
        users = await self.users(name)
        if users:
            raise Conflict(f"image {name!r} is used by VE {', '.join(sorted(users))}; destroy "
                           f"{'it' if len(users) == 1 else 'them'} first")
        await self.catalogue.remove(name)
        if not any(e.digest == entry.digest for e in await self.catalogue.list()):
            members = {m.name: m.addr for m in self.membership.alive()}
            addrs = [members[n] for n in entry.holders if n in members]
            await self.transport.call_many(addrs, IMAGE_DROP.name, {"digest": entry.digest}, 30.0)
        return replace(entry, holders={})

    async def _on_drop(self, caller: Caller, request: Digest) -> bool:
        return await self._in_store(self.store.remove_manifest, request.digest)

    async def _on_verify(self, caller: Caller, request: ImageName) -> Verified:
        """Read every chunk of the image here back and check it; fetch again from the other holders what
        was corrupt (the store drops a corrupt chunk as it reads it)."""
        name = check_image_name(request.name)
        entry = await self.catalogue.find(name)
        manifest = await self._in_store(self.store.manifest, entry.digest)
        if manifest is None:
            raise NotFound(f"this node does not hold image {name!r} (holders: {', '.join(sorted(entry.holders))})")
        corrupt = await self._in_store(self.store.check, manifest)
        refetched = (await self.fetcher.pull(name)).fetched_chunks if corrupt else 0
        return Verified(name, entry.digest, len(manifest.chunk_ids()), corrupt, refetched)

    async def _on_gc(self, caller: Caller, request: NoArgs) -> dict[str, int]:
        """The store's garbage collection, then the bases (`images.boot`) no VM on this node boots."""
        freed = await self._in_store(self.store.gc)
        if self.bases is not None:
            keep = await self.bases.in_use()
            removed = await trio.to_thread.run_sync(prune, self.bases.directory, keep, BASE_MIN_AGE)
            freed["bases_removed"] = len(removed)
        return freed
