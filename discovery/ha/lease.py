"""A host's lease on running its protected VMs, kept in the directory: the host side, as a sans-IO core.

Why a lease. SWIM's "dead" is the others' guess: a host cut off from them, or one whose agent stalled,
still runs its guests. Before watchers (`discovery.ha.watch`) start a protected VM elsewhere, the old host
must have stopped it, without anyone being able to tell it so. So a host runs its protected VMs only while
it holds a lease that it renews in the directory, and freezes (pauses) them once it has not renewed for a
term; the watchers take the VMs over only after seeing the lease unchanged for longer than a term. Nothing
depends on the clocks agreeing, only on them running at about the same rate (the watchers' margin):

    the host freezes at   s + term       (s: when it sent its last renewal that succeeded, its clock)
    a watcher revokes at  r + term·(1 + DRIFT) + MARGIN
                                          (r: when it read that renewal's version, after s, its clock)

Both the renewals and the revocation are compare-and-set writes of one record (`overlay.dht.DHT.put_if`,
decided by a majority of its replicas), so one of them wins each version: a host whose renewal lost sees
the record revoked and fences (destroys its copies for good); a watcher whose revocation lost sees a
renewal and keeps watching. A host that cannot read its record (cut off one way or both) does not write
either: its renewals stop at the first failure after the term ran out, so it can neither extend the lease
blindly nor keep the record's slot claimed against the watchers.

A host keeps a lease only while it has protected VMs: with none, it makes no directory call at all (its
last renewal lists nothing, and lapses unnoticed), so an idle agent pays nothing for HA. It reads and
rewrites its record once at start and after a fence, protected VMs or not: a revocation it missed while away
is fenced at once, and replaced by a lease of a higher epoch, so no VM that comes later is taken for one the
revoked lease listed.

The record, `ha/lease/<node>`, holds the holder, the term, the protected VEs that have a VM on the holder
(what watchers recover), and the epoch: the fencing token, raised by every revocation and by every lease
taken after one, never lowered. A VM is covered only once a renewal listing its VE has been written
(`LeaseKeeper.cover` renews at once), and the host starts it only then, so no protected VM runs unlisted.

What a `LeaseKeeper` goes through (frozen is a flag beside the state)::

    READ ── none, or ours ──────────────► HELD ── renewed ──► HELD (held_until = sent + term)
      │                                     │ ── term out ──► FROZEN (Freeze) ── renewed ──► HELD (Thaw)
      └─ revoked (holder none / other) ─► FENCED (Fence) ── taken anew (epoch + 1, no VEs) ──► HELD
    a renewal that conflicts: READ again (ours: retry; revoked: FENCED)

This module never touches a socket, a clock or trio: a shell performs the actions and feeds back what
happened (`discovery.ha.shell`, which the agents and the simulator share).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any

from overlay.wire.codec import sparse

LEASE_PREFIX = "ha/lease/"
TERM = 4.0
"""Seconds a renewal holds for. Below SWIM's detection time (suspect_timeout, 3 s, plus the probes that
raise the suspicion), so watchers that start reading at the suspicion are done waiting soon after the
verdict."""
RENEW_FRACTION = 3
"""Renewals per term: one lost renewal does not freeze a host."""
LEASE_CALL_TIMEOUT = 0.5
"""Seconds a lease's read or write waits for each replica: a replica that died but is not declared dead yet
must not hold a renewal past the term (the directory's own 3 s would)."""


def lease_key(node: str) -> str:
    return LEASE_PREFIX + node


@dataclass(frozen=True)
class Lease:
    """The record at `ha/lease/<node>`."""

    holder: str | None
    """The node whose VMs it covers; None once revoked."""
    epoch: int
    """The fencing token: raised by each revocation and each lease taken after one."""
    term: float
    ves: tuple[str, ...] = ()
    """The protected VEs with a VM on the holder, sorted."""
    revoked_by: str | None = field(default=None, metadata=sparse())


@dataclass(frozen=True)
class Read:
    """Read the lease record; answered by `LeaseKeeper.read`."""


@dataclass(frozen=True)
class Renew:
    """Write `lease` as the version after `expect` (the record last read or written, opaque here): answered by
    `renewed` (with the time the write was sent), `conflicted` or `failed`."""

    lease: Lease
    expect: Any


@dataclass(frozen=True)
class Freeze:
    """The term ran out: pause every protected VM (none may run until a renewal succeeds or the lease is lost)."""


@dataclass(frozen=True)
class Thaw:
    """A renewal succeeded while frozen: the lease was never revoked, resume the VMs `Freeze` paused."""


@dataclass(frozen=True)
class Fence:
    """The lease was revoked: the VMs of `ves` must never run here again (destroy them; the VE records say
    where they run now)."""

    ves: tuple[str, ...]
    epoch: int


Action = Read | Renew | Freeze | Thaw | Fence


class State(enum.Enum):
    READ = "read"
    """The next directory call reads: at start, after a conflict, and while frozen."""
    HELD = "held"
    """The next directory call renews: the record read or written last is this host's."""


class LeaseKeeper:
    """One host's side of its lease. The shell calls `poll(now)` when `wake_at()` comes and after every answer,
    performs the actions it returns in order, and reports each directory call's outcome; `cover` sets what
    must be listed."""

    def __init__(self, node: str, term: float = TERM) -> None:
        self.node = node
        self.term = term
        self.state = State.READ
        self.epoch = 0
        self.held_until: float | None = None
        """When the lease runs out on this host's clock (None: not held)."""
        self.listed: tuple[str, ...] = ()
        """The VEs the last lease written lists."""
        self.wanted: frozenset[str] = frozenset()
        self.frozen = False
        self._record: Any = None
        self._next = 0.0
        self._busy = False
        self._clear = True
        """Read the record and write it afresh once, whatever is protected: at start (a lease revoked while this
        host was away must be fenced, and no VM arriving later mistaken for one it listed) and after a fence."""

    # -- what the shell asks ---------------------------------------------------------------------------------

    def poll(self, now: float) -> list[Action]:
        """What to do now: a freeze when the term has run out, and at most one directory call in flight."""
        actions: list[Action] = []
        if self.held_until is not None and now >= self.held_until and not self.frozen:
            self.frozen, self.state = True, State.READ
            actions.append(Freeze())
        if not (self.wanted or self.listed or self._clear):
            return actions  # nothing protected here: no lease to keep (one listing something is renewed empty first)
        due = now >= self._next or (self.state is State.HELD and not self.wanted <= set(self.listed))
        if not self._busy and due:
            self._busy = True
            actions.append(Read() if self.state is State.READ else self._renewal())
        return actions

    def wake_at(self) -> float | None:
        """When `poll` has something to do next without an answer (None: only after one)."""
        times = [] if self._busy or not (self.wanted or self.listed or self._clear) else [self._next]
        if self.held_until is not None and not self.frozen:
            times.append(self.held_until)
        return min(times, default=None)

    def cover(self, ves: frozenset[str]) -> None:
        """The protected VEs with a VM here: one not listed yet is listed by a renewal at the next `poll`."""
        self.wanted = ves

    def abandon(self) -> None:
        """The directory call in flight will never be answered (its shell restarted): read afresh."""
        self._busy, self.state = False, State.READ

    def covered(self, ve: str, now: float) -> bool:
        """Whether a VM of `ve` may start here: listed by a lease this host holds now, not frozen."""
        return (not self.frozen and self.held_until is not None and now < self.held_until
                and ve in self.listed)

    # -- what the directory answered ---------------------------------------------------------------------------

    def read(self, lease: Lease | None, record: Any, now: float) -> list[Action]:
        """The lease record as read (None: there is none); `record` is what `Renew.expect` hands back."""
        self._busy, self._record = False, record
        if lease is not None and lease.holder != self.node:
            return self._fence(lease, now)
        self.epoch = lease.epoch if lease is not None else max(self.epoch, 1)
        self.state, self._next = State.HELD, now  # reading never holds: renew at once
        return []

    def renewed(self, lease: Lease, record: Any, sent: float) -> list[Action]:
        """The renewal sent at `sent` (this host's clock) was written: the lease holds for a term from then."""
        self._busy, self._record, self._clear = False, record, False
        self.epoch, self.listed, self.state = lease.epoch, lease.ves, State.HELD
        self.held_until = max(self.held_until or sent, sent + self.term)
        if not lease.ves and not self.wanted:
            self.held_until = None  # it covers nothing: let it lapse, nothing to freeze
        self._next = sent + self.term / RENEW_FRACTION
        if self.frozen:
            self.frozen = False
            return [Thaw()]
        return []

    def conflicted(self, now: float) -> list[Action]:
        """Someone wrote the record since this host read it: read it again, then decide."""
        self._busy, self.state, self._next = False, State.READ, now
        return []

    def failed(self, now: float) -> list[Action]:
        """The directory did not answer: try again soon. Frozen, the next call reads (a host cut off one way
        must not keep writing, nor keep the record claimed)."""
        self._busy = False
        self._next = now + self.term / (2 * RENEW_FRACTION)
        if self.frozen:
            self.state = State.READ
        return []

    # -- inside --------------------------------------------------------------------------------------------

    def _renewal(self) -> Renew:
        return Renew(Lease(self.node, self.epoch, self.term, tuple(sorted(self.wanted))), self._record)

    def _fence(self, lease: Lease, now: float) -> list[Action]:
        """Revoked: what the record or this host listed must never run here; a new lease, above the epoch."""
        lost = tuple(sorted(set(lease.ves) | set(self.listed)))
        self.epoch, self.listed, self.wanted = lease.epoch + 1, (), frozenset()
        self.held_until, self.frozen, self._clear = None, False, True
        self.state, self._next = State.HELD, now
        return [Fence(lost, lease.epoch)]


def revoked(lease: Lease, by: str) -> Lease:
    """`lease` taken from its holder by watcher `by`: no holder, the epoch raised, the VEs kept for recovery."""
    return replace(lease, holder=None, epoch=lease.epoch + 1, revoked_by=by)
