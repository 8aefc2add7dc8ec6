"""Sans-IO Iterative Scheduling Procedure (ISP) of DVMS: one node's side of the partition protocol.

A node that detects a problem (overload, underload) creates a *partition* with itself as first member and
*leader*, and grows it one node at a time along its **route**: its spiral (nearest nodes first, by
coordinates), then the ring as fallback (`spiral_then_ring`), so partitions stay local (the locality-aware
DVMS). After each join the leader asks its shell to solve the partition (`Solve`); a plan leads to
Finishing (commit, `Apply`, dissolve), no plan to the next hop. A node is in at most one partition; a
candidate that is already in one refuses and the walk skips it.

**States of a partition** (at its leader)::

    on_problem ──► GROWING ── a lap with no join ──► BLOCKED ── a free node joined ──► GROWING
    GROWING or BLOCKED ── plan found ──► FINISHING ── all commits acked ──► Apply ── done or deadline ──► ended
    FINISHING ── a member refused or failed: abort the round, shrink ──► GROWING (solve again)
    BLOCKED meets BLOCKED ──► merge: the smaller id adopts the other's members and stays BLOCKED; the other ends
    `laps` laps in a row without a new peak size ──► ended ("starved");   leader crash ──► members expire

**Departure from classic DVMS**: there the event travels node to node and the last node that joined
leads. Here the first node leads for the whole life of the partition and contacts each candidate itself
(request and reply, like our spiral search): the route is the first node's spiral, which only that node
holds, so no node has to be told another's spiral; all of a partition's state sits in one place, and a
lost message costs one reply timeout instead of orphaning a travelling event.

**Leases** keep "one partition per node" true from every point of view, not only in each node's own
memory. The leader sends a keep-alive every `keepalive` seconds; a member that has heard nothing for
`expiry` seconds frees itself. Every request carries the leader's send time, which the member's ack
echoes; the leader counts a member only while ``now < send time of its last ack + expiry``, which ends
no later than the member's own ``receipt time + expiry``. So a node the leader counts always believes
it is in that partition (`counted`), and a failure report never shortens a lease (a falsely suspected
leader may still count its members). Applying a plan needs a second lease: `Commit` locks each member for
`apply_timeout` from its receipt; `Apply` carries the deadline ``commit send time + apply_timeout``, which
the shell must honour, so the whole apply lies inside every member's lock and no node (hence no VM: a VM
runs on one node) takes part in two applies at once. A restarted node passes ``quarantine_until = now +
config.quarantine`` and refuses everything until then: before its crash it may have granted a lease, or a
lock, that its memory lost.

**Versions.** The membership version is bumped at every join and drop; a `Join` carries a version greater
than any earlier drop, and a `Release` is obeyed only if not older than the member's join, so a delayed
release of an earlier membership cannot free a node that joined the same partition again. Two asks can
carry one version (nothing changed between them), so a node whose `Joined` came too late is not released
but left to expire; a commit round is named by its version, and a late `Commit` of an aborted round is
ignored, so that round's `Abort` cannot unlock the round that replaced it.

**Deadlock and starvation.** A lap is one pass over the route. A lap without any join makes the partition
BLOCKED; it keeps walking (pausing `blocked_pause` between hops), joins a node that became free, or asks
the leader of the partition that refused to merge. That leader decides on its own state, the only fresh
one (a member's idea of it would be a keep-alive old): if it is BLOCKED too, of the two the smaller
`PartitionId` absorbs the other (the other yields its members, which the absorber adopts), whoever asked,
so two partitions asking each other at once still give one merge; the absorber stays BLOCKED and goes on
meeting the others, so a deadlock ends with one partition that solves or starves. Starvation: after `laps`
(2) laps in a row in which the partition did not grow beyond the largest size it ever had (a join or a
merge that does resets the count), it ends ("starved"). Counting against the peak size, not against any
join, keeps a partition that loses and regains a member from living forever, and a merged partition
gets its two laps to meet the next one. `IspConfig.lifetime_bound` bounds how long any partition lives.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, order=True)
class PartitionId:
    """Unique across the cluster and totally ordered (the merge order): the origin node, its incarnation
    (a restarted node must not reuse ids its old partitions may still be known by) and a counter."""

    origin: str
    incarnation: int
    seq: int

    def __str__(self) -> str:
        return f"{self.origin}#{self.incarnation}.{self.seq}"


class State(enum.Enum):
    GROWING = "growing"
    BLOCKED = "blocked"
    FINISHING = "finishing"


@dataclass(frozen=True)
class IspConfig:
    keepalive: float = 0.5  # leader → members
    expiry: float = 3.5  # a member that heard nothing for this long frees itself
    reply_timeout: float = 1.0  # a request without answer by then has failed
    solve_timeout: float = 10.0  # a solve without result by then found nothing
    apply_timeout: float = 60.0  # the longest an apply may run (members stay locked that long)
    blocked_pause: float = 0.5  # between two hops of a BLOCKED partition: give others time to finish
    laps: int = 2  # starvation cut-off

    @property
    def quarantine(self) -> float:
        """How long a restarted node refuses everything: the longest it may have promised to stay put."""
        return max(self.expiry, self.apply_timeout)

    def lifetime_bound(self, nodes: int, tick: float = 0.0, delay: float = 0.0) -> float:
        """Longest a partition can live, from creation to the last node forgetting it, when the shell calls
        `on_tick` every `tick` seconds and a message takes at most `delay`. The size can reach a new peak
        at most N − 1 times, each giving `laps` more laps of at most N − 1 hops; a hop costs at most a
        reply timeout, a blocked pause and, after a join or a merge (ask, yield, adopt), a solve. Every
        drop of a member (at most one per join or adoption: N per hop) costs a solve and a commit round.
        Then the apply, and an expiry for members whose dissolve was lost. Loose, but a bound."""
        step = 3 * (self.reply_timeout + tick) + self.solve_timeout + self.blocked_pause + 2 * tick
        hops = self.laps * max(nodes, 1) * max(nodes - 1, 1)
        return hops * (1 + nodes) * step + self.apply_timeout + self.expiry + self.reply_timeout + 3 * tick + delay


# --------------------------------------------------------------------------------------------------------
# Messages: `pid` is the partition concerned, `sender` the node that sends, `version` the membership version


@dataclass(frozen=True)
class Message:
    pid: PartitionId
    sender: str
    version: int


@dataclass(frozen=True)
class Join(Message):
    """Leader → candidate: join (or, with `replaces`, leave that yielded partition for this one)."""

    sent_at: float
    replaces: PartitionId | None = None


@dataclass(frozen=True)
class Joined(Message):
    sent_at: float  # echoed: the leader's lease on the new member starts there


@dataclass(frozen=True)
class Refuse(Message):
    """Any node → leader: not joining, not (or no longer) in `pid`, not merging. Says where the sender is."""

    sent_at: float
    other: PartitionId | None = None
    other_leader: str | None = None


@dataclass(frozen=True)
class KeepAlive(Message):
    sent_at: float
    members: tuple[str, ...]


@dataclass(frozen=True)
class Alive(Message):
    sent_at: float  # echoed: renews the leader's lease on the sender


@dataclass(frozen=True)
class Commit(Message):
    """Leader → members: a plan was found for `version`; stay locked in the partition for `hold` seconds."""

    sent_at: float
    members: tuple[str, ...]
    hold: float


@dataclass(frozen=True)
class Committed(Message):
    sent_at: float


@dataclass(frozen=True)
class Abort(Message):
    """Leader → members: the commit round `version` will not be applied; unlock."""


@dataclass(frozen=True)
class Release(Message):
    """Leader → one node: you are out of the partition (dropped, or joined one that is over)."""


@dataclass(frozen=True)
class Dissolve(Message):
    """Leader → members: the partition is over."""


@dataclass(frozen=True)
class Merge(Message):
    """Leader of a BLOCKED partition `pid` → leader of `target`, which a refusal said is BLOCKED too."""

    sent_at: float
    target: PartitionId


@dataclass(frozen=True)
class Absorb(Message):
    """Reply to `Merge` from the smaller partition `pid`: yield your members to me."""

    sent_at: float
    target: PartitionId


@dataclass(frozen=True)
class Yield(Message):
    """Leader of `pid` → leader of the smaller `to`: my partition is over; adopt `members`."""

    to: PartitionId
    members: tuple[str, ...]


Wire = (Join | Joined | Refuse | KeepAlive | Alive | Commit | Committed | Abort | Release | Dissolve | Merge | Absorb
        | Yield)
"""Every message nodes exchange; on the wire, tagged with its class name (`overlay.wire.codec.encode_tagged`)."""


# --------------------------------------------------------------------------------------------------------
# Outputs: what the shell must do


@dataclass(frozen=True)
class Send:
    to: str
    msg: Message


@dataclass(frozen=True)
class _Members:
    pid: PartitionId
    version: int
    members: tuple[str, ...]


@dataclass(frozen=True)
class Solve(_Members):
    """Find a plan for the VMs of `members`; answer with ``on_plan_result(pid, found, now, version)``."""


@dataclass(frozen=True)
class Apply(_Members):
    """Apply the plan found for `version`, moving VMs between `members` only (each is locked in this
    partition until `deadline` at least). Start no migration at or after `deadline`; report ``on_apply_done``."""

    deadline: float


@dataclass(frozen=True)
class Ended:
    """The partition this node led is over: "solved", "starved", "merged" (yielded), "apply-timeout"."""

    pid: PartitionId
    reason: str
    members: tuple[str, ...]


Output = Send | Solve | Apply | Ended


def spiral_then_ring(spiral: Iterable[str], ring: Iterable[str]) -> list[str]:
    """The route of a partition: the first node's spiral (nearest first), then the ring's nodes the spiral
    did not reach, each once. The ring alone when the spiral is unknown."""
    return list(dict.fromkeys([*spiral, *ring]))


# --------------------------------------------------------------------------------------------------------
# State


@dataclass
class Membership:
    """What a node believes about the partition it is in (its leader included)."""

    pid: PartitionId
    leader: str
    since: int  # the version of the Join that let us in
    heard: float  # last word from the leader
    locked_until: float = -math.inf
    lock_round: int = -1


@dataclass
class _Pending:
    kind: str  # "join", "adopt", "merge", "absorb", "commit"
    sent_at: float
    target: PartitionId | None = None


@dataclass
class Partition:
    """The leader's record of its partition."""

    pid: PartitionId
    created: float
    members: dict[str, float]  # name → leader time from which its lease runs (the leader: +inf), in join order
    version: int = 1
    state: State = State.GROWING
    lap: int = 0  # index of the current lap of the route
    idle_laps: int = 0  # laps completed since it last grew to a new size: the starvation count
    peak: int = 1  # the largest size it reached
    visited: set[str] = field(default_factory=set)  # asked during the current lap
    joined_this_lap: bool = False  # a free node joined during the current lap
    pending: dict[str, _Pending] = field(default_factory=dict)
    solving: int | None = None  # the version being solved
    solve_sent: float = 0.0
    solved: int = 0  # the last version solved
    committing: int | None = None  # the version of the commit round
    commit_sent: float = 0.0
    deadline: float | None = None  # set while applying
    next_hop_at: float = -math.inf
    next_keepalive: float = -math.inf


