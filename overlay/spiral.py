"""Sans-IO spiral search: the nodes nearest to an origin I, found without global knowledge (DISCOVERY proposal).

**Views.** Every node keeps a `View`: its `size` closest known nodes by its distance oracle, plus `far`
random others, the long-distance entries. The oracle is pluggable, ``distance(a, b) -> float``: Vivaldi
estimates (`vivaldi_distance`), RTTs the node measured itself, or both. A view's far entries rotate: each
`learn` swaps one of them for a random other known node, as a peer-sampling service would; a node that
nobody keeps among its closest (two nodes of a site far from everyone else) then still gets passed around
and found, and the overlay stays connected when all near entries sit in one cluster. What a view starts
from decides the spiral's recall before any learning: an agent knows every member's coordinate through
gossip, and estimates rank the truly nearest nodes badly, so it should probe its nearest members by
estimate and rank them by the RTTs measured (docs/benchmarks.md, "Spiral search": 40 probes per node take
the recall without learning from 0.43-0.50 with 32 random members to 0.84-0.89 on PlanetLab).

**The walk** is a Dijkstra-like expansion outward from I in distance space, driven by the asker's shell
(iteratively, like our Chord lookups: the asker contacts each hop itself). Its parameter ``n`` is the
width of the spiral view: how many nodes closest to I it keeps.

* The *frontier* holds the `n` unvisited candidates closest to I plus `far` random unvisited others
  (its long-distance entries, kept for the whole spiral); it starts as the asker's view.
* `next_hop` returns the frontier node closest to I. Its *key*, the asker's distance to it, is the RTT the
  shell measured when it contacted it, else the smallest of the oracle's ``distance(I, node)`` and the
  path bounds ``key(x) + d_x(x, node)`` that replies brought (Dijkstra's relaxation: a node reports its
  own distance to each entry it returns, so measured short links steer the walk where estimates cannot).
* The shell sends that node the *spiral view* (`spiral_view`: I, the `n` nodes closest to I known so far,
  contacted or not, and the far frontier entries). The node runs `answer`: it replies with the entries
  of its view the spiral view lacks, each with its own distance to it, then LEARNS from the spiral view,
  keeping the nodes closest to itself (`View.learn`). It sits near I, so it receives nodes near itself:
  every spiral improves the views of the nodes it crosses, and later spirals get there in fewer hops.
* `on_reply` merges the entries (keeping the `n` closest to I and the far ones); `on_failure` gives up on
  a node that did not answer: never tried again, never in the result.
* The walk stops when the `n` nodes closest to I are all contacted, at least `count` contacted nodes
  satisfy the predicate and no frontier node is closer to I than the count-th of them (nothing known could
  enter the spiral view's near part nor the result), or when the frontier is empty. With a predicate
  few nodes satisfy, the near candidates run out and the walk carries on through the far entries instead
  of getting stuck.

**What is monotonic.** Each hop is the unvisited node with the smallest key known at that moment. The key
of an unvisited node changes only when a reply names it (a path bound lowers it, a newer coordinate may
move it either way), and a contacted node's key is fixed once it has answered. So the keys of successive
hops are non-decreasing, except right after a reply that named a node nearer to I than the last hop: such
a hop, counted in `backtracks`, is always a node named by the previous reply. When every view holds every
node and the distances form a metric, the frontier always holds the `n` nearest unvisited nodes and there
is no backtrack: the order is Dijkstra's. `result` is sorted by key.

**Termination and cost.** A node is contacted at most once, so a spiral makes at most N - 1 hops. Each
hop is one request (the spiral view: at most n + far + 1 entries) and one reply (at most size + far
entries): ``messages = 2 * hops - failures``. The origin is never contacted nor part of the result: the
asker knows whether it suits the application itself.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from vivaldi.coordinate import Coordinate


@dataclass(frozen=True)
class Entry:
    """A node as views carry it. `coord` is whatever the distance oracle reads (a Vivaldi `Coordinate` in
    agents); `seq` is the coordinate's sequence number, as in membership gossip: the higher one wins."""

    name: str
    addr: str = ""
    coord: Any = None
    seq: int = 0


Distance = Callable[[Entry, Entry], float]
Hinted = tuple[Entry, float]  # an entry with the replier's distance to it


