"""The pull scheduler (`images.pulling`) driven as its shell drives it, and its simulation (`images.sim`).

The table tests walk one behaviour each (an honest source, a liar, a silent one, one lacking chunks, the
endgame, the rate control, the window); the property drives any interleaving of replies and failures from honest,
lying, silent, flaky and lacking sources, and checks after every event what the core must never do."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from images import sim
from images.pulling import DEFAULT, Pull, PullConfig, Request, _Flight, _Source

SMALL = replace(DEFAULT, batch_bytes=10_000, window=2, timeout=5.0)


def chunks(sizes: list[int]) -> list[tuple[bytes, int]]:
    return [(i.to_bytes(4, "big") * 8, size) for i, size in enumerate(sizes)]


def answer(pull: Pull, r: Request, now: float, verified: set[bytes] | None = None, bad: set[bytes] | None = None,
           queue: int = 0) -> list[int]:
    return pull.on_reply(r.id, now, set(r.chunks) if verified is None else verified, bad or set(), queue, 0.01)


def drain(pull: Pull, behave: Callable[[Request, float], str], now: float = 0.0, limit: int = 10_000) -> float:
    """Answer every request in sending order: `behave` says "reply", "lie" or "fail"; time moves on to the
    next rate-limiter wakeup when nothing is open."""
    open_: dict[int, Request] = {}
    for _ in range(limit):
        if pull.done or pull.failed:
            return now
        for r in pull.requests(now):
            open_[r.id] = r
        if not open_:
            wake = pull.wakeup(now)
            assert wake is not None and wake > now, "nothing in flight, nothing to wait for, yet not over"
            now = wake
            continue
        r = open_.pop(min(open_))
        now += 0.01
        what = behave(r, now)
        if what == "fail":
            pull.on_failure(r.id, now)
        else:
            lie = what == "lie"
            for gone in answer(pull, r, now, set() if lie else None, set(r.chunks) if lie else None):
                open_.pop(gone, None)
    raise AssertionError("the pull did not end")


def test_one_honest_source_gets_everything_in_content_order_in_batches() -> None:
    wanted = chunks([3000] * 10 + [25_000] + [4000] * 5)
    pull = Pull(wanted, ["a"], 0.0, random.Random(1), SMALL)
    sent: list[Request] = []
    open_: list[Request] = []
    now = 0.0
    while not pull.done:
        new = pull.requests(now)
        sent += new
        open_ += new
        if open_:
            answer(pull, open_.pop(0), now)
        now += 0.5
    order = [cid for r in sent for cid in r.chunks]
    assert order == [cid for cid, _ in wanted]
    assert all(r.size <= SMALL.batch_bytes or len(r.chunks) == 1 for r in sent)
    assert [r.size for r in sent][:4] == [9000, 9000, 9000, 3000] and any(r.size == 25_000 for r in sent)
    stats = pull.stats
    assert stats.bytes == {"a": 75_000} and stats.duplicate_bytes == 0 and stats.re_requests == 0
    assert pull.received() == {cid for cid, _ in wanted} and not pull.failed


def test_a_liar_is_dropped_and_its_chunks_come_from_the_others() -> None:
    wanted = chunks([1000] * 60)
    pull = Pull(wanted, ["liar", "honest"], 0.0, random.Random(2), SMALL)
    drain(pull, lambda r, now: "lie" if r.source == "liar" else "reply")
    stats = pull.stats
    assert pull.done and stats.dropped == {"liar": "served bytes that do not match their ids"}
    assert stats.bytes == {"liar": 0, "honest": 60_000} and stats.bad_chunks > 0


def test_a_liar_that_is_the_only_source_fails_the_pull() -> None:
    pull = Pull(chunks([1000] * 30), ["liar"], 0.0, random.Random(3), SMALL)
    r = pull.requests(0.0)[0]
    answer(pull, r, 0.1, verified=set(r.chunks[1:]), bad={r.chunks[0]})
    assert pull.failed and not pull.done and pull.requests(0.2) == []
    assert pull.stats.bytes == {"liar": 9000}, "the chunks that verified are the right bytes, whoever sent them"


def test_a_silent_source_is_dropped_after_its_failures_and_its_chunks_move_elsewhere() -> None:
    pull = Pull(chunks([1000] * 200), ["dead", "alive"], 0.0, random.Random(4),
                replace(SMALL, copies=1))  # no endgame re-requests: only failures move the dead one's chunks
    drain(pull, lambda r, now: "fail" if r.source == "dead" else "reply")
    stats = pull.stats
    assert pull.done and stats.failures == SMALL.max_failures
    assert stats.dropped == {"dead": f"{SMALL.max_failures} requests failed in a row"}
    assert stats.bytes == {"dead": 0, "alive": 200_000} and stats.re_requests >= 1


def test_all_sources_gone_fails_the_pull() -> None:
    pull = Pull(chunks([1000] * 100), ["a", "b"], 0.0, random.Random(5), SMALL)
    drain(pull, lambda r, now: "fail")
    assert pull.failed and set(pull.stats.dropped) == {"a", "b"}


def pull_where(holes: dict[str, set[bytes]], wanted: list[tuple[bytes, int]]) -> tuple[Pull, list[Request]]:
    """A pull from a and b answered in sending order, each source lacking its `holes`."""
    pull = Pull(wanted, ["a", "b"], 0.0, random.Random(6), SMALL)
    open_: dict[int, Request] = {}
    sent: list[Request] = []
    now = 0.0
    while not (pull.done or pull.failed):
        new = pull.requests(now)
        sent += new
        open_.update((r.id, r) for r in new)
        r = open_.pop(min(open_))
        now += 0.01
        for gone in answer(pull, r, now, set(r.chunks) - holes.get(r.source, set())):
            open_.pop(gone, None)
    return pull, sent


def test_a_chunk_a_source_lacks_is_asked_elsewhere_and_one_nobody_holds_fails_the_pull() -> None:
    wanted = chunks([1000] * 20)
    missing = wanted[3][0]
    pull, sent = pull_where({"a": {missing}}, wanted)
    assert pull.done and pull.stats.lacking <= 1 and "b" in [r.source for r in sent if missing in r.chunks]
    pull, sent = pull_where({"a": {missing}, "b": {missing}}, wanted)
    assert pull.failed and pull.received() == {cid for cid, _ in wanted} - {missing}
    assert sorted(r.source for r in sent if missing in r.chunks) == ["a", "b"], "each asked once"


def test_endgame_re_requests_a_slow_sources_chunks_and_gives_up_the_original() -> None:
    wanted = chunks([1000] * 40)
    pull = Pull(wanted, ["slow", "fast"], 0.0, random.Random(7), SMALL)
    open_: dict[int, Request] = {}
    now, given_up = 0.0, []
    while not pull.done:
        open_.update((r.id, r) for r in pull.requests(now))
        fast = [r for r in open_.values() if r.source == "fast"]
        assert fast, "the slow source holds everything that is left, yet the fast one is idle"
        r = open_.pop(fast[0].id)
        now += 0.01
        given_up += pull.on_reply(r.id, now, set(r.chunks), set(), 0, 0.01)
    slow = [r for r in open_.values() if r.source == "slow"]
    stats = pull.stats
    assert stats.re_requests >= 1 and stats.failures == 0 and set(given_up) == {r.id for r in slow}
    assert stats.abandoned == len(given_up) and stats.duplicate_bytes == 0
    late = slow[0]  # the slow source answers after all: its chunks are duplicates, nothing else changes
    assert pull.on_reply(late.id, now + 1, set(late.chunks), set(), 0, 0.5) == []
    assert pull.stats.duplicate_bytes == late.size and pull.done


def test_c3_ranks_a_source_that_answers_faster_first() -> None:
    """Each call hands a batch to every ready source, best first; the last batch goes to the best one, and
    the other does not re-request it: it would not bring it sooner."""
    pull = Pull(chunks([1000] * 90), ["slow", "fast"], 0.0, random.Random(8), replace(SMALL, window=1))
    now, order = 0.0, []
    while not pull.done:
        new = pull.requests(now)
        order.append([r.source for r in new])
        for r in new:
            slow = r.source == "slow"
            pull.on_reply(r.id, now + (0.2 if slow else 0.02), set(r.chunks), set(), 3 if slow else 0,
                          0.1 if slow else 0.01)
        now += 1.0
    assert sorted(order[0]) == ["fast", "slow"], "neither known yet: both tried"
    assert all(o == ["fast", "slow"] for o in order[1:-1]) and order[-1] == ["fast"]


def test_rate_control_paces_requests_and_cuts_once_per_round_trip_when_the_queue_grows() -> None:
    config = replace(DEFAULT, batch_bytes=1000, window=100, burst=1)
    pull = Pull(chunks([1000] * 1000), ["a"], 0.0, random.Random(9), config)
    first = pull.requests(0.0)
    assert len(first) == 1 and pull.requests(0.05) == [] and pull.wakeup(0.05) is None, "one request until it answers"
    answer(pull, first[0], 0.1)  # served in 0.01 s: 100 kB/s; the rate starts there, plus beta
    source = pull._sources["a"]
    assert source.rate == pytest.approx(120_000)
    source.window = config.window  # held open: the rate alone paces here (the window has its own test)
    sent: list[Request] = []
    now = 0.1
    while now < 0.2:
        sent += pull.requests(now)
        now = pull.wakeup(now) or math.inf
    assert len(sent) == pytest.approx(12, abs=1), "120 kB/s for 0.1 s, in batches of 1000 bytes"
    for queue, r in enumerate(sent, start=3):  # the queue grows reply after reply: the receive rate is behind
        answer(pull, r, 0.3, queue=queue)
    assert source.rate == pytest.approx(120_000 * (1 - config.beta)), "one cut for what was sent before it"
    later = pull.requests(0.31)
    answer(pull, later[0], 0.4, queue=50)
    assert source.rate == pytest.approx(120_000 * (1 - config.beta) ** 2), "a request sent after the cut cuts again"
    [then] = pull.requests(0.41)
    answer(pull, then, 4.0, queue=0)  # the queue drained: the cubic brings the rate back towards 100 kB/s
    assert 120_000 * (1 - config.beta) ** 2 < source.rate <= 100_000


def test_the_window_keeps_what_queues_at_a_source_between_its_bounds_one_step_per_round_trip() -> None:
    """Vegas's rule on replies of known response time r: of the `ahead` requests outstanding when one was sent,
    ahead·(1 − base/r) were queued; kept between 1 and 2 batches, doubling until half a batch shows."""
    config = replace(DEFAULT, window=8)

    def reply(ahead: int, sent_at: float, now: float) -> None:
        source.pace(_Flight(0, "a", (), 1000, sent_at, math.inf, ahead), now, config)

    source = _Source("a", 0, 0.0, 0.0, 0.0, 2)
    reply(1, 0.0, 0.1)
    assert source.base == 0.1 and source.window == 2, "nothing queued, but the window did not hold it back"
    source.windowed = True
    reply(2, 0.1, 0.2)
    assert source.window == 4, "nothing queued: slow start doubles it"
    reply(2, 0.15, 0.35)
    assert source.window == 4, "sent before the last change: one step per round trip"
    reply(4, 0.2, 0.5)  # 4 · (1 − 0.1/0.3) ≈ 2.7 batches queued
    assert source.window == 3 and not source.started, "too much queued: one smaller, and slow start is over"
    reply(3, 0.5, 0.65)  # 3 · (1 − 0.1/0.15) = 1 batch queued: one sending, one waiting
    assert source.window == 3
    reply(2, 0.65, 0.75)
    assert source.window == 4, "nothing queued again: one larger, not twice"
    for t in range(10):
        reply(8, 1.0 + t, 2.0 + t)
    assert source.window == 1, "never below one"
    for t in range(20):
        reply(1, 20.0 + t, 20.1 + t)
    assert source.window == config.window, "never above the configured window"


def test_a_holder_behind_a_slow_uplink_has_two_replies_waiting_at_most_and_a_far_one_still_fills_its_path() -> None:
    """What a holder reports covers its disk, not its uplink: without the window, the testbed's 100 Mbit/s
    uplinks held 2.5 s of replies, and the puller's membership probes (1 s) waiting behind them timed out."""
    near = sim.run(1 << 30, [sim.Holder(12.5, latency=0.001)] * 3)
    sending = DEFAULT.batch_bytes / 12.5e6
    assert near.uplink_wait_max <= 3 * sending and near.seconds <= 1.01 * near.uplink_seconds
    far = sim.run(1 << 30, [sim.Holder(120, latency=0.1)] * 3)
    assert far.seconds <= 1.1 * far.uplink_seconds, "its window grew until its requests filled the path"
    assert far.uplink_wait_max <= 2 * 0.1, "slow start overshoots by a round trip at most"


