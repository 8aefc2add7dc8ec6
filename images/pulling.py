"""Sans-IO scheduler of a pull: which chunks to ask which holder for, and when.

A pull wants the chunks a node lacks (id and size, in content order) and knows several holders (sources).
Its shell sends each `Request` (`image.chunks`: up to `batch_bytes` of chunks from one source), verifies
every frame of the answer (`images.store.verify_frame`) and reports it with `on_reply`: the ids that
verified, the ids whose bytes did not match, and the source's C3 feedback (its queue length and its
service time for the request). A timeout or a lost connection is `on_failure`. After each event, and at
`wakeup()`, the shell asks `requests(now)` for what to send next; it stops when `done` or `failed`.

**Protocol.**

* Chunks are handed out in content order, `batch_bytes` per request at most (a chunk larger than that
  alone), to the best ready source. Ready: not dropped, and either it never answered yet and has fewer
  than `burst` requests outstanding, or it has fewer than its window and its rate limiter has tokens.
* Window, per source (TCP Vegas's, in batches): what a source reports covers reading its chunks, not
  sending them, so a source whose uplink is the bottleneck queues the replies in its transport, unseen,
  and with them the answers to every other call of the puller on that connection (membership probes
  time out: the source looks dead; measured on the testbed, `benchmarks/image_pull.py`). A reply's
  response time r, against the shortest seen (the source's latency and one batch's sending: nothing
  queued ahead), tells how many of the n requests outstanding when it was sent were queued:
  ``n·(1 − base/r)``. Above `standing_high` the window shrinks by one; below `standing_low`, while the
  window held the source back, it grows: twice as large until a reply first shows half a batch queued
  (slow start), then by one. One step per round trip at most (only for a request sent after the last
  change), between 1 and `window`; it starts at `burst`. A source whose sending is slower than its
  latency keeps a window of 3 (one batch sending, two waiting: its uplink does not idle while the
  puller is slow to ask again, and an answer to anything else waits two batches' sending, 0.34 s at
  100 Mbit/s); one far away grows it until its requests fill the path.
* Best: the lowest C3 score (Suresh et al., NSDI 2015) ``Ψ = R̄ − 1/μ̄ + q̂³/μ̄`` with ``q̂ = 1 + os·w + q̄``:
  R̄ the EWMA of the response time, μ̄ of the service rate, q̄ of the queue the source reported, os its
  outstanding requests here, w `concurrency_weight`. A source not heard from yet scores lowest, so each is
  tried; ties go to fewer outstanding requests, then to a random order drawn once from `rng`.
* Rate control, per source (C3's): a token bucket of `rate` bytes per second, `burst` batches deep. The
  receive rate falls behind the send rate exactly when the source's queue grows (the queue is the
  integral of their difference), so a reply reporting more than `queue_limit` requests waiting, and
  more than the previous reply did, cuts the rate to ``(1 − beta)`` of itself, at most once per round
  trip (only for a request sent after the last cut); a queue that stands, not growing, is the window's
  to shorten (its response times show it). Any other reply, if the rate held the source back, grows the rate along
  the cubic ``R0·(1 + c·(t − K)³)`` (t the time since the last cut, K `recovery`, ``c = beta/K³``,
  R0 the rate then but at most the service rate, where the source saturates: flat near R0, then
  probing beyond it), capped at twice the service rate. Until its first cut, a source's rate is its
  service rate plus `beta`.
* A reply: each verified chunk not received yet is received from that source; one received already counts
  as duplicate bytes. A chunk the source answered neither way is one it lacks (its copy was corrupt, say):
  never asked of it again, asked elsewhere. A chunk whose bytes did not match its id drops the source for
  the rest of the pull (a lying or corrupt holder): its other requests are given up, their chunks queued
  again at the front.
* A failure penalises the source (its response time averages in the whole timeout, its rate is cut) and
  queues the request's chunks again at once; `max_failures` in a row drop it.
* Endgame: when no chunk is left to hand out, a ready source gets the oldest chunks still in flight
  elsewhere, at most `copies` requests carrying a chunk at once, from requests it would likely answer
  sooner (now plus its R̄ before the request's due time: its sending time plus its source's R̄, or at once
  if that source never answered) or that are late (past due): a slow or dead source holds up little.
  When a chunk arrives, requests all of whose chunks have arrived are given up (`on_reply` returns them:
  the shell may cancel them); a reply that comes anyway counts its chunks as duplicates.
* `done` when every chunk is received; `failed` when some chunk is neither received, in flight, nor held
  by a source still in the pull (no source left at all, or all that are left lack it).

**Resume.** Nothing special: a pull built from the chunks the store still lacks (`ChunkStore.missing`)
continues where an interrupted one stopped.

**What it must never do:** count a chunk as received that the shell did not verify (only ids in
`verified`, and only those of the request, count), send anything to a dropped source, put more than
`batch_bytes` in a request (unless one chunk alone is larger), or forget a chunk: each one wanted is
received, in flight, queued, or the pull has `failed`. It never touches a socket, a clock or a file.

**Simplified from C3:** one client, so `w` is a weight (C3: the number of clients) and the feedback is
per request, not per key; response and service times are scaled to a full batch, so a short last batch
does not look like a fast source; "the receive rate is behind the send rate" is read from the queue the
source reports growing (C3 counts responses and requests over fixed intervals of δ), and C3's
hysteresis (no cut within 2δ of an increase) becomes one cut per round trip, as TCP CUBIC does it; the
cubic is scaled by R0, so `recovery` is in seconds whatever the source's speed, and its growth is
capped at twice the service rate instead of C3's fixed step; the service rate the source reports
sets the first rate and bounds R0, instead of a fixed start. A window of outstanding requests per
source, which C3 does not have, keeps the queue C3 cannot see short (Vegas's rule) and bounds what a
source that dies silently holds up until the endgame.
C3's backpressure queue is this core's queue of chunks: nothing is handed out while no source is ready.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class PullConfig:
    """The defaults are tuned with `images.sim` (its docstring has the runs)."""

    batch_bytes: int = 2 << 20
    window: int = 16
    """Requests outstanding per source at most: what a source that dies holds up, until the endgame."""
    standing_low: float = 1.0
    standing_high: float = 2.0
    """Batches queued at a source below which its window grows, above which it shrinks (Vegas's α, β)."""
    burst: int = 2
    """Batches a rate limiter lets through at once, and requests a source gets before its first answer."""
    concurrency_weight: float = 1.0
    alpha: float = 0.9
    """Weight of a new sample in the EWMAs (C3's)."""
    beta: float = 0.2
    recovery: float = 4.0
    """Seconds the cubic takes to bring a cut rate back to where it was cut."""
    queue_limit: int = 2
    """Requests waiting at a source that its rate control lets stand."""
    max_failures: int = 3
    timeout: float = 10.0
    """A request's deadline is at least this far..."""
    timeout_factor: float = 4.0
    """...and at least this many times the source's average response time."""
    copies: int = 2
    """Requests that may carry one chunk at once (the endgame's re-requests)."""

    def __post_init__(self) -> None:
        if self.batch_bytes < 1 or self.window < 1 or self.burst < 1 or self.max_failures < 1 or self.copies < 1:
            raise ValueError(f"batch_bytes, window, max_failures and copies must be at least 1: {self}")
        if not (0 < self.alpha <= 1 and 0 < self.beta < 1 and self.recovery > 0 and self.timeout > 0
                and self.queue_limit >= 0 and self.concurrency_weight >= 0
                and 0 <= self.standing_low <= self.standing_high):
            raise ValueError(f"pull configuration out of range: {self}")


DEFAULT = PullConfig()


@dataclass(frozen=True)
class Request:
    """Ask `source` for `chunks`; report the answer with `on_reply`, or `on_failure` by `deadline`."""

    id: int
    source: str
    chunks: tuple[bytes, ...]
    size: int
    deadline: float


@dataclass
class PullStats:
    """What a pull did so far (`dataclasses.asdict` gives its JSON)."""

    wanted_bytes: int
    bytes: dict[str, int]
    """Verified bytes first received from each source."""
    duplicate_bytes: int = 0
    """Verified bytes received again (an endgame re-request and its original both answered)."""
    requests: int = 0
    re_requests: int = 0
    """Requests carrying a chunk asked before (requeued after a failure or a liar, or the endgame's)."""
    failures: int = 0
    bad_chunks: int = 0
    lacking: int = 0
    """Chunks a source said it lacks."""
    abandoned: int = 0
    """Requests given up because all their chunks arrived from elsewhere."""
    dropped: dict[str, str] = field(default_factory=dict)
    """Source → why it was dropped."""


@dataclass
class _Flight:
    id: int
    source: str
    chunks: tuple[int, ...]
    size: int
    sent_at: float
    deadline: float
    ahead: int
    """Requests outstanding at its source when it was sent, itself included."""


def _ewma(old: float | None, sample: float, alpha: float) -> float:
    return sample if old is None else alpha * sample + (1 - alpha) * old


@dataclass
class _Source:
    """What the pull knows of one source: C3's estimates, its rate limiter, what it lacks."""

    name: str
    order: int
    """Its rank in the random order that breaks ties."""
    rate: float
    """Bytes per second this source may be asked for."""
    tokens: float
    tokens_at: float
    window: int
    """Requests it may have outstanding (Vegas's window)."""
    base: float = math.inf
    """The shortest response time seen: its latency and one batch's sending, nothing queued ahead."""
    paced_at: float = -math.inf
    """When its window last changed."""
    started: bool = True
    """Slow start: its window doubles at each step until a reply shows half a batch queued, then moves by one."""
    peak: float | None = None
    """R0, where the cubic comes back to after the last cut (None: never cut)."""
    decreased_at: float = -math.inf
    limited: bool = False
    """The rate held the source back since its last reply..."""
    windowed: bool = False
    """...or the window did."""
    reported: int | None = None
    """The queue length it last reported."""
    dropped: str | None = None
    outstanding: dict[int, _Flight] = field(default_factory=dict)
    lacks: set[int] = field(default_factory=set)
    failures: int = 0
    response: float | None = None
    mu: float | None = None
    """Service rate, in full batches per second."""
    queue: float = 0.0

    def score(self, w: float) -> tuple[int, float, int, int]:
        os = len(self.outstanding)
        if self.response is None or self.mu is None:
            return 0, 0.0, os, self.order
        q = 1 + os * w + self.queue
        return 1, self.response - 1 / self.mu + q ** 3 / self.mu, os, self.order

    def ready(self, now: float, config: PullConfig) -> bool:
        if self.dropped is not None:
            return False
        if self.mu is None:  # never answered: no rate yet
            return len(self.outstanding) < min(config.burst, config.window)
        if len(self.outstanding) >= self.window:
            self.windowed = True
            return False
        if self._refill(now, config) <= 0:
            self.limited = True
            return False
        return True

    def _refill(self, now: float, config: PullConfig) -> float:
        depth = config.burst * config.batch_bytes
        self.tokens = min(depth, self.tokens + self.rate * max(0.0, now - self.tokens_at))
        self.tokens_at = now
        return self.tokens

    def wakeup(self, now: float, config: PullConfig) -> float | None:
        """When the rate limiter alone keeps this source from being ready, the time it will be."""
        if self.dropped is not None or self.mu is None or len(self.outstanding) >= self.window:
            return None
        tokens = self._refill(now, config)
        return None if tokens > 0 else now + (-tokens) / self.rate + 1e-9

    def deadline(self, now: float, config: PullConfig) -> float:
        expected = 0.0 if self.response is None else config.timeout_factor * self.response
        return now + max(config.timeout, expected)

    def learn(self, f: _Flight, now: float, queue: int, service_time: float, config: PullConfig) -> None:
        """C3's estimates from a reply, scaled to a full batch."""
        full = config.batch_bytes / f.size
        service = max(service_time, 1e-9)
        self.response = _ewma(self.response, (now - f.sent_at) + service * (full - 1), config.alpha)
        self.mu = _ewma(self.mu, 1 / (service * full), config.alpha)
        self.queue = _ewma(self.queue, max(0, queue), config.alpha)
        self.failures = 0
        if self.peak is None:  # never cut yet: the rate follows the service rate, plus `beta`
            self._set_rate(now, self.mu * config.batch_bytes * (1 + config.beta), config)

    def pace(self, f: _Flight, now: float, config: PullConfig) -> None:
        """Vegas's window, at a reply: of the `f.ahead` requests outstanding when `f` was sent, about
        ``ahead·(1 − base/r)`` were queued (r its response time); keep that between `standing_low` and
        `standing_high`, one step at most per round trip. It grows only while it held the source back."""
        response = max(now - f.sent_at, 1e-9)
        self.base = min(self.base, response)
        if f.sent_at < self.paced_at:
            return
        queued = f.ahead * (1 - self.base / response)
        if queued >= config.standing_low / 2:
            self.started = False
        if queued > config.standing_high and self.window > 1:
            self.window, self.paced_at = self.window - 1, now
        elif queued < config.standing_low and self.windowed and self.window < config.window:
            self.window = min(config.window, self.window * 2 if self.started else self.window + 1)
            self.paced_at = now

    def adapt(self, f: _Flight, now: float, queue: int, config: PullConfig) -> None:
        """C3's rate control, at a reply. The receive rate is behind the send rate when the source's queue
        grew since its previous reply, above `queue_limit` (the queue is the integral of their difference):
        then cut the rate, once per round trip (only for a request sent after the last cut). Else, if the
        rate held the source back, grow it along the cubic. (A queue that stands, the window shortens.)"""
        grew = self.reported is not None and queue > self.reported
        if queue > config.queue_limit and grew:
            if f.sent_at >= self.decreased_at:
                self.cut(now, config)
        elif self.limited and self.peak is not None:
            k = config.recovery
            cubic = self.peak * (1 + config.beta / k ** 3 * (now - self.decreased_at - k) ** 3)
            cap = 2 * (self.mu or 0.0) * config.batch_bytes
            if min(cubic, cap) > self.rate:
                self._set_rate(now, min(cubic, cap), config)
        self.reported, self.limited, self.windowed = queue, False, False

    def cut(self, now: float, config: PullConfig) -> None:
        """Cut the rate; the cubic will come back to it, or to the service rate if that is lower: the
        source saturates there."""
        self.peak, self.decreased_at = min(self.rate, (self.mu or math.inf) * config.batch_bytes), now
        self._set_rate(now, self.rate * (1 - config.beta), config)

    def _set_rate(self, now: float, rate: float, config: PullConfig) -> None:
        self._refill(now, config)
        self.rate = max(rate, config.batch_bytes / config.timeout)

    def penalise(self, f: _Flight, now: float, config: PullConfig) -> None:
        self.failures += 1
        self.response = _ewma(self.response, (f.deadline - f.sent_at) * config.batch_bytes / f.size, config.alpha)
        if self.mu is not None:
            self.cut(now, config)


class Pull:
    """One pull's scheduler. Every input takes the time; nothing here waits, sends or reads a clock."""

    def __init__(self, wanted: Sequence[tuple[bytes, int]], sources: Sequence[str], now: float,
                 rng: random.Random, config: PullConfig = DEFAULT) -> None:
        if not sources or len(set(sources)) != len(sources):
            raise ValueError(f"a pull needs distinct sources, got {list(sources)!r}")
        index: dict[bytes, int] = {}
        for cid, size in wanted:
            if not isinstance(cid, bytes) or not cid or not isinstance(size, int) or size <= 0:
                raise ValueError(f"a wanted chunk is an id and a positive size, got {(cid, size)!r}")
            index.setdefault(cid, len(index))
        self.config = config
        self._index = index
        self._ids = list(index)
        sizes = dict(wanted)
        self._sizes = [sizes[cid] for cid in self._ids]
        n = len(self._ids)
        self._received = bytearray(n)
        self._copies = [0] * n
        """Open requests carrying each chunk."""
        self._asked = bytearray(n)
        self._queued = bytearray(b"\x01" * n)
        self._queue: deque[int] = deque(range(n))
        self._retry: deque[int] = deque()
        """Chunks to ask again, before the queue."""
        self._left = n
        order = list(range(len(sources)))
        rng.shuffle(order)
        self._sources = {name: _Source(name, order[i], 0.0, config.burst * config.batch_bytes, now,
                                       min(config.burst, config.window)) for i, name in enumerate(sources)}
        self._open: dict[int, _Flight] = {}
        """Requests awaiting an answer, oldest first."""
        self._sent: dict[int, _Flight] = {}
        self._next_id = 0
        self._stats = PullStats(sum(self._sizes), dict.fromkeys(sources, 0))

    # -- what the shell reads --------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._left == 0

    @property
    def failed(self) -> bool:
        if self.done:
            return False
        live = [s for s in self._sources.values() if s.dropped is None]
        if not live:
            return True
        lacked = set.intersection(*(s.lacks for s in live))
        return any(not self._received[i] and not self._copies[i] for i in lacked)

    def received(self) -> set[bytes]:
        return {self._ids[i] for i in range(len(self._ids)) if self._received[i]}

    @property
    def stats(self) -> PullStats:
        return replace(self._stats, bytes=dict(self._stats.bytes), dropped=dict(self._stats.dropped))

    def wakeup(self, now: float) -> float | None:
        """The next time `requests` may have more to send although nothing was answered: a rate limit, or
        in the endgame an answer overdue."""
        if self.done:
            return None
        times = [t for s in self._sources.values() if (t := s.wakeup(now, self.config)) is not None]
        if not self._queue and not self._retry:
            times += [t for f in self._open.values() if (t := self._due(f)) > now]
        return min(times, default=None)

    # -- inputs ----------------------------------------------------------------------------------------

    def requests(self, now: float) -> list[Request]:
        """The requests to send now, each to the best source ready for one."""
        out: list[Request] = []
        while not self.done:
            ready = [s for s in self._sources.values() if s.ready(now, self.config)]
            for s in sorted(ready, key=lambda s: s.score(self.config.concurrency_weight)):
                chunks = self._take(s) or self._endgame(s, now)
                if chunks:
                    out.append(self._send(s, chunks, now))
                    break
            else:
                break
        return out

    def on_reply(self, request_id: int, now: float, verified: set[bytes], bad: set[bytes], queue: int,
                 service_time: float) -> list[int]:
        """The answer to a request; returns the open requests all of whose chunks have now arrived, given up
        (the shell may cancel them)."""
        f = self._flight(request_id)
        s = self._sources[f.source]
        was_open = f.id in self._open
        if was_open:
            self._close(f)
        duplicated = False
        for i in f.chunks:
            cid = self._ids[i]
            if cid in bad:
                self._stats.bad_chunks += 1
            elif cid in verified:
                if self._received[i]:
                    self._stats.duplicate_bytes += self._sizes[i]
                else:
                    self._received[i] = 1
                    self._left -= 1
                    self._stats.bytes[s.name] += self._sizes[i]
                    duplicated = duplicated or self._copies[i] > 0
            elif i not in s.lacks:
                s.lacks.add(i)
                self._stats.lacking += 1
        if f.chunks and any(self._ids[i] in bad for i in f.chunks):
            self._drop(s, "served bytes that do not match their ids")
        elif s.dropped is None:
            s.learn(f, now, queue, service_time, self.config)
            if was_open:
                s.pace(f, now, self.config)
                s.adapt(f, now, queue, self.config)
        self._requeue(f.chunks)
        return self._abandon() if duplicated else []

    def on_failure(self, request_id: int, now: float) -> None:
        """No answer by the deadline, or the connection was lost."""
        f = self._flight(request_id)
        if f.id not in self._open:
            return
        self._close(f)
        self._stats.failures += 1
        s = self._sources[f.source]
        s.penalise(f, now, self.config)
        if s.failures >= self.config.max_failures:
            self._drop(s, f"{s.failures} requests failed in a row")
        self._requeue(f.chunks)

    # -- plumbing --------------------------------------------------------------------------------------

    def _flight(self, request_id: int) -> _Flight:
        f = self._sent.get(request_id)
        if f is None:
            raise ValueError(f"no request {request_id} was sent in this pull")
        return f

    def _take(self, s: _Source) -> list[int]:
        """The next chunks to hand out that `s` does not lack, up to a batch, from the retries first."""
        batch: list[int] = []
        skipped: list[int] = []
        size = scanned = 0
        for queue in (self._retry, self._queue):
            while queue and scanned < 4096:
                i = queue[0]
                if self._received[i] or self._copies[i]:
                    queue.popleft()
                    self._queued[i] = 0
                    continue
                if batch and size + self._sizes[i] > self.config.batch_bytes:
                    break
                queue.popleft()
                scanned += 1
                if i in s.lacks:
                    skipped.append(i)
                    continue
                self._queued[i] = 0
                batch.append(i)
                size += self._sizes[i]
            queue.extendleft(reversed(skipped))
            skipped = []
            if batch and size >= self.config.batch_bytes:
                break
        return batch

    def _endgame(self, s: _Source, now: float) -> list[int]:
        """Nothing left to hand out: the oldest chunks in flight at other sources, up to a batch, from
        requests that `s` would likely answer sooner, or that are late."""
        mine = {i for f in s.outstanding.values() for i in f.chunks}
        batch: list[int] = []
        size = 0
        for f in self._open.values():
            due = self._due(f)
            if f.source == s.name or due - (s.response or 0.0) <= now <= due:
                continue  # its answer is expected before `s` could bring it, and is not late yet
            for i in f.chunks:
                if (self._received[i] or self._copies[i] >= self.config.copies or i in mine or i in s.lacks):
                    continue
                if batch and size + self._sizes[i] > self.config.batch_bytes:
                    return batch
                batch.append(i)
                size += self._sizes[i]
                mine.add(i)
        return batch

    def _due(self, f: _Flight) -> float:
        """When the answer to `f` is expected: its source's average response time after it was sent (at once
        if that source never answered)."""
        return f.sent_at + (self._sources[f.source].response or 0.0)

    def _send(self, s: _Source, chunks: list[int], now: float) -> Request:
        f = _Flight(self._next_id, s.name, tuple(chunks), sum(self._sizes[i] for i in chunks), now,
                    s.deadline(now, self.config), len(s.outstanding) + 1)
        self._next_id += 1
        self._open[f.id] = self._sent[f.id] = s.outstanding[f.id] = f
        s.tokens -= f.size
        self._stats.requests += 1
        if any(self._asked[i] for i in chunks):
            self._stats.re_requests += 1
        for i in chunks:
            self._copies[i] += 1
            self._asked[i] = 1
        return Request(f.id, s.name, tuple(self._ids[i] for i in chunks), f.size, f.deadline)

    def _close(self, f: _Flight) -> None:
        del self._open[f.id]
        del self._sources[f.source].outstanding[f.id]
        for i in f.chunks:
            self._copies[i] -= 1

    def _requeue(self, chunks: Iterable[int]) -> None:
        for i in chunks:
            if not self._received[i] and not self._copies[i] and not self._queued[i]:
                self._queued[i] = 1
                self._retry.append(i)

    def _drop(self, s: _Source, why: str) -> None:
        s.dropped = self._stats.dropped[s.name] = why
        flights = list(s.outstanding.values())
        for f in flights:
            self._close(f)
        for f in flights:
            self._requeue(f.chunks)

    def _abandon(self) -> list[int]:
        redundant = [f for f in self._open.values() if all(self._received[i] for i in f.chunks)]
        for f in redundant:
            self._close(f)
        self._stats.abandoned += len(redundant)
        return [f.id for f in redundant]