def vivaldi_distance(a: Entry, b: Entry) -> float:
    """The agents' oracle: estimated RTT between the two nodes' Vivaldi coordinates, in seconds."""
    if not isinstance(a.coord, Coordinate) or not isinstance(b.coord, Coordinate):
        raise TypeError(f"vivaldi_distance needs Coordinates, got {a.coord!r} and {b.coord!r}")
    return a.coord.distance_to(b.coord)


def _top_up(kept: list[Entry], pool: list[Entry], slots: int, rng: random.Random) -> list[Entry]:
    """`kept` and random others of `pool`, up to `slots` entries: the long-distance entries."""
    names = {e.name for e in kept}
    others = [e for e in pool if e.name not in names]
    return kept + rng.sample(others, max(0, min(slots - len(kept), len(others))))


class View:
    """One node's neighbour table: its `size` closest known nodes and `far` rotating random others."""

    def __init__(self, me: Entry, distance: Distance, size: int = 16, far: int = 4,
                 rng: random.Random | None = None) -> None:
        if size < 1 or far < 0:
            raise ValueError("a view needs size >= 1 and far >= 0")
        self.me, self.distance, self.size, self.far_size = me, distance, size, far
        self._rng = rng or random.Random()
        self.near: list[Entry] = []
        self.far: list[Entry] = []

    def entries(self) -> list[Entry]:
        return self.near + self.far

    def learn(self, candidates: Iterable[Entry]) -> None:
        """Keep the `size` closest of what we knew and `candidates` (ranked afresh: the oracle may have
        measured something since), and rotate one far entry."""
        known = {e.name: e for e in self.entries()}
        for e in candidates:
            old = known.get(e.name)
            if (old is None or e.seq > old.seq) and e.name != self.me.name:
                known[e.name] = e
        ranked = sorted(known.values(), key=lambda e: (self.distance(self.me, e), e.name))
        self.near, rest = ranked[:self.size], ranked[self.size:]
        far = {e.name for e in self.far}
        kept = [e for e in rest if e.name in far][:self.far_size]
        if kept and len(kept) == self.far_size and len(rest) > len(kept):
            kept.pop(self._rng.randrange(len(kept)))  # the rotation
        self.far = _top_up(kept, rest, self.far_size, self._rng)

    def forget(self, name: str) -> None:
        """Drop a node that failed; the next `learn` refills the slot."""
        self.near = [e for e in self.near if e.name != name]
        self.far = [e for e in self.far if e.name != name]

    def reply_to(self, spiral_view: Iterable[Entry]) -> list[Hinted]:
        """What a contacted node returns: its entries the spiral view lacks (the asker has the others), each
        with our distance to it, which the asker turns into a path bound."""
        sent = {e.name for e in spiral_view}
        return [(e, self.distance(self.me, e)) for e in self.entries() if e.name not in sent]


def answer(view: View, spiral_view: list[Entry]) -> list[Hinted]:
    """The contacted node's side of a hop: reply with what the asker lacks, then learn from the spiral view."""
    reply = view.reply_to(spiral_view)
    view.learn(spiral_view)
    return reply


