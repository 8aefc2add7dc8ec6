"""The overlay's RPCs between agents: Chord's lookup and maintenance (`overlay.ring`) and the replicated
records (`overlay.dht`). Agents only: no user certificate may walk the ring or write a replica directly.

The handlers receive these types decoded; what the codec cannot say (a position on the ring, a list that
must not be empty) each type checks in `__post_init__`. A peer and a record travel as short lists of
their own (`overlay.ring.peer_from_wire`, `overlay.dht.record_from_wire`: a record has four or five items,
as older agents send it), so request fields holding them are `Any` here and decoded by those functions.
Every method declares its answer, shaped as it always went on the wire (a map is a dataclass, a list a
typed tuple), so that a caller reads it with `Endpoint.ask` and a handler's slip is a `bad_answer`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from overlay.chord import RING
from overlay.wire.codec import limit, sparse, wire
from overlay.wire.rpc import AGENTS, Method, RequestError

MAX_KEY = 1024
MAX_AVOID = 32
"""Dead nodes one lookup may ask a hop to route around."""
MAX_BUCKETS = 1024
"""Upper bound on the buckets of one digest (about 9 bytes each on the wire)."""
SYNC_BATCH = 128
"""Records pushed, pulled or offered in one `dht.sync` / `dht.offer` call (frames are capped at 4 MiB)."""
TOKEN = 128
"""Longest claim token of a conditional write."""

Entry = tuple[str, int, str]
"""(key, version, writer): what digests and offers compare instead of whole records."""
Stamp = tuple[int, str]
"""(version, writer): what orders a key's versions."""
PeerWire = tuple[int, str, str, str]
"""A ring node as it travels (`overlay.ring.peer_to_wire`): id, name, address, site."""
RecordWire = tuple[str, Any, int, str, float] | tuple[str, Any, int, str]
"""A record as it travels (`overlay.dht.Record.to_wire`): key, value, version, writer and, but from older
agents, when it was written."""


def on_ring(value: int, name: str) -> None:
    """RequestError unless `value` is a position on the ring."""
    if not 0 <= value < RING:
        raise RequestError(f"{name} must be a position on the ring (0 <= {name} < 2**64)")


def versions(entries: list[Entry]) -> None:
    """RequestError unless every entry's version is a version (0 or more)."""
    bad = next((entry for entry in entries if entry[1] < 0), None)
    if bad is not None:
        raise RequestError(f"malformed entry {list(bad)!r}")


@dataclass(frozen=True)
class NoArgs:
    """A request without arguments."""


@dataclass(frozen=True)
class ChordStep:
    key: int
    avoid: list[int] = field(default_factory=list, metadata=limit(MAX_AVOID))
    sender: Any = field(default=None, metadata=wire("from"))
    """The asker, as `overlay.ring.peer_to_wire` writes it (a hop learns it)."""

    def __post_init__(self) -> None:
        on_ring(self.key, "key")


@dataclass(frozen=True)
class ChordNotify:
    peer: Any


@dataclass(frozen=True)
class DhtStore:
    record: Any
    token: str | None = field(default=None, metadata=limit(TOKEN))
    """The commit of a conditional write (`dht.prepare`): frees the key's claim slot."""


@dataclass(frozen=True)
class DhtPrepare:
    key: str = field(metadata=limit(MAX_KEY))
    token: str = field(metadata=limit(TOKEN))
    expect: tuple[int, str]
    """The (version, writer) the writer read; (0, "") for nothing."""

    def __post_init__(self) -> None:
        if not self.token:
            raise RequestError(f"token must be a string of 1 to {TOKEN} characters")
        if self.expect[0] < 0:
            raise RequestError("expect must be [version, writer]")


@dataclass(frozen=True)
class DhtRelease:
    key: str = field(metadata=limit(MAX_KEY))
    token: str | None = field(default=None, metadata=limit(TOKEN))


@dataclass(frozen=True)
class DhtCheck:
    entries: list[Entry] = field(default_factory=list, metadata=limit(SYNC_BATCH))

    def __post_init__(self) -> None:
        versions(self.entries)


@dataclass(frozen=True)
class DhtFetch:
    key: str = field(metadata=limit(MAX_KEY))


@dataclass(frozen=True)
class DhtDigest:
    lo: int
    hi: int
    buckets: list[int] = field(metadata=limit(MAX_BUCKETS))
    """A hash per bucket of the arc (lo, hi]."""

    def __post_init__(self) -> None:
        on_ring(self.lo, "lo")
        on_ring(self.hi, "hi")
        if not self.buckets or not all(0 <= h < RING for h in self.buckets):
            raise RequestError(f"buckets must be a list of 1 to {MAX_BUCKETS} 64-bit hashes")


@dataclass(frozen=True)
class DhtSync:
    push: list[Any] = field(default_factory=list, metadata=limit(SYNC_BATCH))
    pull: list[str] = field(default_factory=list, metadata=limit(SYNC_BATCH))


@dataclass(frozen=True)
class DhtOffer:
    entries: list[Entry] = field(default_factory=list, metadata=limit(SYNC_BATCH))

    def __post_init__(self) -> None:
        versions(self.entries)


@dataclass(frozen=True)
class ChordHop:
    """A lookup hop's answer: the next node to ask or, when `done`, the key's owner and its live successors."""

    done: bool
    peer: PeerWire
    successors: list[PeerWire] = field(default_factory=list, metadata=sparse())


@dataclass(frozen=True)
class ChordView:
    """A node's neighbours, for a stabilize round (and a liveness check: the answer itself)."""

    predecessor: PeerWire | None
    successors: list[PeerWire]


@dataclass(frozen=True)
class DigestDiff:
    """The buckets of a digest this replica answers for (those whose hashes differ, as many as fit) and its
    entries in them; not `complete` if some differing bucket was left for the next pass."""

    buckets: list[int]
    entries: list[Entry]
    complete: bool = True


@dataclass(frozen=True)
class Claim:
    """A replica's answer to `dht.prepare`: the slot granted, or `why` not (with the version it holds)."""

    granted: bool
    why: Literal["restarting", "newer", "claimed"] | None = field(default=None, metadata=sparse())
    held: Stamp | None = field(default=None, metadata=sparse())


CHORD_STEP = Method("chord.step", ChordStep, AGENTS, ChordHop)
CHORD_STATE = Method("chord.state", NoArgs, AGENTS, ChordView)
CHORD_NOTIFY = Method("chord.notify", ChordNotify, AGENTS, bool)
DHT_STORE = Method("dht.store", DhtStore, AGENTS, bool)
DHT_FETCH: Method[DhtFetch, RecordWire | None] = Method("dht.fetch", DhtFetch, AGENTS, RecordWire | None)
DHT_DIGEST = Method("dht.digest", DhtDigest, AGENTS, DigestDiff)
DHT_SYNC = Method("dht.sync", DhtSync, AGENTS, list[RecordWire])
DHT_OFFER = Method("dht.offer", DhtOffer, AGENTS, list[str])
DHT_PREPARE = Method("dht.prepare", DhtPrepare, AGENTS, Claim)
DHT_RELEASE = Method("dht.release", DhtRelease, AGENTS, bool)
DHT_CHECK: Method[DhtCheck, list[Stamp | None]] = Method("dht.check", DhtCheck, AGENTS, list[Stamp | None])