class IspNode:
    """One node's ISP core. Every input returns the outputs to carry out; time is always a parameter."""

    def __init__(self, name: str, route: Callable[[], Sequence[str]], config: IspConfig | None = None,
                 incarnation: int = 0, quarantine_until: float = -math.inf) -> None:
        """`route` gives this node's current route (`spiral_then_ring`), read at every hop, so it may change."""
        self.name, self.route, self.config = name, route, config or IspConfig()
        self.incarnation, self.quarantine_until = incarnation, quarantine_until
        self.membership: Membership | None = None
        self.lead: Partition | None = None
        self._seq = 0
        self._out: list[Output] = []

    def __repr__(self) -> str:
        where = self.membership and self.membership.pid
        return f"IspNode({self.name}, in={where}, leads={self.lead and self.lead.state.value})"

    @property
    def partition_id(self) -> PartitionId | None:
        return self.membership.pid if self.membership else None

    def counted(self, now: float) -> set[str]:
        """The members this node, as a leader, may rely on at `now` (each one believes it is a member)."""
        p = self.lead
        if p is None:
            return set()
        if p.deadline is not None:  # applying: every member is locked until the deadline at least
            return set(p.members) if now < p.deadline else {self.name}
        return {m for m, lease in p.members.items() if now < lease + self.config.expiry}

    # ----------------------------------------------------------------------------------------------------
    # Inputs

    def on_problem(self, now: float) -> list[Output]:
        """This node is overloaded or underloaded: start a partition, unless it is in one (that partition's
        plan sees its VMs) or quarantined."""
        self._out = []
        if self.membership is None and now >= self.quarantine_until:
            self._seq += 1
            pid = PartitionId(self.name, self.incarnation, self._seq)
            self.lead = Partition(pid, now, {self.name: math.inf})
            self.membership = Membership(pid, self.name, 1, now)
            self._step(now)
        return self._out

    def on_message(self, msg: Message, now: float) -> list[Output]:
        """A message from another node's core; the shell vouches that `msg.sender` sent it (mutual TLS)."""
        self._out = []
        getattr(self, _HANDLERS[type(msg)])(msg, now)
        self._step(now)
        return self._out

    def on_tick(self, now: float) -> list[Output]:
        """Keep-alives, leases, timeouts, expiry: call it often (every 0.1 s, say)."""
        self._out = []
        p, cfg = self.lead, self.config
        if p is not None:
            self._tick_leader(p, now)
        elif self.membership is not None:
            m = self.membership
            if now >= max(m.heard + cfg.expiry, m.locked_until):
                self.membership = None
        return self._out

    def on_plan_result(self, pid: PartitionId, found: bool, now: float, version: int | None = None) -> list[Output]:
        """The answer to `Solve` (`version` as the request said; None: the solve in flight)."""
        self._out = []
        p = self.lead
        if p is None or p.pid != pid or p.solving is None or version not in (None, p.solving):
            return self._out
        solved, p.solving = p.solving, None
        p.solved = solved
        if found and solved == p.version and not p.pending:
            self._commit(p, now)
        self._step(now)
        return self._out

    def on_apply_done(self, pid: PartitionId, now: float) -> list[Output]:
        self._out = []
        p = self.lead
        if p is not None and p.pid == pid and p.deadline is not None:
            self._end(p, "solved")
        return self._out

    def on_peer_failed(self, name: str, now: float) -> list[Output]:
        """The failure detector gave up on `name`. A leader stops waiting for it and drops it (not while
        applying: the shell handles failed migrations). A member whose leader failed waits for its lease to
        expire: a false suspicion must not put it in two partitions."""
        self._out = []
        p = self.lead
        if p is not None and name != self.name:
            if name in p.pending:
                self._request_failed(p, name, now)
            if name in p.members and p.deadline is None:
                self._drop(p, name, release=False)
            self._step(now)
        return self._out

    # ----------------------------------------------------------------------------------------------------
    # Member side

    def _reply_refuse(self, msg: Message, sent_at: float) -> None:
        m = self.membership
        self._send(msg.sender, Refuse(msg.pid, self.name, msg.version, sent_at, m.pid if m else None,
                                     m.leader if m else None))

    def _mine(self, msg: Message) -> Membership | None:
        """Our membership if `msg` is from our partition and not older than our join."""
        m = self.membership
        return m if m is not None and m.pid == msg.pid and msg.version >= m.since else None

    def _on_join(self, msg: Join, now: float) -> None:
        m = self.membership
        free = now >= self.quarantine_until and self.lead is None
        adoptable = m is None or (msg.replaces is not None and m.pid == msg.replaces and now >= m.locked_until)
        if free and adoptable:
            self.membership = Membership(msg.pid, msg.sender, msg.version, now)
            self._send(msg.sender, Joined(msg.pid, self.name, msg.version, msg.sent_at))
        elif m is not None and m.pid == msg.pid and m.leader == msg.sender:  # we are in already (it dropped us?)
            m.heard, m.since = now, max(m.since, msg.version)  # a release sent before this join no longer applies
            self._send(msg.sender, Joined(msg.pid, self.name, msg.version, msg.sent_at))
        else:
            self._reply_refuse(msg, msg.sent_at)

    def _on_keepalive(self, msg: KeepAlive, now: float) -> None:
        m = self._mine(msg)
        if m is not None and self.name in msg.members:
            m.heard = now
            self._send(msg.sender, Alive(msg.pid, self.name, msg.version, msg.sent_at))
        elif self.partition_id != msg.pid:
            self._reply_refuse(msg, msg.sent_at)  # the leader counts us no longer than our lease anyway

    def _on_commit(self, msg: Commit, now: float) -> None:
        m = self._mine(msg)
        if m is not None and msg.version < m.lock_round:
            return  # a late commit of an aborted round: its Abort must not unlock the round that replaced it
        if m is not None and self.name in msg.members and self.lead is None:
            m.heard, m.lock_round = now, msg.version
            m.locked_until = max(m.locked_until, now + msg.hold)
            self._send(msg.sender, Committed(msg.pid, self.name, msg.version, msg.sent_at))
        else:
            self._reply_refuse(msg, msg.sent_at)

    def _on_abort(self, msg: Abort, now: float) -> None:
        m = self._mine(msg)
        if m is not None and m.lock_round == msg.version:
            m.locked_until = -math.inf

    def _on_release(self, msg: Release, now: float) -> None:
        if self._mine(msg) is not None and self.lead is None:
            self.membership = None

    def _on_dissolve(self, msg: Dissolve, now: float) -> None:
        if self.partition_id == msg.pid and self.lead is None:
            self.membership = None

    # ----------------------------------------------------------------------------------------------------
    # Leader side

    def _led(self, msg: Message) -> Partition | None:
        p = self.lead
        return p if p is not None and p.pid == msg.pid else None

    def _matched(self, p: Partition, msg: Message, *kinds: str) -> _Pending | None:
        """The request `msg` answers, removed from the pending ones; None if it answers none (late, stale)."""
        pend = p.pending.get(msg.sender)
        if pend is None or pend.kind not in kinds or pend.sent_at != getattr(msg, "sent_at", None):
            return None
        return p.pending.pop(msg.sender)

    def _on_joined(self, msg: Joined, now: float) -> None:
        p = self._led(msg)
        if p is None:
            self._send(msg.sender, Release(msg.pid, self.name, msg.version))
            return
        pend = self._matched(p, msg, "join", "adopt")
        if pend is not None:
            p.members[msg.sender] = msg.sent_at
            p.version += 1
            if len(p.members) > p.peak:
                p.peak, p.idle_laps = len(p.members), 0
            if pend.kind == "join":  # a free node: we can grow (an adopted one says nothing about that)
                p.joined_this_lap, p.state = True, State.GROWING
        elif msg.sender in p.members:
            p.members[msg.sender] = max(p.members[msg.sender], msg.sent_at)
        # else too late, we gave up on it: it expires, never listed in a keep-alive. No Release: we may ask it
        # again at the same version (nothing changed meanwhile), and this Release could then free it after
        # it joined us for good.

    def _on_alive(self, msg: Alive, now: float) -> None:
        p = self._led(msg)
        if p is not None and msg.sender in p.members:
            p.members[msg.sender] = max(p.members[msg.sender], msg.sent_at)

    def _on_committed(self, msg: Committed, now: float) -> None:
        p = self._led(msg)
        if p is None or self._matched(p, msg, "commit") is None:
            return
        p.members[msg.sender] = max(p.members[msg.sender], msg.sent_at)
        if p.committing == p.version and not any(q.kind == "commit" for q in p.pending.values()):
            p.deadline = p.commit_sent + self.config.apply_timeout
            self._out.append(Apply(p.pid, p.version, tuple(p.members), p.deadline))

    def _on_refuse(self, msg: Refuse, now: float) -> None:
        p = self._led(msg)
        if p is None:
            return
        pend = self._matched(p, msg, "join", "adopt", "merge", "commit")
        if pend is None:
            # a keep-alive refused: the node left (its lease, shorter than ours, ran out), unless stale
            if msg.sender in p.members and msg.sent_at >= p.members[msg.sender] and p.deadline is None:
                self._drop(p, msg.sender, release=False)
            return
        if pend.kind == "commit":
            self._drop(p, msg.sender, release=False)
        elif (pend.kind == "join" and p.state is State.BLOCKED and msg.other not in (None, p.pid)
              and msg.other_leader is not None and not p.pending and p.solving is None):
            self._ask(p, msg.other_leader, "merge", now, msg.other)
            self._send(msg.other_leader, Merge(p.pid, self.name, p.version, now, msg.other))

    def _mergeable(self, p: Partition, other: PartitionId) -> bool:
        """BLOCKED and waiting for nothing but a walk hop or that very partition (the two asked each other at
        once): a hop's late answer is harmless (a join after we yielded is released)."""
        return p.state is State.BLOCKED and p.solving is None and all(
            q.kind == "join" or (q.kind in ("merge", "absorb") and q.target == other) for q in p.pending.values())

    def _on_merge(self, msg: Merge, now: float) -> None:
        p = self.lead
        if p is None or p.pid != msg.target or not self._mergeable(p, msg.pid):
            self._reply_refuse(msg, msg.sent_at)
        elif p.pid < msg.pid:
            self._ask(p, msg.sender, "absorb", now, msg.pid)  # wait for its Yield
            self._send(msg.sender, Absorb(p.pid, self.name, p.version, msg.sent_at, msg.pid))
        else:
            self._yield(p, msg.pid, msg.sender, now)

    def _on_absorb(self, msg: Absorb, now: float) -> None:
        p = self.lead
        if p is None or p.pid != msg.target:
            return
        pend = self._matched(p, msg, "merge")
        if pend is not None and pend.target == msg.pid and msg.pid < p.pid and self._mergeable(p, msg.pid):
            self._yield(p, msg.pid, msg.sender, now)

    def _on_yield(self, msg: Yield, now: float) -> None:
        p = self.lead
        if p is None or p.pid != msg.to or p.state is State.FINISHING or not msg.pid > p.pid:
            return  # its members are orphans: they expire
        pend = p.pending.get(msg.sender)
        if pend is not None and pend.kind in ("merge", "absorb"):
            del p.pending[msg.sender]
        for name in msg.members:
            if name not in p.members and name != self.name:
                self._ask(p, name, "adopt", now)
                self._send(name, Join(p.pid, self.name, p.version + 1, now, msg.pid))

    # ----------------------------------------------------------------------------------------------------
    # Leader's machinery

    def _send(self, to: str, msg: Message) -> None:
        self._out.append(Send(to, msg))

    def _ask(self, p: Partition, name: str, kind: str, now: float, target: PartitionId | None = None) -> None:
        p.pending[name] = _Pending(kind, now, target)

    def _tick_leader(self, p: Partition, now: float) -> None:
        cfg = self.config
        if p.deadline is not None:
            if now >= p.deadline:
                self._end(p, "apply-timeout")
                return
        else:
            for name in [m for m, lease in p.members.items() if now >= lease + cfg.expiry]:
                self._drop(p, name, release=True)  # no ack for a whole lease: it may have freed itself
        if now >= p.next_keepalive:
            p.next_keepalive = now + cfg.keepalive
            members = tuple(p.members)
            for name in members[1:]:
                self._send(name, KeepAlive(p.pid, self.name, p.version, now, members))
        for name in [n for n, q in p.pending.items() if now >= q.sent_at + cfg.reply_timeout]:
            if name in p.pending:  # a failed commit aborts the others of its round
                self._request_failed(p, name, now)
        if p.solving is not None and now >= p.solve_sent + cfg.solve_timeout:
            p.solved, p.solving = p.solving, None
        self._step(now)

    def _request_failed(self, p: Partition, name: str, now: float) -> None:
        pend = p.pending.pop(name)
        if pend.kind == "commit":
            self._drop(p, name, release=True)

    def _drop(self, p: Partition, name: str, release: bool) -> None:
        """Shrink: `name` is out (it failed, refused, or its lease ran out). A commit round in progress is
        aborted (its plan counted on `name`); `_step` then solves the smaller partition."""
        del p.members[name]
        p.pending.pop(name, None)
        p.version += 1
        if release:
            self._send(name, Release(p.pid, self.name, p.version))
        if p.committing is not None:
            for other in list(p.members)[1:]:
                self._send(other, Abort(p.pid, self.name, p.committing))
            p.pending = {n: q for n, q in p.pending.items() if q.kind != "commit"}
            p.committing, p.state = None, State.GROWING

    def _commit(self, p: Partition, now: float) -> None:
        p.state, p.committing, p.commit_sent = State.FINISHING, p.version, now
        members = tuple(p.members)
        for name in members[1:]:
            self._ask(p, name, "commit", now)
            self._send(name, Commit(p.pid, self.name, p.version, now, members, self.config.apply_timeout))

    def _step(self, now: float) -> None:
        """Whatever the leader should do next once idle: solve a membership not solved yet, else the next hop."""
        p = self.lead
        if p is None or p.state is State.FINISHING or p.pending or p.solving is not None:
            return
        if p.solved != p.version and len(p.members) >= 2:
            p.solving, p.solve_sent = p.version, now
            self._out.append(Solve(p.pid, p.version, tuple(p.members)))
        elif p.state is not State.BLOCKED or now >= p.next_hop_at:
            self._hop(p, now)

    def _hop(self, p: Partition, now: float) -> None:
        """Ask the next node of the route not asked during this lap; a lap over ends, blocks or goes on."""
        def unasked() -> str | None:
            return next((n for n in self.route() if n != self.name and n not in p.members and n not in p.visited),
                        None)

        while (candidate := unasked()) is None:
            p.lap += 1
            p.idle_laps += 1
            if p.idle_laps >= self.config.laps:
                self._end(p, "starved")
                return
            p.state = State.GROWING if p.joined_this_lap else State.BLOCKED
            p.joined_this_lap = False
            p.visited.clear()
        p.visited.add(candidate)
        if p.state is State.BLOCKED:
            p.next_hop_at = now + self.config.blocked_pause
        self._ask(p, candidate, "join", now)
        self._send(candidate, Join(p.pid, self.name, p.version + 1, now))

    def _yield(self, p: Partition, to: PartitionId, leader: str, now: float) -> None:
        """End our partition into the smaller one: its leader adopts our members (us too). We stop counting
        them now; each stays ours in its own eyes until adopted or expired."""
        counted = self.counted(now)
        members = tuple(m for m in p.members if m in counted)
        self._send(leader, Yield(p.pid, self.name, p.version, to, members))
        self._end(p, "merged", dissolve=False)
        if self.membership is not None:
            self.membership.heard = now  # an orphan now, like the others: adopted or expired

    def _end(self, p: Partition, reason: str, dissolve: bool = True) -> None:
        members = tuple(p.members)
        if dissolve:
            for name in members[1:]:
                self._send(name, Dissolve(p.pid, self.name, p.version))
            self.membership = None
        self._out.append(Ended(p.pid, reason, members))
        self.lead = None


_HANDLERS: dict[type[Message], str] = {
    Join: "_on_join", Joined: "_on_joined", Refuse: "_on_refuse", KeepAlive: "_on_keepalive", Alive: "_on_alive",
    Commit: "_on_commit", Committed: "_on_committed", Abort: "_on_abort", Release: "_on_release",
    Dissolve: "_on_dissolve", Merge: "_on_merge", Absorb: "_on_absorb", Yield: "_on_yield",
}
