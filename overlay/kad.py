"""Kademlia as a second overlay: the Chord DHT's record semantics on the `kademlia` package, with signed values.

Why trio-asyncio. The `kademlia` package (on `rpcudp`) is asyncio code; agents are trio programs.
trio-asyncio runs an asyncio loop as a task of the trio program, so the package runs unmodified
next to everything else, and each call into it is wrapped with `trio_asyncio.aio_as_trio`, which
also carries trio cancellation (`trio.fail_after`, nursery cancellation) into the asyncio tasks.
There is one such loop per process and it must enclose the lifetime of every overlay::

    async with trio_asyncio.open_loop():
        kad = KademliaOverlay(identity)
        await kad.start("0.0.0.0", 7400, [("10.0.0.1", 7400)])
        try:
            ...  # the agent's nursery: services use kad.get/put/delete, or a Binding on it
        finally:
            await kad.close()

`start` refuses to run outside such a loop. The overlay keeps a reference to the loop, so tasks of
the agent may use it wherever they were spawned.

Records. As in `overlay.dht`: `Record(key, value, version, writer)`, the higher (version, writer)
wins, `put` with `after=None` writes one more than the newest version found, a delete writes a
tombstone (value None). There is no conditional write (`put_if` refuses, see there), and a tombstone
lives as long as any value (republished hourly by its holders). A record lives on the k nodes closest
to sha1(key) (k = `ksize`, 20), plus this node when it is one of them. A read asks all k, keeps the
newest copy that verifies and writes it back to those that held an older or no copy; a write needs
`w` acknowledgements (fewer if fewer nodes exist). Storage is the package's in-memory storage,
republished hourly by its holders: a record lives as long as some holder runs; nothing is persisted,
unlike the Chord shard.

Envelope. The package speaks unauthenticated UDP, so every stored value is a msgpack envelope::

    [MAGIC, body: bin, certificate: bin (DER), signature: bin]
    body = msgpack [key, version, writer, "inline", packed value: bin]
         | msgpack [key, version, writer, "chunks", [sha256 of each chunk: bin, ...]]

The signature is ECDSA P-256/SHA-256 by the writer's key over SIGNING_CONTEXT + body. The writer's
certificate travels in the envelope (about 500 bytes) rather than being resolved from membership:
a record outlives the membership view of its writer (a departed node, a reader that has not heard of
it yet), and the envelope is then verifiable anywhere with only the cluster CA. An envelope is
trusted only if the certificate is issued by the cluster CA (signature checked, not just the issuer
name), is valid now, is not a CA, holds a P-256 key, has role "node" (agents write, clients and
operators act through them), its CN equals the writer field, and the signature verifies. The reader
also checks that the key in the body is the key it asked for. Anything else - forged (another CA, a
self-made certificate), tampered, unsigned, not bytes - is logged and treated as absent; it never
raises to the caller. Nodes check the same on store (`VerifyingStorage`), so a forged value cannot
displace a genuine one where it is held, nor an old genuine envelope roll a newer one back.

Limits. rpcudp refuses a request whose packed arguments exceed 8 KiB (DATAGRAM_LIMIT), and the
package stores scalars only. So values are msgpack-packed to bytes and every stored value is at most
MAX_STORED bytes: an envelope that would be larger is split. The packed value is cut into chunks of
MAX_STORED bytes, each stored under a key derived from its SHA-256 (CHUNK_PREFIX + hex; that prefix
is refused for record keys), and the envelope under the record's key carries the list of hashes
instead of the value: the manifest, whose signature covers every chunk through its hash; the list of
hashes is also the list of chunk keys. Content-addressed chunks are never overwritten, so a reader of
an older manifest still finds its chunks while a newer version is written; chunks are written before
their manifest. Values larger than MAX_VALUE_BYTES (512 KiB) packed are refused with `ValueTooLarge`
before anything is sent; so would be a manifest too large for one datagram, which the key limit
(MAX_KEY_BYTES) and the value limit together rule out (the tests check the worst case). A chunk that
no node can supply with the right hash makes `get` raise `KademliaError` (unavailable, not forged).

Protected: integrity and authenticity of every value (only a node certified by the cluster CA can
write a record that readers accept, and only under its own name), and the version order (a replayed
older envelope loses). Not protected: availability - anyone who can send UDP can flood nodes, answer
lookups with bogus contacts, claim node ids near a key (Sybil/eclipse: node ids are not certified),
withhold or drop values, or fill storage with content-addressed chunks; confidentiality - values
travel and rest in clear; freshness against an attacker who controls all k holders of a key (it can
serve an older genuine version); revocation - there is no CRL, so a compromised node certificate is
trusted until it expires; and a record whose writer's certificate has expired becomes unreadable
until it is rewritten.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import msgpack
import trio_asyncio
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from kademlia.crawling import NodeSpiderCrawl
from kademlia.network import Server
from kademlia.node import Node
from kademlia.storage import ForgetfulStorage
from kademlia.utils import digest

from overlay.dht import Record
from overlay.wire import tls
from overlay.wire.rpc import RequestError

log = logging.getLogger(__name__)
T = TypeVar("T")

DATAGRAM_LIMIT = 8192
"""rpcudp refuses to send a request whose packed method name and arguments exceed this."""
STORE_OVERHEAD = 64
"""What a store request packs around the value: ["store", [sender id, key digest, value]] takes 55 bytes."""
MAX_STORED = DATAGRAM_LIMIT - STORE_OVERHEAD
MAX_VALUE_BYTES = 512 * 1024
MAX_KEY_BYTES = 1024
CHUNK_PREFIX = "discovery-kad-chunk/"
MAGIC = "discovery-kad/1"
SIGNING_CONTEXT = b"discovery-kad/1 record\x00"
"""Prefixed to what is signed, so a record signature can never pass for a signature made elsewhere."""
WRITER_ROLE = "node"
PARALLEL_TRANSFERS = 8


class KademliaError(Exception):
    """The overlay could not complete an operation: nobody answered, too few stored, a chunk is missing."""


class ValueTooLarge(ValueError):
    """A value refused before anything is sent, because it exceeds what the overlay can carry."""


class Forged(ValueError):
    """A value that does not verify; whoever receives it logs why and treats it as absent."""


@dataclass(frozen=True)
class Envelope:
    """A verified envelope. A chunked value carries the hashes of its chunks instead of the value."""

    key: str
    version: int
    writer: str
    value: Any
    chunks: tuple[bytes, ...] | None
    blob: bytes  # as stored, to copy to holders of an older version

    @property
    def order(self) -> tuple[int, str]:
        return self.version, self.writer


def chunk_digest(sha256: bytes) -> bytes:
    """Where the chunk with this hash is stored."""
    return digest(CHUNK_PREFIX + sha256.hex())


class Keyring:
    """A writer's key and certificate and the cluster CA: seals records into envelopes and verifies them."""

    def __init__(self, identity: tls.Identity) -> None:
        try:
            self.cert = x509.load_pem_x509_certificate(identity.cert.read_bytes())
            key = serialization.load_pem_private_key(identity.key.read_bytes(), password=None)
            self.ca = x509.load_pem_x509_certificate(identity.ca.read_bytes())
        except (OSError, ValueError, TypeError) as err:
            raise tls.TLSError(f"cannot load identity {identity.cert}: {err}") from err
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise tls.TLSError(f"the key {identity.key} is not an EC key")
        self._key = key
        self._cert_der = self.cert.public_bytes(serialization.Encoding.DER)

    def seal(self, record: Record) -> tuple[bytes, list[bytes]]:
        """The envelope of `record` and, when the value does not fit in it, the chunks its manifest lists."""
        packed = msgpack.packb(record.value, use_bin_type=True)
        if len(packed) > MAX_VALUE_BYTES:
            raise ValueTooLarge(f"the value of {record.key!r} packs to {len(packed)} bytes; "
                                f"the limit is {MAX_VALUE_BYTES}")
        head = [record.key, record.version, record.writer]
        if len(packed) < MAX_STORED:  # otherwise it cannot fit with the envelope around it
            blob = self._envelope([*head, "inline", packed])
            if len(blob) <= MAX_STORED:
                return blob, []
        chunks = [packed[i:i + MAX_STORED] for i in range(0, len(packed), MAX_STORED)]
        blob = self._envelope([*head, "chunks", [hashlib.sha256(c).digest() for c in chunks]])
        if len(blob) > MAX_STORED:
            raise ValueTooLarge(f"the manifest of {record.key!r} needs {len(blob)} bytes; one datagram carries "
                                f"{MAX_STORED} (shorten the key)")
        return blob, chunks

    def _envelope(self, fields: list[Any]) -> bytes:
        body = msgpack.packb(fields, use_bin_type=True)
        signature = self._key.sign(SIGNING_CONTEXT + body, ec.ECDSA(hashes.SHA256()))
        return msgpack.packb([MAGIC, body, self._cert_der, signature], use_bin_type=True)

    def open(self, raw: Any) -> Envelope:
        """Verify a value received from anyone; raises Forged saying why it is not to be trusted."""
        try:
            return self._open(raw)
        except Forged:
            raise
        except InvalidSignature as err:
            raise Forged("the signature does not match the certificate and body") from err
        except (ValueError, TypeError, msgpack.UnpackException, x509.ExtensionNotFound) as err:
            raise Forged(f"{type(err).__name__}: {err}") from err

    def _open(self, raw: Any) -> Envelope:
        if not isinstance(raw, bytes):
            raise Forged(f"a {type(raw).__name__}, not an envelope")
        outer = msgpack.unpackb(raw, raw=False)
        if not (isinstance(outer, list) and len(outer) == 4 and outer[0] == MAGIC
                and all(isinstance(part, bytes) for part in outer[1:])):
            raise Forged("not an envelope")
        _, body, cert_der, signature = outer
        cert = x509.load_der_x509_certificate(cert_der)
        signer = self.check(cert)
        key = cert.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey):  # `check` admits the CA's P-256 certificates only
            raise Forged("the signer's key is not an EC key")
        key.verify(signature, SIGNING_CONTEXT + body, ec.ECDSA(hashes.SHA256()))
        fields = msgpack.unpackb(body, raw=False)
        if not (isinstance(fields, list) and len(fields) == 5):
            raise Forged("malformed body")
        key, version, writer, kind, data = fields
        if not (isinstance(key, str) and type(version) is int and version >= 1 and writer == signer):
            raise Forged(f"malformed record, or writer {writer!r} is not the signer {signer!r}")
        if kind == "inline" and isinstance(data, bytes):
            return Envelope(key, version, writer, _unpack_value(data), None, raw)
        if kind == "chunks" and isinstance(data, list) and data and all(
                isinstance(h, bytes) and len(h) == 32 for h in data):
            return Envelope(key, version, writer, None, tuple(data), raw)
        raise Forged(f"unknown payload {kind!r}")

    def check(self, cert: x509.Certificate) -> str:
        """The writer name `cert` vouches for, if the cluster CA issued it to a node and it is valid now."""
        try:
            cert.verify_directly_issued_by(self.ca)
        except (ValueError, TypeError, InvalidSignature) as err:
            raise Forged(f"certificate {cert.subject.rfc4514_string()!r} is not issued by the cluster CA") from err
        now = datetime.datetime.now(datetime.UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise Forged(f"certificate {cert.subject.rfc4514_string()!r} is not valid now")
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise Forged("a CA certificate does not write records")
        public_key = cert.public_key()
        if not (isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(public_key.curve, ec.SECP256R1)):
            raise Forged("the certificate's key is not EC P-256")
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        roles = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
        if len(names) != 1 or [r.value for r in roles] != [WRITER_ROLE]:
            raise Forged(f"certificate {cert.subject.rfc4514_string()!r} is not a {WRITER_ROLE} certificate")
        return str(names[0].value)


class VerifyingStorage(ForgetfulStorage):
    """The package's in-memory storage, keeping only chunks that match their key and envelopes that
    verify, are stored under their own key, and are not older than what is held."""

    def __init__(self, keyring: Keyring) -> None:
        super().__init__()
        self.keyring = keyring

    def __setitem__(self, dkey: bytes, value: Any) -> None:
        if isinstance(value, bytes) and dkey == chunk_digest(hashlib.sha256(value).digest()):
            super().__setitem__(dkey, value)
            return
        try:
            envelope = self.keyring.open(value)
        except Forged as err:
            log.warning("refusing to store a value under %s: %s", dkey.hex(), err)
            return
        if digest(envelope.key) != dkey:
            log.warning("refusing to store the record of %r under %s", envelope.key, dkey.hex())
            return
        held = self.get(dkey)
        try:
            if held is not None and self.keyring.open(held).order > envelope.order:
                return  # an older version: keep the newer one
        except Forged:
            pass  # what was held no longer verifies (its certificate expired): replace it
        super().__setitem__(dkey, value)


class KademliaOverlay:
    """Signed, versioned records on a Kademlia network, for trio code (see the module docstring)."""

    def __init__(self, identity: tls.Identity, *, ksize: int = 20, alpha: int = 3, w: int = 2,
                 timeout: float = 2.0, delay: float = 0.0) -> None:
        """`timeout`: how long a request waits for its answer (the package's 5 s made every dead contact
        cost 5 s; 2 s is the Chord hop timeout). `delay`: seconds every datagram sent waits first, to
        emulate latency on a local cluster."""
        self.keyring = Keyring(identity)
        try:
            self.name = self.keyring.check(self.keyring.cert)
        except Forged as err:
            raise tls.TLSError(f"{identity.cert} cannot sign overlay records: {err}") from err
        self.w = w
        self._server = Server(ksize, alpha, storage=VerifyingStorage(self.keyring))
        self._loop: asyncio.AbstractEventLoop | None = None
        self.delay = delay
        self.timeout = timeout

    @property
    def port(self) -> int:
        """The UDP port this node listens on (useful after starting on port 0)."""
        return int(self._server.transport.get_extra_info("sockname")[1])

    async def start(self, listen_host: str, port: int, bootstrap: list[tuple[str, int]]) -> int:
        """Listen (port 0 picks a free one; returns the port) and join through `bootstrap` (IP
        addresses; empty for the first node). Raises KademliaError if no bootstrap contact answers."""
        self._loop = trio_asyncio.current_loop.get()
        if self._loop is None:
            raise RuntimeError("KademliaOverlay runs on trio-asyncio: start it inside "
                               "`async with trio_asyncio.open_loop():`")
        await self._aio(self._server.listen, port, listen_host)
        self._server.protocol._wait_timeout = self.timeout  # rpcudp takes it only as a constructor argument
        if self.delay > 0:
            protocol = self._server.protocol
            protocol.transport = _DelayedSends(protocol.transport, self.delay, self._loop)
        if bootstrap and not await self._aio(self._server.bootstrap, bootstrap):
            await self.close()
            raise KademliaError(f"no bootstrap contact answered among {bootstrap}")
        return self.port

    async def join(self, bootstrap: list[tuple[str, int]]) -> bool:
        """Join (or re-join) through `bootstrap` contacts (IP addresses); True if one answered."""
        await self._aio(self._server.bootstrap, bootstrap)
        return self.neighbours() > 0

    def neighbours(self) -> int:
        """How many contacts the routing table holds: 0 before joining or after losing every one."""
        return sum(len(bucket.nodes) for bucket in self._server.protocol.router.buckets)

    async def close(self) -> None:
        """Stop listening and cancel the package's timers. Call before the trio-asyncio loop exits."""
        if self._loop is not None:
            await self._aio(self._stop)
            self._loop = None

    async def _stop(self) -> None:
        self._server.stop()

    async def get(self, key: str) -> Record | None:
        """The live record for `key`, or None if it is absent, deleted, or only forged copies exist."""
        record = await self.get_record(key)
        return None if record is None or record.deleted else record

    async def get_record(self, key: str) -> Record | None:
        """The newest verified record of `key`, tombstones included. Raises KademliaError if nodes
        are known but none answers, or a chunked value cannot be assembled."""
        newest = await self._newest(key)
        return None if newest is None else await self.record_of(newest)

    async def record_of(self, envelope: Envelope) -> Record:
        """The record an envelope carries, its chunks fetched and assembled if it has any."""
        value = envelope.value if envelope.chunks is None else await self._assemble(envelope.key, envelope.chunks)
        return Record(envelope.key, value, envelope.version, envelope.writer)

    def local_envelopes(self, prefix: str) -> list[Envelope]:
        """The verified records this node holds whose key starts with `prefix`: Kademlia cannot list a
        key space, so a listing asks every node for this (`agents.overlays`)."""
        found = []
        for _, raw in self._server.storage:
            try:
                envelope = self.keyring.open(raw)
            except Forged:
                continue  # a chunk, or what no longer verifies
            if envelope.key.startswith(prefix):
                found.append(envelope)
        return found

    async def put(self, key: str, value: Any, after: int | None = None) -> Record:
        """Write version `after + 1` of `key` (after=None: one more than the newest version found)."""
        _check_key(key)
        if after is None:
            current = await self._newest(key)
            after = current.version if current is not None else 0
        record = Record(key, value, after + 1, self.name)
        blob, chunks = self.keyring.seal(record)
        if chunks:  # before the manifest, so whoever reads the manifest finds them
            await self._aio(self._write_all, [(chunk_digest(hashlib.sha256(c).digest()), c) for c in chunks])
        await self._aio(self._write_all, [(digest(key), blob)])
        return record

    async def put_if(self, key: str, value: Any, expect: Record | None) -> Record:
        """Refused: a compare-and-set needs each holder to grant one writer at a time, and the package's
        `store` is unconditional (any node may overwrite any key's holders, and the k holders of a key
        differ between lookups). A write-then-read-back would let two writers both see their own copy
        first. So nothing is written; a service that needs it (creating a VE) asks for the Chord binding."""
        raise RequestError(f"the Kademlia overlay cannot write {key!r} conditionally (no majority of holders "
                           "decides a write); re-bind the records to chord (`discovery overlay bind chord`)")

    async def update(self, key: str, value: Any, expect: Record | None) -> Record:
        """A versioned write after `expect`, not a compare-and-set (see `put_if`): of two writers after one
        version, the higher (version, writer) wins everywhere."""
        return await self.put(key, value, after=expect.version if expect is not None else None)

    async def delete(self, key: str, after: int | None = None) -> Record:
        return await self.put(key, None, after)

    async def _aio(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        if self._loop is None:
            raise RuntimeError("the Kademlia overlay is not started, or closed")
        return await trio_asyncio.aio_as_trio(fn, loop=self._loop)(*args)

    async def _newest(self, key: str) -> Envelope | None:
        """The newest copy that verifies; holders of an older or no copy get the newest."""
        _check_key(key)
        dkey = digest(key)
        opened = [(node, self._open(key, raw, node)) for node, raw in await self._aio(self._collect, dkey)]
        found = [envelope for _, envelope in opened if envelope is not None]
        if not found:
            return None
        newest = max(found, key=lambda e: e.order)
        stale = [node for node, envelope in opened if envelope is None or envelope.order < newest.order]
        if stale:
            await self._aio(self._store_on, dkey, newest.blob, stale)
        return newest

    def _open(self, key: str, raw: Any, node: Node | None) -> Envelope | None:
        if raw is None:
            return None
        try:
            envelope = self.keyring.open(raw)
        except Forged as err:
            log.warning("ignoring a value of %r from %s: %s", key, _where(node), err)
            return None
        if envelope.key != key:
            log.warning("ignoring the record of %r served for %r by %s", envelope.key, key, _where(node))
            return None
        return envelope

    async def _assemble(self, key: str, chunks: tuple[bytes, ...]) -> Any:
        packed = b"".join(await self._aio(self._fetch_chunks, chunks))
        try:
            return _unpack_value(packed)
        except (ValueError, msgpack.UnpackException) as err:
            raise KademliaError(f"the chunks of {key!r} do not unpack: {err}") from err

    # -- asyncio side: these run in the trio-asyncio loop --------------------------------------------

    async def _replicas(self, dkey: bytes) -> tuple[list[Node], bool]:
        """The k nodes closest to `dkey` that answer, and whether this node is one of the k closest."""
        target = Node(dkey)
        protocol = self._server.protocol
        nearest = protocol.router.find_neighbors(target)
        if not nearest:
            return [], True  # alone in the network
        nodes = await NodeSpiderCrawl(protocol, target, nearest, self._server.ksize, self._server.alpha).find()
        if not nodes:
            raise KademliaError("no node of the overlay answered")
        farthest = max(n.distance_to(target) for n in nodes)
        return nodes, len(nodes) < self._server.ksize or self._server.node.distance_to(target) < farthest

    async def _collect(self, dkey: bytes) -> list[tuple[Node | None, Any]]:
        """What each of the k closest nodes that answer holds under `dkey` (None: nothing); this node
        is None, included when it is one of them."""
        nodes, local = await self._replicas(dkey)
        target = Node(dkey)
        answers = await asyncio.gather(*(self._server.protocol.call_find_value(n, target) for n in nodes))
        copies: list[tuple[Node | None, Any]] = [
            (node, answer[1].get("value") if isinstance(answer[1], dict) else None)
            for node, answer in zip(nodes, answers, strict=True) if answer[0]
        ]
        if local:
            copies.append((None, self._server.storage.get(dkey)))
        return copies

    async def _store_on(self, dkey: bytes, blob: bytes, targets: list[Node | None]) -> int:
        """Store on each target (None: this node); how many acknowledged."""
        remote = [t for t in targets if t is not None]
        answers = await asyncio.gather(*(self._server.protocol.call_store(n, dkey, blob) for n in remote))
        if len(remote) < len(targets):
            self._server.storage[dkey] = blob
        return len(targets) - len(remote) + sum(1 for ok, reply in answers if ok and reply is True)

    async def _write(self, dkey: bytes, blob: bytes) -> None:
        nodes, local = await self._replicas(dkey)
        targets: list[Node | None] = [*nodes, None] if local else list(nodes)
        acks = await self._store_on(dkey, blob, targets)
        if acks < min(self.w, len(targets)):
            raise KademliaError(f"a write under {dkey.hex()} reached {acks} of {len(targets)} nodes")

    async def _write_all(self, items: list[tuple[bytes, bytes]]) -> None:
        await _gather_bounded([self._write(dkey, blob) for dkey, blob in items])

    async def _fetch_chunks(self, hashes: tuple[bytes, ...]) -> list[bytes]:
        return await _gather_bounded([self._fetch_chunk(sha) for sha in hashes])

    async def _fetch_chunk(self, sha: bytes) -> bytes:
        """The chunk with this hash from the first holder, nearest first, that has it intact."""
        dkey = chunk_digest(sha)
        held = self._server.storage.get(dkey)
        if isinstance(held, bytes) and hashlib.sha256(held).digest() == sha:
            return held
        target = Node(dkey)
        for node in (await self._replicas(dkey))[0]:
            ok, answer = await self._server.protocol.call_find_value(node, target)
            value = answer.get("value") if ok and isinstance(answer, dict) else None
            if isinstance(value, bytes) and hashlib.sha256(value).digest() == sha:
                return value
            if value is not None:
                log.warning("ignoring a corrupt chunk %s from %s", sha.hex()[:16], _where(node))
        raise KademliaError(f"chunk {sha.hex()[:16]} is unavailable")


class _DelayedSends:
    """The protocol's datagram transport, each send deferred by `delay` seconds (emulated latency)."""

    def __init__(self, transport: asyncio.DatagramTransport, delay: float, loop: asyncio.AbstractEventLoop) -> None:
        self._transport, self._delay, self._loop = transport, delay, loop

    def sendto(self, data: bytes, addr: Any = None) -> None:
        self._loop.call_later(self._delay, self._send, data, addr)

    def _send(self, data: bytes, addr: Any) -> None:
        if not self._transport.is_closing():
            self._transport.sendto(data, addr)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


async def _gather_bounded(coros: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Run at most PARALLEL_TRANSFERS at once; raise the first failure only after all have ended, so no
    task outlives the call."""
    limit = asyncio.Semaphore(PARALLEL_TRANSFERS)

    async def bounded(coro: Coroutine[Any, Any, T]) -> T:
        async with limit:
            return await coro

    values: list[T] = []
    for result in await asyncio.gather(*(bounded(c) for c in coros), return_exceptions=True):
        if isinstance(result, BaseException):
            raise result
        values.append(result)
    return values


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not 0 < len(key.encode()) <= MAX_KEY_BYTES:
        raise ValueError(f"a key must be a string of 1 to {MAX_KEY_BYTES} bytes")
    if key.startswith(CHUNK_PREFIX):
        raise ValueError(f"keys starting with {CHUNK_PREFIX!r} are reserved for chunks")


def _unpack_value(packed: bytes) -> Any:
    """As the RPC frames unpack (overlay.wire.frames), so a value reads back as the Chord DHT returns it."""
    return msgpack.unpackb(packed, raw=False, strict_map_key=False)


def _where(node: Node | None) -> str:
    return "this node" if node is None else f"{node.ip}:{node.port}"
