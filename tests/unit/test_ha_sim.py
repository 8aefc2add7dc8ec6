"""The HA protocol on simulated hosts (`discovery.ha.sim`: production SWIM, directory, lease keeper and
watchers, under virtual time): never two copies of a VE running, and every VE running again once the faults
end, over crashes, partitions (one way too), flapping links and random schedules."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from discovery.ha.sim import KINDS, Fault, trial


def check(report: dict) -> None:
    assert report["double_runs"] == [], report["double_runs"]
    assert report["not_running_once"] == [], report["running"]


@pytest.mark.parametrize("kind", KINDS)
def test_each_fault_on_a_vm_s_host_leaves_its_ve_running_once(kind: str) -> None:
    target = "s1" if kind == "isolate_site" else "n1"  # n1 runs ve1 (and s1 holds n1)
    report = trial([Fault(kind, target, 12.0, 15.0)], settle=35.0)
    check(report)
    if kind in ("crash", "isolate", "isolate_site", "cut_out", "cut_in"):
        assert report["revocations"] >= 1 and report["recoveries"].get("ve1") == 1  # one recovery per failure
        assert report["running"]["ve1"] != ["n1"]


def test_a_crash_is_recovered_within_seconds_of_the_verdict() -> None:
    report = trial([Fault("crash", "n1", 12.0, 40.0)], settle=20.0)
    check(report)
    (outage,) = report["outages_s"]  # SWIM's verdict (~4 s), a term and margin from the first read, the move
    assert outage < 12.0


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(KINDS), st.integers(1, 6), st.floats(10, 40), st.floats(2, 25)),
                min_size=1, max_size=3))
def test_random_schedules_never_run_a_ve_twice_and_leave_each_running(faults: list) -> None:
    schedule = [Fault(kind, f"s{n % 2 + 1}" if kind == "isolate_site" else f"n{n}", round(at, 2), round(lasts, 2))
                for kind, n, at, lasts in faults]
    check(trial(schedule, settle=40.0))