class SpiralSearch:
    """The asker's state of one spiral; the module docstring gives the protocol."""

    def __init__(self, distance: Distance, far: int = 4, rng: random.Random | None = None) -> None:
        if far < 0:
            raise ValueError("far must be >= 0")
        self.distance, self.far_size = distance, far
        self._rng = rng or random.Random()

    def start(self, origin: Entry, count: int, predicate: Callable[[Entry], bool], n: int,
              known: Iterable[Entry]) -> None:
        """Search the `count` nodes nearest to `origin` that satisfy `predicate`, keeping `n` near nodes in the
        spiral view; `known` is the asker's view. The predicate is evaluated on a node when its reply
        arrives, so the shell may consult what that reply said (free capacity, say)."""
        if count < 1 or n < 1:
            raise ValueError("count and n must be >= 1")
        self.origin, self.count, self.predicate, self.n = origin, count, predicate, n
        self.messages = self.hops = self.failures = self.backtracks = 0
        self._key: dict[str, float] = {}  # current key of every frontier, in-flight and answered node
        self._bound: dict[str, float] = {}  # best path bound by name, kept for nodes trimmed off the frontier
        self._visited: set[str] = set()
        self._answered: list[tuple[float, str, Entry]] = []  # sorted
        self._matches: list[tuple[float, str, Entry]] = []  # sorted
        self._frontier: dict[str, Entry] = {}
        self._far: set[str] = set()
        self._in_flight: Entry | None = None
        self._last = -math.inf
        self._merge(known)

    def key(self, node: Entry) -> float:
        """The asker's distance from the origin to `node`: measured, else the best of oracle and path bounds."""
        known = self._key.get(node.name)
        if known is not None:
            return known
        return min(self.distance(self.origin, node), self._bound.get(node.name, math.inf))

    def _order(self, e: Entry) -> tuple[float, str]:
        return self._key[e.name], e.name

    def next_hop(self) -> Entry | None:
        """The node to contact next, or None when the search is over. One hop at a time: report the
        outcome (`on_reply` or `on_failure`) before asking again."""
        if self._in_flight is not None:
            raise RuntimeError(f"spiral: {self._in_flight.name} has not answered or failed yet")
        if not self._frontier:
            return None
        best = min(self._frontier.values(), key=self._order)
        nearest = self._key[best.name]
        if self._settled(nearest):
            return None
        if nearest < self._last:
            self.backtracks += 1
        self._last = nearest
        del self._frontier[best.name]
        self._far.discard(best.name)
        self._visited.add(best.name)
        self._in_flight = best
        self.hops += 1
        self.messages += 1
        return best

    def _settled(self, frontier: float) -> bool:
        """True when no frontier node (the nearest at `frontier`) could enter the result nor the `n` nearest
        contacted nodes."""
        if len(self._matches) < self.count or frontier < self._matches[self.count - 1][0]:
            return False
        return len(self._answered) >= self.n and frontier >= self._answered[self.n - 1][0]

    def spiral_view(self) -> list[Entry]:
        """What a request carries: the origin, the `n` nodes closest to it known so far (contacted and answered,
        or not contacted yet) and the far frontier entries."""
        waiting = sorted((self._key[name], name, e) for name, e in self._frontier.items() if name not in self._far)
        near = [e for _, _, e in itertools.islice(heapq.merge(self._answered, waiting), self.n)]
        return [self.origin, *near, *(self._frontier[name] for name in sorted(self._far))]

    def on_reply(self, node: Entry, entries: Iterable[Hinted], rtt: float | None = None) -> None:
        """`node` answered with `entries` (from `answer`); `rtt`, if the shell timed the exchange (every RPC of
        ours is an RTT sample), becomes its key."""
        self._landed(node)
        self.messages += 1
        here = self._key[node.name] = self._key[node.name] if rtt is None else rtt
        bisect.insort(self._answered, (here, node.name, node))
        if self.predicate(node):
            bisect.insort(self._matches, (here, node.name, node))
        fresh = []
        for e, d in entries:
            if e.name == self.origin.name or e.name in self._visited:
                continue
            if here + d < self._bound.get(e.name, math.inf):
                self._bound[e.name] = here + d
                if e.name in self._frontier:
                    self._key[e.name] = min(self._key[e.name], here + d)
            fresh.append(e)
        self._merge(fresh)

    def on_failure(self, node: Entry) -> None:
        """`node` did not answer: it is never tried again and stays out of the result."""
        self._landed(node)
        del self._key[node.name]
        self.failures += 1

    def result(self) -> list[Entry]:
        """The `count` (or fewer) nearest contacted nodes satisfying the predicate, nearest first."""
        return [e for _, _, e in self._matches[:self.count]]

    def _landed(self, node: Entry) -> None:
        if self._in_flight is None or node.name != self._in_flight.name:
            raise ValueError(f"spiral: {node.name} is not the hop in flight")
        self._in_flight = None

    def _merge(self, entries: Iterable[Entry]) -> None:
        """Add new candidates, then keep the `n` closest to the origin and the `far` long-distance ones, which
        stay until contacted (dropped whenever the near region looks busy, no long link would survive)."""
        for e in entries:
            old = self._frontier.get(e.name)
            if (old is None or e.seq > old.seq) and e.name != self.origin.name and e.name not in self._visited:
                self._frontier[e.name] = e
                self._key[e.name] = min(self.distance(self.origin, e), self._bound.get(e.name, math.inf))
        ranked = sorted((e for e in self._frontier.values() if e.name not in self._far), key=self._order)
        far = _top_up([self._frontier[name] for name in sorted(self._far)], ranked[self.n:], self.far_size, self._rng)
        self._far = {e.name for e in far}
        self._frontier = {e.name: e for e in (*ranked[:self.n], *far)}
        for e in ranked[self.n:]:
            if e.name not in self._far:
                del self._key[e.name]
