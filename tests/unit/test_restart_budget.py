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


def test_a_crash_reported_twice_or_during_its_restart_is_one_crash() -> None:
    budget = RestartBudget()
    budget.crashed("a", 0.0)
    budget.crashed("a", 0.5)  # libvirt's second event of the same death
    assert budget.due(1.0) == [Restart("a")]
    budget.crashed("a", 1.1)  # the restart under way stopped it again (a failed start's own event)
    assert budget.phase("a") is Phase.RESTARTING and budget.due(100.0) == []
    budget.restarted("a", 1.2)
    assert budget.restarts("a", 1.2) == 1


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
steps = st.lists(st.tuples(st.sampled_from(("crash", "advance", "due")), st.sampled_from(NAMES),
                           st.floats(0.0, 400.0), st.sampled_from(("restarted", "failed", "skipped"))),
                 max_size=80)


@settings(max_examples=400, deadline=None)
@given(steps, st.integers(0, 4), st.sampled_from((5.0, 60.0, 600.0)))
def test_no_window_ever_holds_more_restarts_than_the_limit_and_every_crash_is_decided(
        script: list[tuple[str, str, float, str]], limit: int, window: float) -> None:
    """The shell's random life: crashes of random VMs (some twice), time passing, decisions carried out with
    random outcomes. Safety: for every VM, restarts made (restarted or failed) in any `window` seconds (a
    half-open span) never exceed `limit`; a give-up comes only when `limit` restarts are in the window.
    Liveness: a crash of a VM with nothing pending is decided within its longest backoff."""
    budget = RestartBudget(limit=limit, window=window)
    now = 0.0
    made: dict[str, list[float]] = defaultdict(list)
    waiting: dict[str, float] = {}  # VM -> when its crash was seen with nothing pending
    for kind, name, amount, outcome in script:
        if kind == "crash":
            if budget.phase(name) is None:
                waiting[name] = now
            budget.crashed(name, now)
        elif kind == "advance":
            now += amount
        for decision in budget.due(now):
            since = waiting.pop(decision.name)  # every decision answers a crash
            if isinstance(decision, GiveUp):  # the window that ends at the crash was full
                assert len([t for t in made[decision.name] if t > since - window]) >= limit
                continue
            if outcome == "skipped":
                budget.skipped(decision.name, now)
                continue
            made[decision.name].append(now)
            getattr(budget, outcome)(decision.name, now)
            if outcome == "failed":
                waiting[decision.name] = now
        for since in waiting.values():
            assert now - since <= FIRST_BACKOFF * 2 ** limit  # it would have been handed out by now
        for times in made.values():
            assert all(len([u for u in times if t - window < u <= t]) <= limit for t in times)
