"""The overlay's RPCs between agents: Chord's lookup and maintenance (`overlay.ring`) and the replicated
records (`overlay.dht`). Agents only: no user certificate may walk the ring or write a replica directly.

Deep structures (a peer, a record on the wire) are checked by the handlers' own decoders
(`overlay.chord.peer_from_wire`, `overlay.dht.record_from_wire`); the types here fix the fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from overlay.wire.codec import limit, wire
from overlay.wire.rpc import AGENTS, Method

MAX_KEY = 1024


@dataclass(frozen=True)
class NoArgs:
    """A request without arguments."""


@dataclass(frozen=True)
class ChordStep:
    key: int
    avoid: list[int] = field(default_factory=list)
    sender: Any = field(default=None, metadata=wire("from"))


@dataclass(frozen=True)
class ChordNotify:
    peer: Any


@dataclass(frozen=True)
class DhtStore:
    record: Any
    token: str | None = field(default=None, metadata=limit(128))
    """The commit of a conditional write (`dht.prepare`): frees the key's claim slot."""


@dataclass(frozen=True)
class DhtPrepare:
    key: str = field(metadata=limit(MAX_KEY))
    token: Any = None
    expect: Any = None


@dataclass(frozen=True)
class DhtRelease:
    key: str = field(metadata=limit(MAX_KEY))
    token: Any = None


@dataclass(frozen=True)
class DhtCheck:
    entries: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class DhtFetch:
    key: str = field(metadata=limit(MAX_KEY))


@dataclass(frozen=True)
class DhtDigest:
    lo: int
    hi: int
    buckets: list[int]


@dataclass(frozen=True)
class DhtSync:
    push: list[Any] = field(default_factory=list)
    pull: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class DhtOffer:
    entries: list[Any] = field(default_factory=list)


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
