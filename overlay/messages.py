"""The overlay's RPCs between agents: Chord's lookup and maintenance (`overlay.ring`) and the replicated
records (`overlay.dht`). Agents only: no user certificate may walk the ring or write a replica directly.

The handlers receive these types decoded; what the codec cannot say (a position on the ring, a list that
must not be empty) each type checks in `__post_init__`. A peer and a record travel as short lists of
their own (`overlay.ring.peer_from_wire`, `overlay.dht.record_from_wire`: a record has four or five items,
as older agents send it), so their fields are `Any` here and decoded by those functions. Answers are left
undeclared: they are those same lists, on the paths the simulations run thousands of times a second.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from overlay.chord import RING
from overlay.wire.codec import limit, wire
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


CHORD_STEP = Method("chord.step", ChordStep, AGENTS)
CHORD_STATE = Method("chord.state", NoArgs, AGENTS)
CHORD_NOTIFY = Method("chord.notify", ChordNotify, AGENTS)
DHT_STORE = Method("dht.store", DhtStore, AGENTS)
DHT_FETCH = Method("dht.fetch", DhtFetch, AGENTS)
DHT_DIGEST = Method("dht.digest", DhtDigest, AGENTS)
DHT_SYNC = Method("dht.sync", DhtSync, AGENTS)
DHT_OFFER = Method("dht.offer", DhtOffer, AGENTS)
DHT_PREPARE = Method("dht.prepare", DhtPrepare, AGENTS)
DHT_RELEASE = Method("dht.release", DhtRelease, AGENTS)
DHT_CHECK = Method("dht.check", DhtCheck, AGENTS)
