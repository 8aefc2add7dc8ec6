"""The lag of a mirror job from samples of its two cumulative counters (agents.host.mirror_lag, sans-IO): worked
examples (caught up, stalled, catching up, a steady stream), then, over random monotone sample sequences
(hypothesis), the bounds the module docstring promises.

Terms of the properties, for samples (t_i, cur_i, end_i) fed in time order after `MirrorLag(t0)`: the effective
end of a sample is max(end_i, cur_i) (the job never copied more than it knew dirty), and the construction
counts as a sample (t0, 0, 0). With `cur` and `end` the last sample's counters, the oldest byte not yet copied
is byte `cur` (0-based); it became known at the first sample whose end exceeds `cur` (`t_known`), and was
dirtied after the last sample whose end is at most `cur` (`t_clean`): those two samples are consecutive, so the
true lag lies between now - t_known and now - t_clean, one sampling interval apart."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.host.mirror_lag import MIN_HOLD, MirrorLag, hold_back
from agents.host.replication import POLL


def test_a_new_job_and_a_caught_up_one_lag_nothing() -> None:
    lag = MirrorLag(100.0)
    assert (lag.lag(500.0), lag.behind) == (0.0, 0)
    lag.sample(101.0, 4096, 4096)
    assert (lag.lag(101.0), lag.lag(300.0), lag.behind) == (0.0, 0.0, 0)


@pytest.mark.parametrize("stalled", [0.5, 3.0, 7.0, 60.0])
def test_dirty_data_left_uncopied_for_n_seconds_lags_about_n(stalled: float) -> None:
    """Caught up at the sample of t=10, a write at 10.2, then the copy stalls: sampled every POLL, the lag is
    at least the true age of the write, and too large by at most one sampling interval."""
    lag = MirrorLag(0.0)
    lag.sample(10.0, 1000, 1000)
    written, now = 10.2, 10.0
    while now < written + stalled:
        now += POLL
        lag.sample(now, 1000, 1500)
    assert now - written <= lag.lag(now) <= now - written + POLL
    assert lag.lag(now) == now - 10.0  # since the last sample that had it all
    assert lag.behind == 500
    assert lag.lag(now + 2.0) == lag.lag(now) + 2.0  # read later without new samples: older still


def test_the_lag_drops_to_nothing_once_the_copy_reaches_the_end_and_counts_afresh_after() -> None:
    lag = MirrorLag(0.0)
    lag.sample(1.0, 0, 1 << 20)  # the first pass: the whole disk known dirty
    lag.sample(5.0, 1 << 19, 1 << 20)
    assert lag.lag(5.0) == 5.0 and lag.behind == 1 << 19  # the byte at `cur` may be dirty since the job began (0)
    lag.sample(9.0, 1 << 20, 1 << 20)
    assert (lag.lag(9.0), lag.behind) == (0.0, 0)
    lag.sample(9.5, 1 << 20, (1 << 20) + 512)  # a write after the catch-up at 9.0
    assert lag.lag(10.0) == 1.0
    assert lag.behind == 512


def test_a_copy_that_keeps_two_seconds_behind_a_steady_stream_lags_two_seconds() -> None:
    """The guest dirties 10 bytes a second; the copy has what was dirty two seconds before."""
    lag = MirrorLag(0.0)
    for step in range(1, 41):
        now = step * POLL
        lag.sample(now, max(0, int(10 * (now - 2.0))), int(10 * now))
        if now > 2.0:
            assert lag.lag(now) == pytest.approx(2.0)
    assert lag.behind == 20


def test_behind_is_what_is_known_dirty_and_not_copied() -> None:
    lag = MirrorLag(0.0)
    lag.sample(1.0, 300, 1000)
    assert lag.behind == 700 and (lag.cur, lag.end) == (300, 1000)
    lag.sample(2.0, 1200, 1100)  # counters read a moment apart: more copied than known is all copied
    assert lag.behind == 0 and lag.end == 1200 and lag.lag(2.0) == 0.0


def test_a_stalled_end_does_not_age_the_next_write() -> None:
    """A 100-byte burst copied slowly while the guest writes nothing more; one byte written at 9.7, sampled at
    10: once the burst is copied (10.5), the oldest uncopied byte was dirtied after the sample of 9.5 (whose end
    it was not in), so the lag is at most 1 s; it is not counted from 0.5, when the burst became known."""
    lag = MirrorLag(0.0)
    lag.sample(0.5, 0, 100)
    now = 0.5
    while now < 9.5:
        now += POLL
        lag.sample(now, int(now * 10), 100)
    lag.sample(10.0, 97, 101)
    lag.sample(10.5, 100, 101)
    assert lag.lag(10.5) <= 10.5 - 9.5


# -- random sample sequences ---------------------------------------------------------------------------------

steps = st.lists(st.tuples(st.floats(0.0, 5.0), st.integers(0, 1000), st.integers(0, 1000)), max_size=40)
"""Each sample: seconds since the previous one, bytes copied since, bytes made dirty since."""


def feed(start: float, script: list[tuple[float, int, int]], extra: float) -> tuple[MirrorLag, list[tuple[float, int]],
                                                                                    int, float]:
    """A `MirrorLag` fed the samples of `script` from `start`; the samples (time, effective end), the
    construction first; the last `cur`; and the time to read it at, `extra` after the last sample."""
    lag = MirrorLag(start)
    seen, now, cur, end = [(start, 0)], start, 0, 0
    for wait, copied, dirtied in script:
        now, cur, end = now + wait, cur + copied, end + dirtied
        lag.sample(now, cur, end)
        seen.append((now, max(cur, end)))
    return lag, seen, cur, now + extra


@settings(max_examples=500)
@given(st.floats(-1e6, 1e6), steps, st.floats(0.0, 100.0))
def test_the_lag_is_never_negative_and_nothing_when_caught_up(start: float, script: list[tuple[float, int, int]],
                                                              extra: float) -> None:
    lag, seen, cur, now = feed(start, script, extra)
    assert lag.lag(now) >= 0.0
    assert lag.behind == seen[-1][1] - cur >= 0
    if cur >= seen[-1][1]:
        assert lag.lag(now) == 0.0


@settings(max_examples=500)
@given(st.floats(-1e6, 1e6), steps, st.floats(0.0, 100.0))
def test_the_lag_never_exceeds_the_jobs_age(start: float, script: list[tuple[float, int, int]], extra: float) -> None:
    lag, _, _, now = feed(start, script, extra)
    assert lag.lag(now) <= now - start


@settings(max_examples=500)
@given(st.floats(-1e6, 1e6), steps, st.floats(0.0, 100.0))
def test_the_lag_is_at_least_the_age_of_the_oldest_uncopied_byte(start: float, script: list[tuple[float, int, int]],
                                                                 extra: float) -> None:
    """An upper bound: the oldest byte not copied was dirty by the sample that first counted it (`t_known`)."""
    lag, seen, cur, now = feed(start, script, extra)
    if cur < seen[-1][1]:
        t_known = next(t for t, end in seen if end > cur)
        assert lag.lag(now) >= now - t_known


@settings(max_examples=500)
@given(st.floats(-1e6, 1e6), steps, st.floats(0.0, 100.0))
def test_the_lag_is_too_large_by_at_most_one_sampling_interval(start: float, script: list[tuple[float, int, int]],
                                                               extra: float) -> None:
    """The docstring's precision: the lag is the time since the last sample whose end was at most `cur`
    (`t_clean`), the sample just before `t_known`."""
    lag, seen, cur, now = feed(start, script, extra)
    if cur < seen[-1][1]:
        t_clean = [t for t, end in seen if end <= cur][-1]
        assert lag.lag(now) <= now - t_clean


def test_the_copy_rate_is_measured_over_the_last_seconds() -> None:
    lag = MirrorLag(0.0)
    assert lag.copy_rate() == 0.0
    for step in range(1, 21):  # 1 MB/s for 5 s, then 3 MB/s
        now = step * 0.5
        lag.sample(now, int(min(now, 5.0) * 1e6 + max(0.0, now - 5.0) * 3e6), 10**9)
    assert lag.copy_rate() == pytest.approx(3e6, rel=0.01)  # only the last RATE_WINDOW seconds count


@given(st.floats(0, 100), st.floats(1, 60), st.floats(0, 1e9), st.integers(0, 1 << 30))
def test_hold_back_caps_below_the_copy_rate_and_lifts_only_half_way_back(lag: float, max_lag: float, rate: float,
                                                                        held: int) -> None:
    cap = hold_back(lag, max_lag, rate, held)
    if not held:
        assert cap is None if lag <= max_lag else MIN_HOLD <= cap <= max(MIN_HOLD, rate)
    else:
        assert cap == (0 if lag <= max_lag / 2 else None)
