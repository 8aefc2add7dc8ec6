"""The restart budget of crashed guests (sans-IO): backoff 1, 2, 4 s; at most RESTART_LIMIT restarts in any
RESTART_WINDOW seconds per VM, then give up; a crash reported twice is one crash; a skipped restart is not
counted; and, over random interleavings (hypothesis), the budget's invariant and the liveness of every crash."""

from __future__ import annotations

from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.host.restart_budget import (
    FIRST_BACKOFF,
    RESTART_LIMIT,
    RESTART_WINDOW,
    GiveUp,
    Phase,
    Restart,
    RestartBudget,
)


def test_backoff_doubles_then_the_budget_is_spent() -> None:
    budget, now = RestartBudget(), 100.0
    for backoff in (1.0, 2.0, 4.0):
        budget.crashed("a", now)
        assert budget.next_due() == now + backoff
        assert budget.due(now + backoff - 0.01) == []
        now += backoff
        assert budget.due(now) == [Restart("a")]
        budget.restarted("a", now)
        now += 10  # it ran a while, then crashed again
    budget.crashed("a", now)
    assert budget.due(now) == [GiveUp("a")]  # the fourth crash within the window: left down
    assert budget.phase("a") is None and budget.next_due() is None
    assert (RESTART_LIMIT, RESTART_WINDOW, FIRST_BACKOFF) == (3, 600.0, 1.0)


def test_a_guest_that_ran_a_whole_window_since_its_restarts_is_restarted_again() -> None:
    budget = RestartBudget(limit=1, window=60.0)
    budget.crashed("a", 0.0)
    assert budget.due(1.0) == [Restart("a")]
    budget.restarted("a", 1.0)
    budget.crashed("a", 30.0)
    assert budget.due(30.0) == [GiveUp("a")]
    budget.crashed("a", 61.0)  # the restart at 1.0 left the window: the budget is back
    assert budget.due(62.0) == [Restart("a")]


def test_a_crash_reported_twice_is_one_crash_and_one_during_its_restart_is_taken_after() -> None:
    budget = RestartBudget()
    budget.crashed("a", 0.0)
    budget.crashed("a", 0.5)  # the same death seen twice (an event, and the sweep of a reopened watch)
    assert budget.due(1.0) == [Restart("a")]
    budget.crashed("a", 1.1)  # the new QEMU died before its restart was reported
    assert budget.phase("a") is Phase.RESTARTING and budget.due(100.0) == []
    budget.restarted("a", 1.2)
    assert budget.restarts("a", 1.2) == 1 and budget.phase("a") is Phase.WAITING
    assert budget.next_due() == 3.2  # the second restart: 2 s
    assert budget.due(3.2) == [Restart("a")]
    budget.skipped("a", 3.2)  # that was the old death after all: the VM runs, nothing counted
    assert budget.restarts("a", 3.2) == 1 and budget.phase("a") is None


def test_a_failed_restart_is_counted_and_backs_off_further() -> None:
    budget = RestartBudget()
    budget.crashed("a", 0.0)
    assert budget.due(1.0) == [Restart("a")]
    budget.failed("a", 1.0)
    assert budget.next_due() == 3.0  # 2 s: one restart counted
    assert budget.due(3.0) == [Restart("a")]
    budget.failed("a", 3.0)
    assert budget.due(7.0) == [Restart("a")]
    budget.failed("a", 7.0)
    assert budget.due(7.0) == [GiveUp("a")]


def test_a_skipped_restart_is_not_counted_and_leaves_nothing_behind() -> None:
    budget = RestartBudget()
    budget.crashed("a", 0.0)
    assert budget.due(1.0) == [Restart("a")]
    budget.skipped("a", 1.0)  # stopped on purpose meanwhile
    assert budget.restarts("a", 1.0) == 0 and budget.phase("a") is None and budget._vms == {}


def test_vms_have_budgets_of_their_own_and_decisions_come_earliest_first() -> None:
    budget = RestartBudget(limit=1)
    budget.crashed("a", 0.0)
    assert budget.due(1.0) == [Restart("a")]
    budget.restarted("a", 1.0)
    budget.crashed("b", 1.5)
    budget.crashed("a", 2.0)
    assert budget.due(2.5) == [GiveUp("a"), Restart("b")]


def test_only_a_restart_under_way_can_be_reported() -> None:
    budget = RestartBudget()
    with pytest.raises(ValueError, match="no restart of a"):
        budget.restarted("a", 0.0)
    budget.crashed("a", 0.0)
    with pytest.raises(ValueError):
        budget.skipped("a", 0.5)  # still waiting: not handed out yet
    with pytest.raises(ValueError):
        RestartBudget(window=0)


# -- random interleavings ------------------------------------------------------------------------------------

NAMES = ("a", "b", "c")
steps = st.lists(st.one_of(st.tuples(st.just("crash"), st.sampled_from(NAMES)),
                           st.tuples(st.just("advance"), st.floats(0.0, 400.0)),
                           st.tuples(st.just("finish"), st.sampled_from(("restarted", "failed", "skipped")))),
                 max_size=80)


@settings(max_examples=1000, deadline=None)
@given(steps, st.integers(0, 4), st.sampled_from((5.0, 60.0, 600.0)))
def test_no_window_ever_holds_more_restarts_than_the_limit_and_every_crash_is_decided(
        script: list[tuple[str, object]], limit: int, window: float) -> None:
    """The shell's random life: crashes of random VMs (some seen twice, some during their restart), time
    passing, restarts carried out later with random outcomes. Safety: for every VM, restarts made (restarted
    or failed) in any `window` seconds (a half-open span) never exceed `limit`; a give-up comes only when
    `limit` restarts are in the window that ends at the crash. Liveness: a crash (one seen during a restart
    that then succeeded included) is decided within the longest backoff."""
    budget = RestartBudget(limit=limit, window=window)
    now = 0.0
    made: dict[str, list[float]] = defaultdict(list)
    waiting: dict[str, float] = {}  # VM -> when a crash it must answer was seen
    again: set[str] = set()  # VMs that crashed while their restart was under way
    in_flight: list[str] = []  # restarts handed out, their outcome not reported yet
    for kind, arg in script:
        if kind == "crash":
            name = str(arg)
            if budget.phase(name) is None:
                waiting[name] = now
            elif budget.phase(name) is Phase.RESTARTING:
                again.add(name)
            budget.crashed(name, now)
        elif kind == "advance":
            now += float(arg)  # type: ignore[arg-type]
        elif in_flight:
            name, outcome = in_flight.pop(0), str(arg)
            if outcome != "skipped":
                made[name].append(now)
            if outcome == "failed" or (outcome == "restarted" and name in again):
                waiting[name] = now
            again.discard(name)
            getattr(budget, outcome)(name, now)
        for decision in budget.due(now):
            since = waiting.pop(decision.name)  # every decision answers a crash
            if isinstance(decision, GiveUp):  # the window that ends at the crash was full
                assert len([t for t in made[decision.name] if t > since - window]) >= limit
            else:
                in_flight.append(decision.name)
        for since in waiting.values():
            assert now - since <= FIRST_BACKOFF * 2 ** limit  # it would have been handed out by now
        for times in made.values():
            assert all(len([u for u in times if t - window < u <= t]) <= limit for t in times)
