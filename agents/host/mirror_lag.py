"""How far a mirrored disk's copy is behind the disk, from its job's two counters (sans-IO).

A mirror job (`agents.hypervisor.mirror.CopyJob`) counts the bytes it has copied (`cur`) and the bytes it has
known dirty (`end`), both cumulative. Sampled every so often, the samples tell when each stretch of dirty data
became known: the oldest byte not yet copied lies beyond `cur`, so it was made dirty after the last sample
whose `end` was at most `cur`. The lag is the time since that sample: an upper bound, too large by at most
one sampling interval, and 0 when the copy has caught up (`cur == end`). Bytes are copied roughly in the
order they were dirtied (QEMU's mirror walks its dirty bitmap), which is what "oldest" assumes.

`hold_back` bounds the lag (DRBD's congestion policy "block", in effect): once a mirror is more than `max_lag`
behind, the guest's disk writes are capped below what the mirror copies (`copy_rate`, over the last
RATE_WINDOW seconds), so the backlog shrinks; the cap is lifted once the lag is back under half `max_lag`.
"""

from __future__ import annotations

from collections import deque

RATE_WINDOW = 3.0
"""Seconds of samples the copy rate is measured over."""
HOLD_FACTOR = 0.8
"""The share of the copy rate a held-back guest may write: the rest drains the backlog."""
MIN_HOLD = 1 << 20
"""Bytes/s a held-back guest may always write (a mirror that copies nothing must not stop the guest)."""


class MirrorLag:
    """The lag of one mirror job; feed it `sample`s in time order, read `lag`."""

    def __init__(self, now: float) -> None:
        self._known: deque[tuple[float, int]] = deque([(now, 0)])
        """(when, `end` then): for each value `end` took, the last sample that saw it, oldest first; the first
        is at most `cur`."""
        self.cur = 0
        self.end = 0
        self._copied: deque[tuple[float, int]] = deque([(now, 0)])
        """(when, `cur` then) over the last RATE_WINDOW seconds: the copy rate."""

    def sample(self, now: float, cur: int, end: int) -> None:
        """The job's counters at `now` (cumulative: a restarted job is a new `MirrorLag`)."""
        self.cur, self.end = cur, max(end, cur)
        self._copied.append((now, cur))
        while len(self._copied) > 2 and now - self._copied[1][0] >= RATE_WINDOW:
            self._copied.popleft()
        if self.end > self._known[-1][1]:
            self._known.append((now, self.end))
        else:  # nothing new known dirty: what lies beyond was still clean at `now`
            self._known[-1] = (now, self._known[-1][1])
        while len(self._known) > 1 and self._known[1][1] <= cur:
            self._known.popleft()
        if cur >= self.end:  # caught up: what is dirty from now on was dirtied after now
            self._known = deque([(now, self.end)])

    def lag(self, now: float) -> float:
        """Seconds the copy is behind at most: 0 once caught up, else since the last sample that had it all."""
        if self.cur >= self.end:
            return 0.0
        return max(0.0, now - self._known[0][0])

    def copy_rate(self) -> float:
        """Bytes/s the mirror copied over the last RATE_WINDOW seconds (0 before two samples)."""
        (since, first), (until, last) = self._copied[0], self._copied[-1]
        return (last - first) / (until - since) if until > since else 0.0

    @property
    def behind(self) -> int:
        """Bytes known dirty and not yet copied."""
        return self.end - self.cur


def hold_back(lag: float, max_lag: float, copy_rate: float, held: int) -> int | None:
    """The cap on the guest's disk writes (bytes/s; 0: none) that keeps a mirror `lag` seconds behind within
    `max_lag`, given what it copies (`copy_rate`) and the cap set now (`held`, 0: none); None: keep it."""
    if not held and lag > max_lag:
        return max(MIN_HOLD, int(copy_rate * HOLD_FACTOR))
    if held and lag <= max_lag / 2:
        return 0
    return None
