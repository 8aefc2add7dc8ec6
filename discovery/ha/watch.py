"""Watchers: who watches a host, and what one watcher does when SWIM gives up on it, as a sans-IO core.

Why watchers per host. The unit that fails is a host, and SWIM's verdict is about a host; the VEs to
recover are those its lease lists (`discovery.ha.lease`), so one read tells a watcher everything. The
watchers of a host are WATCHERS members other than it, chosen by rendezvous hashing of (host, member):
members of the host's own site first (the paper's "watcher in the same local group": close, so it sees
the host as the site does), then the others. Every agent computes the same from the same membership, and
when membership changes only the watchers that left are replaced. Views differ for a moment; that costs
at most an extra or a missing watcher for that moment, never a double recovery: the revocation is a
compare-and-set of the lease record, so exactly one watcher wins it, and each VE's recovery is itself a
transaction on its record.

States of a `HostWatch` (one watcher, one watched host)::

    IDLE ── suspect or dead ──► OBSERVE: read the lease
    OBSERVE ── none, or a lease listing nothing ──► OBSERVE, read again after RETRY (nothing protected there,
               or not there yet: nothing to revoke)
            ── the host's, a new version ──► OBSERVE (seen at now: the host still renews)
            ── the host's, the same version for term·(1 + DRIFT) + MARGIN (+ STAGGER per rank), and dead
               ──► REVOKE: write it revoked ── won ──► RECOVER (Recover: its VEs) ──► DONE
                                              └─ conflict ──► OBSERVE (read again)
            ── revoked (by another, or by this one's write that failed) ──► CONFIRM: after FOLLOW_GRACE,
               write the revoked lease again; won ──► FOLLOW: after a term and margin, Recover too (it
               finishes what the other watcher started, if it died; each VE's recovery skips what is done)
    alive (SWIM refuted it) ──► IDLE, unless this watcher revoked: the lease is gone, so recovery goes on
    a recovery that failed (no room, the directory) ──► FOLLOW again, after RETRY

The safety argument is `discovery.ha.lease`'s: the lease is revoked only once its holder has stopped its
VMs. A revoked record seen, but not written, by this watcher may have reached only a minority of its
replicas (its writer's answers were lost) while the holder renewed on the majority; so a follower acts
only on a revocation it wrote itself to a majority, and only a term after that write, when the holder,
whose renewals all fail from then on, has frozen. (A renewal that reached only a minority and a revocation
of the same version settle by their commits' ballots, `overlay.dht.ballot`: the later one, which won the
majority.) Liveness: a host that still renews (cut off from the other members but not from a majority
of its record's replicas) is not recovered; its VMs run where they are.

This module never touches a socket, a clock or trio.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from discovery.ha.lease import Lease, revoked

WATCHERS = 2
DRIFT = 0.05
"""How much faster a watcher's clock may run than its host's, as a share."""
MARGIN = 0.5
"""Seconds a watcher adds to the term before revoking: the host's freeze and a renewal's write in flight."""
STAGGER = 1.0
"""Seconds each further watcher (by rank) waits more before revoking: the first one usually wins alone."""
FOLLOW_GRACE = 10.0
"""After another watcher revoked: seconds before this one runs the recovery too (finishing it if needed)."""
RETRY = 5.0
"""Seconds before a recovery that failed is tried again."""


def watchers_of(host: str, site: str, members: Iterable[tuple[str, str]], k: int = WATCHERS) -> list[str]:
    """The `k` watchers of `host` (of `site`) among `members` (name, site): its site's first, each group in
    rendezvous order of (host, member)."""

    def weight(name: str) -> bytes:
        return hashlib.blake2b(f"{host}\0{name}".encode(), digest_size=8).digest()

    others = [(name, where) for name, where in members if name != host]
    ordered = sorted(others, key=lambda m: (m[1] != site, weight(m[0])))
    return [name for name, _ in ordered[:k]]


@dataclass(frozen=True)
class ReadLease:
    host: str


@dataclass(frozen=True)
class Revoke:
    """Write `lease` (revoked) as the version after `expect`: answered by `revoke_won`, `conflicted`, `failed`."""

    lease: Lease
    expect: Any


@dataclass(frozen=True)
class Recover:
    """Run the VEs of `ves` (their VMs on `host`) elsewhere; answered by `recovered`."""

    host: str
    ves: tuple[str, ...]
    epoch: int
    by: str | None = None
    """The watcher that revoked the lease (this one, or the one it follows)."""


Action = ReadLease | Revoke | Recover


class State(enum.Enum):
    IDLE = "idle"
    OBSERVE = "observe"
    REVOKE = "revoke"
    CONFIRM = "confirm"
    FOLLOW = "follow"
    DONE = "done"



class HostWatch:
    """What watcher `me`, of rank `rank` among the host's watchers, does about `host`."""

    def __init__(self, me: str, host: str, rank: int = 0) -> None:
        self.me, self.host, self.rank = me, host, rank
        self.state = State.IDLE
        self.dead = False
        self.lease: Lease | None = None
        """The lease as last read."""
        self._record: Any = None
        self._version: Any = None
        self._seen = 0.0
        self._next = 0.0
        self._busy = False
        self._read_due = False

    # -- membership -------------------------------------------------------------------------------------------

    def suspect(self, now: float) -> None:
        """SWIM suspects the host: start reading its lease, so the wait is mostly over at the verdict."""
        if self.state is State.IDLE:
            self.state, self._read_due, self._version, self._next = State.OBSERVE, True, None, now

    def declared_dead(self, now: float) -> None:
        self.dead = True
        self.suspect(now)

    def alive(self, now: float) -> None:
        """SWIM takes the host back: stop watching this failure, unless a recovery is under way (its lease is
        revoked: it will fence, and its VEs must run again)."""
        self.dead = False
        if self.state is State.DONE or not self._revoked():
            self.state, self.lease, self._version, self._read_due = State.IDLE, None, None, False

    # -- what to do -------------------------------------------------------------------------------------------

    def poll(self, now: float) -> list[Action]:
        if self._busy or self.state in (State.IDLE, State.DONE) or now < self._next:
            return []
        if self.state is State.CONFIRM and self.lease is not None:
            self._busy = True
            return [Revoke(self.lease, self._record)]
        if self.state is State.FOLLOW and self.lease is not None:
            self._busy = True
            return [Recover(self.host, self.lease.ves, self.lease.epoch, self.lease.revoked_by)]
        if self.state is State.OBSERVE and self._read_due:
            self._busy, self._read_due = True, False
            return [ReadLease(self.host)]
        if self.state is State.OBSERVE and self.dead and now >= self._deadline():
            self._busy, self.state = True, State.REVOKE  # read once more: revoke only an unchanged record
            return [ReadLease(self.host)]
        return []

    def wake_at(self) -> float | None:
        if self._busy or self.state in (State.IDLE, State.DONE):
            return None
        if self.state is State.OBSERVE and not self._read_due:
            return max(self._next, self._deadline()) if self.dead else None
        return self._next

    # -- answers ----------------------------------------------------------------------------------------------

    def read(self, lease: Lease | None, record: Any, version: Any, now: float) -> list[Action]:
        """The lease as read (`version`: the record's, comparable; None with no record)."""
        self._busy = False
        if lease is None:  # nothing protected runs there, or the replicas that answered have not got it yet
            self.state, self._read_due, self._next = State.OBSERVE, True, now + RETRY
            return []
        self.lease, self._record = lease, record
        if lease.holder is None:
            if self.state is not State.FOLLOW:
                self.state, self._next = State.CONFIRM, now + FOLLOW_GRACE
            return []
        if self.state is State.REVOKE and version == self._version:
            if not lease.ves:  # nothing to recover: a revocation would only make a host SWIM misjudged fence nothing
                self.state, self._read_due, self._next = State.OBSERVE, True, now + RETRY
                return []
            self._busy = True
            return [Revoke(revoked(lease, self.me), record)]
        if version != self._version:
            self._version, self._seen = version, now
        self.state = State.OBSERVE
        return []

    def revoke_won(self, lease: Lease, now: float) -> list[Action]:
        """This watcher's revocation was written: after its own observation it recovers the VEs at once; as a
        follower (it confirmed a revocation it read), once the holder has frozen."""
        if self.state is State.CONFIRM:
            self._busy, self.state, self._next = False, State.FOLLOW, now + self._wait()
            return []
        self.lease, self.state = lease, State.FOLLOW
        return [Recover(self.host, lease.ves, lease.epoch, lease.revoked_by)]  # busy until `recovered`

    def conflicted(self, now: float) -> list[Action]:
        """The record changed since it was read (renewed, or revoked by another watcher): read it again."""
        self._busy, self.state, self._read_due, self._next = False, State.OBSERVE, True, now
        return []

    def failed(self, now: float) -> list[Action]:
        """A directory call did not answer: try the same step again after a moment (a revocation, or its
        confirmation, from a fresh read: it may have been written in part)."""
        self._busy = False
        if self.state in (State.OBSERVE, State.REVOKE, State.CONFIRM):
            self.state, self._read_due = State.OBSERVE, True
        self._next = now + MARGIN
        return []

    def recovered(self, ok: bool, now: float) -> list[Action]:
        """The recovery ran: every VE runs elsewhere (or needed nothing), or some must be tried again."""
        self._busy = False
        if ok:
            self.state = State.DONE
        else:
            self.state, self._next = State.FOLLOW, now + RETRY
        return []

    def _revoked(self) -> bool:
        return self.lease is not None and self.lease.holder is None

    def _deadline(self) -> float:
        """When a dead host's lease, unchanged since `_seen`, may be revoked."""
        return self._seen + self._wait() + self.rank * STAGGER

    def _wait(self) -> float:
        """A holder's term as this watcher's clock may measure it, plus the margin."""
        term = self.lease.term if self.lease is not None else 0.0
        return term * (1 + DRIFT) + MARGIN
