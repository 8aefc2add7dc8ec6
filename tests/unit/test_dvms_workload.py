"""Tests for dvms.workload: the VMPlaceS injector is reproducible, its draws have the laws it claims
(clipped N(70, 30), Poisson arrivals of rate λ), and its events do not depend on how time is sliced,
nor on the other VMs, nor on when a VM is added."""

from __future__ import annotations

import statistics
from statistics import NormalDist

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dvms.model import VM
from dvms.workload import Injector, LoadChange


def vms(n: int, vcpus: int = 1) -> list[VM]:
    return [VM(f"e:vm{i}", "e", "n0", vcpus, 1024, 0) for i in range(n)]


def clipped_moments(mean: float, std: float, high: float) -> tuple[float, float]:
    """Mean and std of clip(N(mean, std), 0, high), by quadrature (independent of the injector's method)."""
    law, steps = NormalDist(mean, std), 20_000
    lo, hi = mean - 10 * std, mean + 10 * std
    width = (hi - lo) / steps
    m1 = m2 = 0.0
    for k in range(steps):
        x = lo + (k + 0.5) * width
        y = min(max(x, 0.0), high)
        w = law.pdf(x) * width
        m1 += y * w
        m2 += y * y * w
    return m1, (m2 - m1 * m1) ** 0.5


def test_same_seed_same_events_other_seed_others() -> None:
    a = Injector(vms(5), 0.5, seed=7).next_events(100)
    b = Injector(vms(5), 0.5, seed=7).next_events(100)
    c = Injector(vms(5), 0.5, seed=8).next_events(100)
    assert a == b and len(a) > 100
    assert a != c
    assert a == sorted(a)  # (time, vm) order


@pytest.mark.parametrize("vcpus", [1, 2])
def test_loads_follow_the_clipped_normal(vcpus: int) -> None:
    events = Injector(vms(20, vcpus), 1.0, seed=1).next_events(1000)
    loads = [e.cpu for e in events]
    assert len(loads) > 15_000
    assert min(loads) >= 0 and max(loads) <= 100 * vcpus
    mean, std = clipped_moments(70, 30, 100 * vcpus)  # 1 vCPU: 67.6 and 25.7 (clipped at 100); 2: 70.1 and 29.7
    assert statistics.fmean(loads) == pytest.approx(mean, abs=1.0)
    assert statistics.pstdev(loads) == pytest.approx(std, abs=1.0)


def test_interarrival_times_are_exponential_of_rate_lambda() -> None:
    rate = 0.2
    events = Injector(vms(10), rate, seed=3, start=50.0).next_events(50.0 + 10_000)
    gaps = []
    for name in {e.vm for e in events}:
        times = [50.0] + [e.time for e in events if e.vm == name]
        gaps += [b - a for a, b in zip(times, times[1:], strict=False)]
    assert len(gaps) > 15_000
    assert statistics.fmean(gaps) == pytest.approx(1 / rate, rel=0.03)
    assert statistics.pstdev(gaps) == pytest.approx(1 / rate, rel=0.05)  # exponential: std = mean
    assert sum(g < 1 / rate for g in gaps) / len(gaps) == pytest.approx(1 - 1 / 2.718281828, abs=0.02)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0, 200, allow_nan=False), max_size=12), st.integers(0, 2**32))
def test_slicing_time_differently_gives_the_same_events(cuts: list[float], seed: int) -> None:
    whole = Injector(vms(4), 0.3, seed=seed).next_events(200)
    sliced = Injector(vms(4), 0.3, seed=seed)
    got = [e for until in [*sorted(cuts), 200] for e in sliced.next_events(until)]
    assert got == whole


def test_iteration_and_next_time_agree_with_next_events() -> None:
    inj = Injector(vms(3), 1.0, seed=5)
    first = inj.next_time()
    it = iter(Injector(vms(3), 1.0, seed=5))
    stream = [next(it) for _ in range(50)]
    assert stream[0].time == first
    assert stream == inj.next_events(stream[-1].time)


def test_a_vm_keeps_its_trajectory_whatever_else_is_followed_and_when_it_is_added() -> None:
    alone = Injector(vms(1), 0.5, seed=9).next_events(100)
    crowd = [e for e in Injector(vms(6), 0.5, seed=9).next_events(100) if e.vm == "e:vm0"]
    assert alone == crowd
    late = Injector([], 0.5, seed=9)
    late.next_events(40)
    current = late.add(vms(1)[0], 40)
    before = [e for e in alone if e.time <= 40]
    assert current == (before[-1].cpu if before else 0)
    assert late.next_events(100) == [e for e in alone if e.time > 40]


def test_remove_drops_a_vm_and_spares_the_others() -> None:
    inj = Injector(vms(3), 0.5, seed=2)
    inj.remove("e:vm1")
    events = inj.next_events(100)
    assert {e.vm for e in events} == {"e:vm0", "e:vm2"}
    assert events == [e for e in Injector(vms(3), 0.5, seed=2).next_events(100) if e.vm != "e:vm1"]


def test_rate_zero_means_no_change_and_bad_input_is_refused() -> None:
    inj = Injector(vms(3), 0.0)
    assert inj.next_time() is None and inj.next_events(1e9) == [] and list(inj) == []
    with pytest.raises(ValueError):
        Injector(vms(1), -1.0)
    with pytest.raises(ValueError):
        Injector(vms(1), 1.0, std=0)
    inj = Injector(vms(1), 1.0)
    with pytest.raises(ValueError):
        inj.add(vms(1)[0], 0.0)  # already followed
    inj.next_events(10)
    with pytest.raises(ValueError):
        inj.add(VM("e:late", "e", "n0", 1, 512, 0), 5.0)  # its changes before 10 were due already


def test_load_change_is_plain_data() -> None:
    assert LoadChange(1.0, "a", 3) < LoadChange(1.0, "b", 0) < LoadChange(2.0, "a", 0)