def test_resume_asks_only_for_what_is_still_missing() -> None:
    wanted = chunks([1000] * 30)
    first = Pull(wanted, ["a"], 0.0, random.Random(10), SMALL)
    r = first.requests(0.0)[0]
    answer(first, r, 0.1)  # then the puller stops; its store holds what it received
    held = first.received()
    again = Pull([w for w in wanted if w[0] not in held], ["a"], 1.0, random.Random(10), SMALL)
    drain(again, lambda r, now: "reply", 1.0)
    assert again.done and not held & again.received() and held | again.received() == {c for c, _ in wanted}


@pytest.mark.parametrize("args", [
    ([], []), ([(b"x", 1)], ["a", "a"]), ([(b"x", 0)], ["a"]), ([("x", 1)], ["a"]),
])
def test_bad_input_is_refused_in_one_line(args: tuple[list[tuple[bytes, int]], list[str]]) -> None:
    with pytest.raises(ValueError) as err:
        Pull(*args, 0.0, random.Random(0))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError):
        PullConfig(window=0)


# -- any interleaving ------------------------------------------------------------------------------------

BEHAVIOURS = ("honest", "liar", "silent", "flaky", "lacking", "sometimes-lies")


@dataclass
class World:
    """The shell and the sources as the property test plays them."""

    pull: Pull
    kinds: dict[str, str]
    wanted: dict[bytes, int]
    holes: dict[str, set[bytes]]
    open_: dict[int, Request] = field(default_factory=dict)
    late: list[Request] = field(default_factory=list)
    """Requests given up on (failed, abandoned) that may still be answered."""
    first: dict[bytes, str] = field(default_factory=dict)
    """Who first delivered each chunk, verified: what the pull must count."""
    delivered: int = 0
    now: float = 0.0

    def send(self) -> None:
        dropped = self.pull.stats.dropped
        received = self.pull.received()
        for r in self.pull.requests(self.now):
            assert r.source not in dropped
            assert r.size <= self.pull.config.batch_bytes or len(r.chunks) == 1
            assert r.size == sum(self.wanted[c] for c in r.chunks) and r.chunks
            assert not received & set(r.chunks), "a request for a chunk already received"
            self.open_[r.id] = r

    def act(self, pick: int, roll: float) -> None:
        """Answer (or fail) an open request; now and then, answer late one that was given up on."""
        late = roll > 0.9 and self.late
        r = self.late.pop(pick % len(self.late)) if late else self.open_.pop(sorted(self.open_)[pick % len(self.open_)])
        kind = self.kinds[r.source]
        self.now += 0.01 + roll
        if not late and (kind == "silent" or (kind == "flaky" and roll < 0.3)):
            self.pull.on_failure(r.id, self.now)
            if kind == "flaky":
                self.late.append(r)
            return
        bad = set(r.chunks) if kind == "liar" else {r.chunks[0]} if kind == "sometimes-lies" and roll < 0.5 else set()
        verified = set(r.chunks) - bad - self.holes.get(r.source, set())
        for cid in verified:
            if cid not in self.first:
                self.first[cid] = r.source
            self.delivered += self.wanted[cid]
        for gone in self.pull.on_reply(r.id, self.now, verified, bad, int(roll * 5), roll / 10):
            self.late.append(self.open_.pop(gone))

    def check(self) -> None:
        stats = self.pull.stats
        per_source = {s: sum(self.wanted[c] for c, by in self.first.items() if by == s) for s in self.kinds}
        assert stats.bytes == per_source
        assert self.pull.received() == set(self.first)
        assert stats.duplicate_bytes == self.delivered - sum(per_source.values())
        assert all(stats.bytes[s] == 0 for s, k in self.kinds.items() if k == "liar")


