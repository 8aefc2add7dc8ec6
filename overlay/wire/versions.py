"""Protocol versions: what each end of a connection speaks, and the one version the connection uses.

Why a range, chosen per connection. A cluster is upgraded one agent at a time, so for a while agents of two
releases must talk; an exact-version handshake would split it at the first restart. Each end's hello
states the oldest and newest version it speaks; both ends apply the same pure function (`negotiate`, the
highest version of both ranges) to the same two ranges, so they agree without another round trip. The
version is kept on the connection: a handler reads it as `Caller.version`, a caller asks
`Endpoint.peer_version(addr)`, and a message newer than that version is not sent. This is how TLS 1.3
(`supported_versions`), HTTP/2 (ALPN) and Kafka (ApiVersions: per API, the highest version both sides
support) settle one connection. memberlist/Serf instead gossip each node's ProtocolMin/Max and refuse a
member outside every other's range, and Consul uses new raft features only once every server advertises
them: those are cluster-wide decisions, which records need (`docs/architecture.md`, "Rolling upgrades"),
but every message between two agents goes over one connection, so the connection is what negotiates.

Disjoint ranges refuse the connection in one line on both ends: the answering end sends its own hello
before closing (as Kafka's UNSUPPORTED_VERSION answer lists the versions the broker does speak, KIP-511),
so the dialing end can say what the peer speaks rather than "connection closed".

Versions (a hello is a msgpack map; keys a version does not know are ignored, so later ones may add some):
    1   {"proto": 1, "node", "site"}; the peer must say 1 (agents before version ranges).
    2   adds "versions": [oldest, newest]. "proto" stays, holding the oldest: it is all a version-1
        agent checks, so that agent accepts exactly the peers that speak version 1.
        `agent.status` reports the versions spoken (`agents.messages.ProtocolVersions`).
A node whose newest version is 1 sends version 1's hello exactly, as released agents do, so a test agent
narrowed to version 1 (`DISCOVERY_PROTOCOL`, `discovery.agent_config`) is an old agent on the wire.

The hello is the one message read by hand rather than by `overlay.wire.codec`: it must accept fields of
versions newer than ours, which the codec refuses by design. This module does no I/O (`overlay.wire.rpc`
sends and receives the hellos) and must never learn about any service's messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PROTOCOL_MIN = 1
"""The oldest version this build speaks: raise it only once no agent of a release whose newest version is
below the new value can still be running (each release speaking its predecessor's newest keeps that true)."""
PROTOCOL_MAX = 2
"""The newest version this build speaks: raise it with each release that changes a message's shape."""
MAX_NAME = 256


class HandshakeRefused(Exception):
    """The peer's hello breaks the rules, or says what this end cannot accept: close the connection."""


class NoCommonVersion(HandshakeRefused):
    """The two ends speak no version in common; the message is the one line both ends log."""

    def __init__(self, line: str, peer: Hello) -> None:
        super().__init__(line)
        self.peer = peer


@dataclass(frozen=True)
class Versions:
    """The versions one end speaks: every one from `oldest` to `newest`."""

    oldest: int
    newest: int

    def __post_init__(self) -> None:
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (self.oldest, self.newest)) \
                or not 1 <= self.oldest <= self.newest:
            raise ValueError(f"protocol versions {self.oldest!r}..{self.newest!r}: expected 1 <= oldest <= newest")

    def __contains__(self, version: int) -> bool:
        return self.oldest <= version <= self.newest

    def __str__(self) -> str:
        return f"version {self.oldest}" if self.oldest == self.newest else f"versions {self.oldest}..{self.newest}"

    @classmethod
    def parse(cls, text: str) -> Versions:
        """"2" (one version) or "1..2" (oldest..newest); ValueError in one line otherwise."""
        low, sep, high = text.strip().partition("..")
        try:
            return cls(int(low), int(high) if sep else int(low))
        except ValueError:
            raise ValueError(f"protocol versions {text!r}: expected N or OLDEST..NEWEST, "
                             "1 <= OLDEST <= NEWEST") from None


SPOKEN = Versions(PROTOCOL_MIN, PROTOCOL_MAX)
"""What this build speaks; an agent may be narrowed to part of it for tests, never widened."""


def negotiate(mine: Versions, theirs: Versions) -> int | None:
    """The version a connection between the two uses: the highest both speak; None if they share none."""
    newest = min(mine.newest, theirs.newest)
    return newest if newest >= max(mine.oldest, theirs.oldest) else None


@dataclass(frozen=True)
class Hello:
    """What a peer said of itself in its hello."""

    node: str
    site: str
    versions: Versions


def hello(node: str, site: str, versions: Versions) -> dict[str, Any]:
    """Our hello, in the shape of the newest version we speak (see the module docstring)."""
    frame: dict[str, Any] = {"proto": versions.oldest, "node": node, "site": site}
    if versions.newest >= 2:
        frame["versions"] = [versions.oldest, versions.newest]
    return frame


def read_hello(frame: Any) -> Hello:
    """A peer's hello, of any version; HandshakeRefused in one line if it is not one."""
    if not isinstance(frame, dict) or not isinstance(frame.get("node"), str) or len(frame["node"]) > MAX_NAME:
        raise HandshakeRefused(f"bad handshake frame: {str(frame)[:80]!r}")
    stated = frame.get("versions")
    try:
        if stated is None:  # version 1: one version, "proto"
            proto: Any = frame.get("proto")  # checked by Versions
            versions = Versions(proto, proto)
        elif isinstance(stated, list) and len(stated) == 2:
            versions = Versions(*stated)
        else:
            raise ValueError(f"versions {stated!r}: expected [oldest, newest]")
    except ValueError as err:
        raise HandshakeRefused(f"bad handshake from {frame['node']!r}: {err}") from None
    site = frame.get("site", "")
    return Hello(frame["node"], site if isinstance(site, str) and len(site) <= MAX_NAME else "", versions)


def agree(mine: Versions, peer: Hello, where: str) -> int:
    """The version to use with `peer` (at `where`, an address); NoCommonVersion if there is none."""
    version = negotiate(mine, peer.versions)
    if version is None:
        raise NoCommonVersion(f"no common protocol version with {peer.node} ({where}): it speaks {peer.versions}, "
                              f"we speak {mine}", peer)
    return version
