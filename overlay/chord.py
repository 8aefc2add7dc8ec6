"""Sans-IO core of Chord ring maintenance, after Pamela Zave, "How to Make Chord Correct" (2017).

`ChordState` holds one node's view of the ring (predecessor, successor list of length `r`, finger table)
and turns the replies of remote peers into decisions. It never performs I/O, never reads a clock and
never sleeps: an I/O shell runs the periodic tasks, performs the RPCs and feeds the answers back in.

What the shell is expected to do:

* **stabilize** (periodically): ``target = state.stabilize_target()``. If ``target == state.me`` the node
  believes it is alone: call ``state.on_stabilize(state.me, None, [])`` (it consults its own
  predecessor, which is how the first node of a ring discovers the second). Otherwise ask ``target`` for
  its predecessor and successor list; if it does not answer, call ``state.on_dead(target)`` (which
  promotes the next successor) and try again. Feed the answer to ``on_stabilize``; it returns the peer
  to notify. If that notify fails, call ``state.on_dead(peer)`` and notify ``state.successor`` instead.
* **notify** (on receipt): ``state.on_notify(candidate, predecessor_alive=...)``; the shell says whether
  the current predecessor is still alive (or calls ``on_dead`` on it beforehand, e.g. from a periodic
  predecessor check).
* **lookup** (iterative): ask a node for ``lookup_step(key)``; ``(True, p)`` means ``p`` is the
  successor of ``key``; ``(False, p)`` means "ask ``p`` next". A peer that does not answer is reported
  to the node that named it with ``on_dead`` and that node is asked again.
* **fix fingers** (periodically): ``i, target = state.next_finger()``, look up ``target``, then
  ``state.set_finger(i, found)``.
* **join**: find ``successor(me.id)`` through any member, fetch that successor's list, ``join(...)``.
* **leave**: hand ``(me, predecessor, successors)`` to the predecessor and the successor, which call
  ``on_left``.

Successor lists are kept free of duplicates and of ``me``, strictly ordered clockwise from ``me`` and at
most ``r`` long; the single exception is a lone node, whose list is ``[me]``.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

ID_BITS = 64
RING: int = 2**ID_BITS
MAX_LEARNED = 64


def hash_id(text: str) -> int:
    """Ring identifier of a name: the first 8 bytes of its SHA-1, big-endian."""
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big")


def between(x: int, a: int, b: int) -> bool:
    """True if `x` lies strictly inside the clockwise arc (a, b); when a == b the arc is the whole
    circle except `a` itself."""
    if a == b:
        return x % RING != a % RING
    return 0 < (x - a) % RING < (b - a) % RING


def between_right(x: int, a: int, b: int) -> bool:
    """True if `x` lies in the clockwise arc (a, b]; when a == b the arc is the whole circle."""
    if a == b:
        return True
    return 0 < (x - a) % RING <= (b - a) % RING


@dataclass(frozen=True, order=True)
class Peer:
    id: int
    name: str
    addr: str  # "host:port"
    site: str = ""


class ChordState:
    """One node's view of the Chord ring, updated from the replies the shell feeds in."""

    def __init__(self, me: Peer, r: int = 8, distance: Callable[[Peer], float | None] | None = None) -> None:
        """`distance` estimates the latency to a peer (None: unknown); with it, the learned links keep
        the nearer of the peers that cover the same stretch of the ring."""
        if r < 1:
            raise ValueError("the successor list length r must be at least 1")
        if not 0 <= me.id < RING:
            raise ValueError(f"peer id {me.id} is outside the {ID_BITS}-bit ring")
        self.me = me
        self.r = r
        self.predecessor: Peer | None = None
        self.successors: list[Peer] = [me]
        self.fingers: list[Peer | None] = [None] * ID_BITS
        self.learned: OrderedDict[int, Peer] = OrderedDict()
        """Long links memorised from routed requests (least recently seen first), used for routing only."""
        self._coverage: dict[int, OrderedDict[int, Peer]] = {}
        """The learned links by octave of their distance from me (`_octave`), least recently seen first."""
        self.distance = distance
        self._next_finger = 0

    def __repr__(self) -> str:
        pred = self.predecessor.name if self.predecessor else None
        succ = [p.name for p in self.successors]
        return f"ChordState({self.me.name}, pred={pred}, succ={succ})"

    # -- successor list ------------------------------------------------------------------------------

    @property
    def successor(self) -> Peer:
        return self.successors[0]

    def successor_list(self) -> list[Peer]:
        return list(self.successors)

    def _distance(self, peer: Peer) -> int:
        """Clockwise distance from me to `peer` (0 for me)."""
        return (peer.id - self.me.id) % RING

    def _ordered(self, candidates: Iterable[Peer | None]) -> list[Peer]:
        """The leading candidates that go strictly clockwise from me, at most r of them.

        The list is cut where it wraps around: at me, or at an entry that lies before the previous one.
        Whatever a copied list says beyond that point is a stale copy of our own successors. Exact repeats
        are skipped.
        """
        out: list[Peer] = []
        last = 0
        for peer in candidates:
            if peer is None:
                continue
            distance = self._distance(peer)
            if out and distance == last:
                continue
            if distance <= last:
                break
            out.append(peer)
            last = distance
            if len(out) == self.r:
                break
        return out

    def _set_successors(self, candidates: Iterable[Peer | None]) -> None:
        """Install the ordered candidates; if none is left, fall back on the closest known peer
        clockwise (a finger or the predecessor), and only then on being alone."""
        ordered = self._ordered(candidates)
        if not ordered:
            fallbacks = sorted(self._fallbacks(), key=self._distance)
            ordered = self._ordered(fallbacks)[:1]
        self.successors = ordered or [self.me]

    def _fallbacks(self) -> set[Peer]:
        known = {f for f in self.fingers if f is not None and f.id != self.me.id}
        if self.predecessor is not None and self.predecessor.id != self.me.id:
            known.add(self.predecessor)
        return known

    def join(self, successor: Peer, its_successors: list[Peer]) -> None:
        """Enter the ring in front of `successor` (= successor(me.id), found by the shell through any
        member), copying its successor list. One live successor is all a joining node needs."""
        self.predecessor = None
        self._set_successors([successor, *its_successors])

    # -- stabilize / notify (Zave's corrected protocol) ----------------------------------------------

    def stabilize_target(self) -> Peer:
        """Whom to query this round: the first successor (me when alone)."""
        return self.successor

    def on_stabilize(
        self, succ: Peer, its_predecessor: Peer | None, its_successors: list[Peer]
    ) -> Peer | None:
        """Apply the reply of `succ` (predecessor and successor list). Returns the peer to notify,
        i.e. the possibly new first successor, or None when alone (or when the reply is stale because
        `succ` is no longer the first successor)."""
        if succ.id != self.successor.id:
            return None
        if succ.id == self.me.id:
            # Alone as far as we know: our own predecessor, if any, is the rest of the ring.
            its_predecessor = self.predecessor
            candidates: list[Peer | None] = []
        else:
            candidates = [succ, *its_successors]
        if its_predecessor is not None and between(its_predecessor.id, self.me.id, succ.id):
            candidates.insert(0, its_predecessor)
        if not candidates:
            return None
        # Prepend the successor to its own list and drop what no longer fits (Zave's "drop last").
        self._set_successors(candidates)
        return None if self.successor == self.me else self.successor

    def on_notify(self, candidate: Peer, predecessor_alive: bool = True) -> bool:
        """`candidate` believes it is our predecessor (rectify). Adopt it if we have no predecessor, if
        the current one is dead, or if the candidate lies strictly between it and us. Returns True if
        the predecessor changed."""
        if candidate.id == self.me.id:
            return False
        current = self.predecessor
        if (
            current is None
            or not predecessor_alive
            or between(candidate.id, current.id, self.me.id)
            or (candidate.id == current.id and candidate != current)  # same node, fresher address
        ):
            if candidate == current:
                return False
            self.predecessor = candidate
            return True
        return False

    def consider(self, peer: Peer) -> bool:
        """A live peer learnt outside the ring (membership gossip). If it lies between us and our
        successor, it is a better successor: adopt it in front of the list, and the next stabilize
        copies its list. This is what merges rings that formed apart (nodes started together,
        a healed partition), which Chord's own rules cannot do. Returns True if adopted."""
        if peer.id == self.me.id or not between(peer.id, self.me.id, self.successor.id):
            return False
        self._set_successors([peer, *self.successors])
        return True

    # -- failures and departures -----------------------------------------------------------------------

    def on_dead(self, peer: Peer) -> None:
        """The shell found `peer` dead: forget it everywhere. When the first successor dies the next one
        takes over; the list is never left empty."""
        if peer.id == self.me.id:
            return
        if self.predecessor is not None and self.predecessor.id == peer.id:
            self.predecessor = None
        self.fingers = [None if f is not None and f.id == peer.id else f for f in self.fingers]
        self.unlearn(peer.id)
        if any(s.id == peer.id for s in self.successors):
            self._set_successors(s for s in self.successors if s.id != peer.id)

    def learn(self, peer: Peer) -> None:
        """Memorise a peer met while routing (the DISCOVERY paper's learned long links): later lookups
        may jump through it. Bounded; the least recently seen is forgotten first. Successors and
        predecessor stay governed by stabilize alone, so learning can never break the ring."""
        if peer.id == self.me.id:
            return
        octave = self._octave(peer.id)
        links = self._coverage.get(octave)
        if links is None:
            links = self._coverage[octave] = OrderedDict()
        self.learned[peer.id] = links[peer.id] = peer
        self.learned.move_to_end(peer.id)
        links.move_to_end(peer.id)
        if len(self.learned) > MAX_LEARNED:
            self.unlearn(self._eviction_victim())

    def _octave(self, peer_id: int) -> int:
        """1..ID_BITS: the power of two of the clockwise distance from me (a finger's index + 1)."""
        return ((peer_id - self.me.id) % RING).bit_length()

    def _eviction_victim(self) -> int:
        """The learned link to forget when the cache is full: one from the octave that holds the most
        links (the highest on a tie: random peers crowd there), so that the links keep covering every
        distance; within it the farthest by `distance` (unknown counts as farthest), else the least
        recently seen. What a lookup gains from a link is the stretch of ring it jumps, which any link
        of the same octave gives as well; the cheaper one makes that hop cheaper."""
        links = max(self._coverage.items(), key=lambda item: (len(item[1]), item[0]))[1]
        if self.distance is None:
            return next(iter(links))
        costs = [(self.distance(peer), k, peer.id) for k, peer in enumerate(links.values())]
        return max(costs, key=lambda c: (math.inf if c[0] is None else c[0], -c[1]))[2]

    def unlearn(self, peer_id: int) -> None:
        """Forget a learned link (a peer that did not answer, or that an asker had to route around)."""
        if self.learned.pop(peer_id, None) is not None:
            octave = self._octave(peer_id)
            links = self._coverage[octave]
            del links[peer_id]
            if not links:
                del self._coverage[octave]

    def on_left(self, peer: Peer, its_predecessor: Peer | None, its_successors: list[Peer]) -> None:
        """`peer` leaves voluntarily and hands over its predecessor and successor list."""
        if peer.id == self.me.id:
            return
        its_successors = [s for s in its_successors if s.id != peer.id]
        if self.predecessor is not None and self.predecessor.id == peer.id:
            if its_predecessor is not None and its_predecessor.id not in (peer.id, self.me.id):
                self.predecessor = its_predecessor
            else:
                self.predecessor = None
        self.unlearn(peer.id)
        # Keys that went to `peer` now go to its successor.
        heir = its_successors[0] if its_successors else None
        self.fingers = [heir if f is not None and f.id == peer.id else f for f in self.fingers]
        index = next((i for i, s in enumerate(self.successors) if s.id == peer.id), None)
        if index is not None:
            self._set_successors([*self.successors[:index], *its_successors, *self.successors[index + 1 :]])

    # -- routing ----------------------------------------------------------------------------------------

    def known_peers(self) -> set[Peer]:
        """Every peer this node knows of (successors, predecessor, fingers, learned links), without itself."""
        return self._fallbacks() | {s for s in self.successors if s.id != self.me.id} | set(self.learned.values())

    def closest_preceding(self, key: int, avoid: frozenset[int] = frozenset()) -> Peer:
        """The known peer strictly between me and `key` that is closest to `key`; me if there is none.
        Peers whose id is in `avoid` (found dead by the asker) are skipped."""
        # Hot path of every lookup hop: `between(peer.id, me, key)` and `_distance` inlined. The first
        # peer met at the best distance wins (a later copy of the same id, e.g. a stale finger, does not).
        me = self.me.id
        limit = (key - me) % RING or RING  # key == me: the whole circle but me
        best, best_distance = self.me, 0
        previous = None
        for peer in (*self.successors, *self.fingers, self.predecessor):
            if peer is None or peer is previous:  # runs of equal fingers are one object
                continue
            previous = peer
            distance = (peer.id - me) % RING
            if best_distance < distance < limit and not (avoid and peer.id in avoid):
                best, best_distance = peer, distance
        # Learned links, by octave from the key's down to the best so far: the first octave that holds a
        # better peer holds the best one.
        coverage = self._coverage
        for octave in range((limit - 1).bit_length(), best_distance.bit_length() - 1, -1):
            links = coverage.get(octave)
            if links is None:
                continue
            for peer in links.values():
                distance = (peer.id - me) % RING
                if best_distance < distance < limit and not (avoid and peer.id in avoid):
                    best, best_distance = peer, distance
            if best_distance.bit_length() == octave:
                break
        return best

    def lookup_step(self, key: int, avoid: frozenset[int] = frozenset()) -> tuple[bool, Peer]:
        """One step of an iterative lookup answered by this node: (True, successor) if `key` lies in
        (me, successor]; otherwise (False, the closest preceding peer to ask next). Successors and
        fingers in `avoid` are treated as gone, so an asker can route around a dead hop."""
        successor = self.live_successors(avoid)[0]
        if between_right(key, self.me.id, successor.id):
            return True, successor
        return False, self.closest_preceding(key, avoid)

    def live_successors(self, avoid: frozenset[int] = frozenset()) -> list[Peer]:
        """The successor list without the avoided peers ([me] if none is left)."""
        return [p for p in self.successors if p.id not in avoid] or [self.me]

    # -- fingers ----------------------------------------------------------------------------------------

    def finger_target(self, index: int) -> int:
        """The id whose successor fingers[index] should point to: me.id + 2**index."""
        return (self.me.id + (1 << index)) % RING

    def next_finger(self) -> tuple[int, int]:
        """(index, target id) of the finger to fix next, round-robin."""
        index = self._next_finger
        self._next_finger = (index + 1) % ID_BITS
        return index, self.finger_target(index)

    def set_finger(self, index: int, peer: Peer, nearer: Peer | None = None) -> None:
        """Record that `peer` is successor(finger_target(index)). Since no node lies between that target
        and `peer`, the following fingers whose targets fall in that gap get `peer` too, and the
        round-robin skips them.

        Proximity neighbour selection: `nearer` is a peer closer to us by latency that the shell found
        among peer's successors; each of those fingers whose interval [target, target + 2**i) holds
        it points to it instead. Any node of the interval routes as well in hops, and it is cheaper."""
        if not 0 <= index < ID_BITS:
            raise IndexError(f"finger index {index} outside 0..{ID_BITS - 1}")
        gap = (peer.id - self.finger_target(index)) % RING
        j = index
        while j < ID_BITS and (j == index or (1 << j) - (1 << index) <= gap):
            inside = nearer is not None and (nearer.id - self.finger_target(j)) % RING < (1 << j)
            self.fingers[j] = nearer if inside else peer
            j += 1
        if j > index + 1 and self._next_finger == (index + 1) % ID_BITS:
            self._next_finger = j % ID_BITS
