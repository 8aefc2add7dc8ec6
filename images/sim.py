"""A pull on a virtual clock: the production `images.pulling.Pull` driven as its shell drives it, against
simulated holders.

The model: one receiver whose downlink never limits; each holder has an uplink of `mb_s` MB/s (10⁶ bytes)
and a per-request latency (round trip: a request reaches it after half, a reply reaches the receiver half
after the holder finished sending it). A holder reads its requests one at a time, in arrival order, each
taking ``size / disk_mb_s`` (its service time, which it reports, with the requests still waiting for
the disk behind it: `images.service` measures just that), then queues the reply for its uplink, which
sends one at a time, in order, each taking ``size / mb_s``: what waits there the holder cannot report
(its transport holds it), and every other answer on that connection waits behind it (`uplink_wait`:
what the puller's membership probes, which time out after 1 s, would wait). A holder may die at a given
time, silently (its queues and the reply it was sending are lost; the shell finds out at the request's
deadline only: the worst case), or lie (every chunk it sends fails verification). The shell's side: it
sends what `requests` gives, fails a request at its deadline, calls `requests` again after every event
and at `wakeup`, cancels what `on_reply` says was given up (a cancel reaches the holder after half the
latency; one already being read or sent is sent in full and thrown away) and stops at `done` or `failed`.

Chunk sizes follow FastCDC's shape (min 2 KiB, average 8 KiB, max 64 KiB). Reported: completion time,
the time the uplinks alone would need, duplicate bytes (received twice) and wasted bytes (sent for a
request the shell had cancelled or failed), bytes per source, requests and re-requests, dropped sources,
how long replies waited in an uplink's queue (median and longest).

    python -m images.sim --size-mib 1024 --holders 40,40,40 [--kill 1@5.0] [--liar 2] [--json]

What the defaults give (1 GiB, 130,815 chunks, 20 ms, seed 1; seconds, the uplinks alone, and how long
replies waited in an uplink's queue, median and longest):

    holders                 time    alone   wait          notes
    40                     26.87    26.84   0.08, 0.13
    40,40                  13.46    13.42   0.08, 0.13
    40,40,40                8.99     8.95   0.08, 0.13    2.99x faster than one holder, 0 duplicate bytes
    40,40,40 --kill 1@5    11.01     8.95   0.08, 0.13    1.22x; h1's requests re-requested when late
    40,40,40 --liar 2      13.46    13.42   0.08, 0.13    h2 dropped at its first reply, none of its bytes used
    40,40,4                12.84    12.78   0.08, 1.54    the slow holder: two replies waiting, 1 s
    40,40,40, 300 ms        9.68     8.95   0.16, 0.48    slow start fills the path in a few round trips
    40,40,40 --jitter .3    9.02     8.95   0.08, 0.21
    400,400,400             1.51     0.90   0.00, 0.00    bound by the holders' reads (250 MB/s each: 1.43)
    12.5 x3, 1 ms          28.69    28.63   0.33, 0.49    the testbed's 100 Mbit/s uplinks
    12.5 x3, 1 ms, 1@7     39.56    28.63   0.33, 0.49    the uplinks' own limit with h1 gone at 7 s: 39.5

With the window fixed at 16 requests (before the Vegas window) the same runs took as long (9.53 s at
300 ms, 1.50 s at 400 MB/s), but replies waited 0.76 s at 40 MB/s, 2.5 s at 12.5 MB/s and up to 7.8 s
behind the 4 MB/s holder: on the testbed the puller's membership probes timed out behind them. Behind
an uplink slow enough that two batches take over a second to send (under 30 Mbit/s) they still would.
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import statistics
import sys
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

from images.pulling import DEFAULT, Pull, PullConfig, Request

MB = 1_000_000


@dataclass(frozen=True)
class Holder:
    mb_s: float
    latency: float = 0.02
    """Seconds, round trip of one request."""
    dies_at: float | None = None
    liar: bool = False
    jitter: float = 0.0
    """Each sending time is drawn uniformly within this fraction of its mean (other traffic, CPU)."""
    disk_mb_s: float = 250.0
    """How fast it reads and checks what it serves (2 MiB in 5 to 10 ms on the testbed's agents)."""


@dataclass(frozen=True)
class Outcome:
    """The figures of one simulated pull (`dataclasses.asdict` gives its JSON)."""

    size_bytes: int
    chunks: int
    done: bool
    failed: bool
    seconds: float
    uplink_seconds: float
    """What the honest holders' uplinks alone would take, all of them alive."""
    duplicate_bytes: int
    wasted_bytes: int
    duplicate_pct: float
    """Duplicate and wasted bytes, % of the size."""
    bytes_per_source: dict[str, int]
    requests: int
    re_requests: int
    failures: int
    abandoned: int
    dropped: dict[str, str]
    uplink_wait_p50: float
    uplink_wait_max: float
    """Seconds a reply waited in its holder's uplink queue before its sending began."""
    holders: dict[str, Holder]


@dataclass
class _Holder:
    holder: Holder
    disk: deque[Request] = field(default_factory=deque)
    reading: Request | None = None
    uplink: deque[tuple[Request, float, int, float]] = field(default_factory=deque)
    """Replies to send: the request, its service time, the queue reported, when it was queued."""
    sending: tuple[Request, float, int] | None = None
    cancelled: set[int] = field(default_factory=set)
    dead: bool = False


def chunk_sizes(total: int, rng: random.Random, avg: int = 8192, low: int = 2048, high: int = 65536) -> list[int]:
    """Sizes adding up to `total`, shaped like FastCDC's: a minimum, an exponential tail, a maximum."""
    sizes, left = [], total
    while left > 0:
        size = min(left, max(low, min(high, low + int(rng.expovariate(1 / (avg - low))))))
        sizes.append(size)
        left -= size
    return sizes


def run(size_bytes: int, holders: Sequence[Holder], seed: int = 1, config: PullConfig = DEFAULT,
        cancels: bool = True) -> Outcome:
    """Pull `size_bytes` of chunks from `holders` (named h0, h1, ...); the figures of that pull. Without
    `cancels`, holders serve what the shell gave up on anyway (a transport that cannot cancel)."""
    if size_bytes <= 0 or not holders:
        raise ValueError("a simulated pull needs a positive size and at least one holder")
    rng = random.Random(seed)
    wanted = [(rng.randbytes(32), size) for size in chunk_sizes(size_bytes, rng)]
    names = [f"h{i}" for i in range(len(holders))]
    uplinks = {name: _Holder(h) for name, h in zip(names, holders, strict=True)}
    pull = Pull(wanted, names, 0.0, random.Random(seed + 1), config)
    events: list[tuple[float, int, str, object]] = []
    seq = 0

    def at(t: float, kind: str, what: object) -> None:
        nonlocal seq
        heapq.heappush(events, (t, seq, kind, what))
        seq += 1

    calls: dict[int, Request] = {}
    waits: list[float] = []
    wasted = 0
    wakeups: set[float] = set()
    for name, h in zip(names, holders, strict=True):
        if h.dies_at is not None:
            at(h.dies_at, "die", name)

    def read(u: _Holder, now: float) -> None:
        while u.reading is None and u.disk and not u.dead:
            r = u.disk.popleft()
            if r.id in u.cancelled:
                continue
            u.reading = r
            service = r.size / (u.holder.disk_mb_s * MB)
            at(now + service, "read", (r.source, service))

    def serve(u: _Holder, now: float) -> None:
        while u.sending is None and u.uplink and not u.dead:
            r, service, queue, queued_at = u.uplink.popleft()
            if r.id in u.cancelled:
                continue
            u.sending = (r, service, queue)
            waits.append(now - queued_at)
            at(now + r.size / (u.holder.mb_s * MB) * (1 + u.holder.jitter * rng.uniform(-1, 1)), "sent", r.source)

    def send(now: float) -> None:
        for r in pull.requests(now):
            calls[r.id] = r
            at(now + uplinks[r.source].holder.latency / 2, "arrive", r)
            at(r.deadline, "deadline", r.id)
        t = pull.wakeup(now)
        if t is not None and t not in wakeups:
            wakeups.add(t)
            at(t, "wakeup", None)

    def cancel(ids: Sequence[int], now: float) -> None:
        for rid in ids:
            r = calls.pop(rid)
            at(now + uplinks[r.source].holder.latency / 2, "cancel", r)

    now = 0.0
    send(now)
    while events and not pull.done and not pull.failed:
        now, _, kind, what = heapq.heappop(events)
        if kind == "arrive" and isinstance(what, Request):
            u = uplinks[what.source]
            if not u.dead:
                u.disk.append(what)
                read(u, now)
        elif kind == "cancel" and isinstance(what, Request) and cancels:
            uplinks[what.source].cancelled.add(what.id)
        elif kind == "read" and isinstance(what, tuple):
            u = uplinks[what[0]]
            r, u.reading = u.reading, None
            if r is not None and not u.dead:
                u.uplink.append((r, what[1], len(u.disk), now))
                serve(u, now)
            read(u, now)
        elif kind == "sent" and isinstance(what, str):
            u = uplinks[what]
            sent, u.sending = u.sending, None
            if sent is not None and not u.dead:
                at(now + u.holder.latency / 2, "reply", sent)
            serve(u, now)
        elif kind == "reply" and isinstance(what, tuple):
            r, service, queue = what
            if calls.pop(r.id, None) is None:
                wasted += r.size
                continue
            lies = uplinks[r.source].holder.liar
            given_up = pull.on_reply(r.id, now, set() if lies else set(r.chunks), set(r.chunks) if lies else set(),
                                     queue, service)
            cancel(given_up, now)
        elif kind == "deadline" and isinstance(what, int):
            if calls.pop(what, None) is not None:
                pull.on_failure(what, now)
        elif kind == "die" and isinstance(what, str):
            u = uplinks[what]
            u.dead, u.reading, u.sending = True, None, None
            u.disk.clear()
            u.uplink.clear()
        elif kind == "wakeup" and isinstance(what, type(None)):
            wakeups.discard(now)
        send(now)
    stats = pull.stats
    total = sum(size for _, size in wanted)
    honest = sum(h.mb_s for h in holders if not h.liar) or sum(h.mb_s for h in holders)
    return Outcome(total, len(wanted), pull.done, pull.failed, round(now, 3), round(total / (honest * MB), 3),
                   stats.duplicate_bytes, wasted, round(100 * (stats.duplicate_bytes + wasted) / total, 2),
                   stats.bytes, stats.requests, stats.re_requests, stats.failures, stats.abandoned, stats.dropped,
                   round(statistics.median(waits or [0.0]), 3), round(max(waits, default=0.0), 3),
                   dict(zip(names, holders, strict=True)))


def _holders(args: argparse.Namespace) -> list[Holder]:
    try:
        speeds = [float(x) for x in args.holders.split(",")]
        kills = {int(i): float(t) for i, t in (k.split("@") for k in args.kill)}
    except ValueError:
        raise SystemExit("--holders is MB/s,MB/s,... and --kill is INDEX@SECONDS") from None
    if any(s <= 0 for s in speeds) or any(not 0 <= i < len(speeds) for i in [*kills, *args.liar]):
        raise SystemExit(f"--holders must be positive, --kill and --liar indexes below {len(speeds)}")
    return [Holder(s, args.latency_ms / 1000, kills.get(i), i in args.liar, args.jitter) for i, s in enumerate(speeds)]


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m images.sim", description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mib", type=float, default=1024, help="Bytes of chunks to pull, MiB.")
    p.add_argument("--holders", default="40,40,40", help="Uplink of each holder, MB/s, comma-separated.")
    p.add_argument("--latency-ms", type=float, default=20.0, help="Round trip of a request, ms.")
    p.add_argument("--jitter", type=float, default=0.0, help="Service times vary by up to this fraction.")
    p.add_argument("--kill", action="append", default=[], metavar="INDEX@SECONDS", help="A holder dies then.")
    p.add_argument("--liar", action="append", type=int, default=[], metavar="INDEX", help="A holder that lies.")
    p.add_argument("--batch-mib", type=float, default=DEFAULT.batch_bytes / (1 << 20), help="Bytes per request.")
    p.add_argument("--window", type=int, default=DEFAULT.window, help="Requests outstanding per holder at most.")
    p.add_argument("--no-cancel", action="store_true", help="Holders serve the requests the shell gave up on.")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", action="store_true", help="Print the figures as JSON.")
    args = p.parse_args(argv)
    if args.size_mib <= 0 or args.latency_ms < 0 or not 0 <= args.jitter < 1:
        raise SystemExit("--size-mib must be positive, --latency-ms not negative, --jitter in [0, 1)")
    config = replace(DEFAULT, batch_bytes=max(1, int(args.batch_mib * (1 << 20))), window=args.window)
    result = run(int(args.size_mib * (1 << 20)), _holders(args), args.seed, config, not args.no_cancel)
    if args.json:
        json.dump(asdict(result), sys.stdout, indent=2)
        print()
        return
    print(f"{args.size_mib:g} MiB in {result.chunks} chunks: {'done' if result.done else 'FAILED'} in "
          f"{result.seconds} s (uplinks alone: {result.uplink_seconds} s), {result.duplicate_pct} % duplicate "
          f"or wasted bytes, {result.requests} requests ({result.re_requests} re-requests), "
          f"dropped: {result.dropped or 'none'}; replies waited {result.uplink_wait_p50} s in an uplink's queue "
          f"(longest {result.uplink_wait_max} s)")


if __name__ == "__main__":
    main()