@given(sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=60),
       kinds=st.lists(st.sampled_from(BEHAVIOURS), min_size=0, max_size=3),
       steps=st.lists(st.tuples(st.integers(0, 50), st.floats(0, 1)), max_size=80),
       window=st.integers(1, 3), copies=st.integers(1, 3), seed=st.integers(0, 3))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_every_chunk_arrives_once_verified_whatever_the_interleaving(
        sizes: list[int], kinds: list[str], steps: list[tuple[int, float]], window: int, copies: int,
        seed: int) -> None:
    rng = random.Random(seed)
    kinds = [*kinds, "honest"]
    rng.shuffle(kinds)
    names = [f"s{i}" for i in range(len(kinds))]
    wanted = dict(chunks(sizes))
    ids = list(wanted)
    holes = {name: {c for c in ids if rng.random() < 0.3} for name, k in zip(names, kinds, strict=True)
             if k == "lacking"}
    config = replace(DEFAULT, batch_bytes=8000, window=window, copies=copies, max_failures=2)
    w = World(Pull(list(wanted.items()), names, 0.0, rng, config), dict(zip(names, kinds, strict=True)), wanted, holes)
    for pick, roll in [*steps, *[(0, 0.5)] * 2000]:  # the drawn interleaving, then answers until the end
        w.send()
        if w.pull.done or w.pull.failed:
            break
        if not w.open_ and not (roll > 0.9 and w.late):
            wake = w.pull.wakeup(w.now)
            assert wake is not None and wake > w.now, "nothing in flight, nothing to wait for, yet not over"
            w.now = wake
            continue
        w.act(pick, roll)
        w.check()
    assert w.pull.done and not w.pull.failed, "an honest source holds every chunk"
    assert w.pull.received() == set(ids)
    dropped = w.pull.stats.dropped
    assert all(name in dropped for name, k in w.kinds.items() if k == "liar" and name in w.first.values())


