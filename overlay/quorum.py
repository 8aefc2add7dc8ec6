"""Fixed replica sets: the replicas of a key counted over every member, reachable or not, and their majority.

The ring's replicas of a key are its first r *live* successors, so the two sides of a partition name
different sets, and a write acknowledged on each side leaves two histories of one key (Dynamo's sloppy
quorum). Records that must have one history (a host's HA lease, a VE's record) live instead on the r
members that follow the key when all members count, alive or not (`replicas_among`): both sides name the
same set, a read and a write each need a majority of it, so a read meets the last write and at most one of
two conditional writes wins (`overlay.dht.DHT.read_from`, `put_if`). The price is Cassandra's QUORUM's: a key
whose set has lost its majority can be neither read nor written until enough return. The agent pins the
VE records on sets of PINNED_REPLICAS = 5, which any two members down leave with a majority (as a 5-server
etcd or Consul cluster); the leases keep 3 (`discovery.ha.shell`). A set is never even (Raft's advice): of
4 members a key gets 3, whose majority of 2 outlives one more member down than 3 of 4 would.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence

from overlay.chord import hash_id
from overlay.membership import DEAD, LEFT, Membership

PINNED_REPLICAS = 5
"""The fixed set of a pinned record (`overlay.dht.DHT.pin`): a majority of it outlives any two members down."""


def replicas_among(key: str, members: Iterable[tuple[str, str]], r: int) -> list[str]:
    """The addresses of the `r` members (name, addr) that follow `key` on the ring when all of them count,
    alive or not: a replica set that does not change with who is reachable, so two writers on either side
    of a partition contend on the same replicas and at most one reaches a majority. A live member of this
    set is always one of the ring's replicas too (the first r live successors), so anti-entropy never hands
    its copy away."""
    ordered = sorted(members, key=lambda m: hash_id(m[0]))
    return _following(ordered, [hash_id(name) for name, _ in ordered], key, r)


def _following(ordered: Sequence[tuple[str, str]], ids: Sequence[int], key: str, size: int) -> list[str]:
    """The addresses of the `size` members of `ordered` (by ring id, `ids`) from the first at or after `key`."""
    if not ordered:
        return []
    first = bisect.bisect_left(ids, hash_id(key)) % len(ordered)
    return [ordered[(first + j) % len(ordered)][1] for j in range(min(size, len(ordered)))]


class FixedSets:
    """The fixed replica set of a key among `membership`'s members that have not left, and its quorum: `r`
    members, or the largest odd number below when fewer are counted."""

    def __init__(self, membership: Membership, r: int = 3) -> None:
        self.membership = membership
        self.r = r
        self._ordered: tuple[tuple[str, str], ...] = ()
        self._ids: list[int] = []
        """The members counted, and their ring ids, as last sorted: sorted again only when they change."""

    def of(self, key: str) -> tuple[list[str], int]:
        """Whom to ask for `key`, and how many must answer: a majority of the whole set. Those SWIM holds dead
        are left out while the others can make that majority (asking them only waits), and asked when they
        cannot: SWIM's "dead" may be wrong (after a partition heals, false verdicts go round for seconds),
        and a node that believed two of a key's replicas dead could not reach the key at all."""
        members = self.membership.members.values()
        every = self._among(key, [(m.name, m.addr) for m in members if m.status != LEFT])
        dead = {m.addr for m in members if m.status == DEAD}
        quorum = len(every) // 2 + 1
        live = [a for a in every if a not in dead]
        return (live if len(live) >= quorum else every), quorum

    def _among(self, key: str, counted: list[tuple[str, str]]) -> list[str]:
        """`replicas_among(key, counted, r)`, never an even number of them, with the sorted members kept between
        calls (a repair pass asks for every record it holds)."""
        if set(counted) != set(self._ordered):
            self._ordered = tuple(sorted(counted, key=lambda m: hash_id(m[0])))
            self._ids = [hash_id(name) for name, _ in self._ordered]
        size = min(self.r, len(self._ordered))
        return _following(self._ordered, self._ids, key, size - (1 - size % 2))