# -- the simulation --------------------------------------------------------------------------------------

def test_the_simulated_pull_meets_the_issues_goals() -> None:
    """1 GiB of 8 KiB-average chunks: 3 holders of 40 MB/s ≥ 2.5× faster than 1, ≤ 5 % duplicate bytes;
    one of 3 killed mid-pull ≤ 1.5× the time; a liar dropped and none of its bytes used."""
    size = 1 << 30
    one = sim.run(size, [sim.Holder(40)])
    three = sim.run(size, [sim.Holder(40)] * 3)
    killed = sim.run(size, [sim.Holder(40), sim.Holder(40, dies_at=5.0), sim.Holder(40)])
    lying = sim.run(size, [sim.Holder(40), sim.Holder(40), sim.Holder(40, liar=True)])
    assert all(r.done for r in (one, three, killed, lying))
    assert one.seconds / three.seconds >= 2.5
    assert three.duplicate_pct <= 5 and killed.duplicate_pct <= 5
    assert killed.seconds <= 1.5 * three.seconds
    assert lying.dropped == {"h2": "served bytes that do not match their ids"} and lying.bytes_per_source["h2"] == 0


def test_the_simulation_runs_from_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    sim.main(["--size-mib", "64", "--holders", "40,20", "--kill", "1@0.5", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["done"] and result["holders"]["h1"]["dies_at"] == 0.5 and result["duplicate_pct"] <= 5
    with pytest.raises(SystemExit, match="INDEX@SECONDS"):
        sim.main(["--kill", "one"])
