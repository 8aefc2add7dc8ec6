"""Tests for dvms.monitor: overload/underload/normal transitions with hysteresis (a node flapping around a
threshold fires once), dwell times, per-dimension clearing, and the libvirt stats helpers."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dvms.model import VM, Node
from dvms.monitor import Load, Monitor, Thresholds, cpu_demand, demand, memory_demand_mb

NODE = Node("n1", "lyon", 400, 8000)


def feed(monitor: Monitor, samples: list[tuple[float, float]], memory_mb: float = 1000) -> list[tuple[float, Load]]:
    """(time, cpu) samples in; (time, new state) for each transition out."""
    out = []
    for t, cpu in samples:
        if (tr := monitor.observe(t, cpu, memory_mb)) is not None:
            assert tr.before is not tr.after and tr.node == "n1"
            out.append((t, tr.after))
    return out


def test_overload_fires_once_while_demand_flaps_around_capacity() -> None:
    m = Monitor(NODE)
    flapping = [(t, 410 if t % 2 else 390) for t in range(20)]  # ±2.5 % around capacity
    assert feed(m, flapping) == [(1, Load.OVERLOAD)]
    assert feed(m, [(20, 365), (21, 405), (22, 361)]) == []  # above 360 = 400 * (1 - 10 %): still overloaded
    assert feed(m, [(23, 359)]) == [(23, Load.NORMAL)]
    assert feed(m, [(t, 410 if t % 2 else 370) for t in range(24, 40)]) == [(25, Load.OVERLOAD)]


def test_underload_needs_its_dwell_time_and_clears_above_its_own_threshold() -> None:
    m = Monitor(NODE, Thresholds(underload_dwell=60))
    assert feed(m, [(t, 50) for t in range(0, 60, 5)]) == []  # 12.5 % for 55 s
    assert feed(m, [(60, 50)]) == [(60, Load.UNDERLOAD)]
    assert feed(m, [(61, 70), (62, 100), (63, 119)]) == []  # < 120 = 30 %: still underloaded
    assert feed(m, [(64, 120)]) == [(64, Load.NORMAL)]
    dips = [(65 + 10 * k, 50) for k in range(11)]  # below 20 % ...
    dips[3] = (95, 85)  # ... but one sample above breaks the run
    assert feed(m, dips) == [(165, Load.UNDERLOAD)]  # 60 s after the run restarted at 105


def test_a_spike_goes_from_underload_straight_to_overload() -> None:
    m = Monitor(NODE, Thresholds(underload_dwell=0))
    assert feed(m, [(0, 10), (1, 500), (2, 300)]) == [(0, Load.UNDERLOAD), (1, Load.OVERLOAD), (2, Load.NORMAL)]


def test_overload_dwell_ignores_short_spikes() -> None:
    m = Monitor(NODE, Thresholds(overload_dwell=5))
    assert feed(m, [(0, 450), (3, 450), (4, 300), (5, 450), (9, 450)]) == []
    assert feed(m, [(10, 450)]) == [(10, Load.OVERLOAD)]


def test_memory_overloads_too_and_full_memory_does_not_hold_a_cleared_cpu_overload() -> None:
    m = Monitor(NODE)
    assert m.observe(0, 100, 8100).after is Load.OVERLOAD
    assert m.observe(1, 100, 7500) is None  # 93.75 %: not cleared
    assert m.observe(2, 100, 7000).after is Load.NORMAL
    assert m.observe(3, 500, 7900).after is Load.OVERLOAD  # CPU went over; memory at 98.75 % never did
    assert m.observe(4, 300, 7900).after is Load.NORMAL
    assert m.load == pytest.approx(7900 / 8000)


def test_observe_vms_sums_the_vms_on_its_node() -> None:
    vms = [VM("a", "e", "n1", 4, 4000, 300), VM("b", "e", "n1", 2, 1000, 150), VM("c", "e", "n2", 1, 9000, 100)]
    assert demand(vms, "n1") == (450, 5000)
    tr = Monitor(NODE).observe_vms(0, vms)
    assert tr is not None and (tr.after, tr.cpu, tr.memory_mb) == (Load.OVERLOAD, 450, 5000)


def test_plan_node_is_tighter_in_the_dimensions_that_went_over_until_the_overload_clears() -> None:
    """A plan that fills the node to capacity would leave it in OVERLOAD: it must go below overload_clear."""
    m = Monitor(NODE)
    assert m.plan_node() == NODE  # normal: only the capacity
    m.observe(0, 450, 7900)  # CPU over; memory at 98.75 % never went over
    plan = m.plan_node()
    assert (plan.name, plan.site, plan.cpu, plan.memory_mb) == ("n1", "lyon", 359, 8000)  # < 360 = 90 % of 400
    assert m.observe(1, 400, 7900) is None and m.plan_node() == plan  # at capacity: still overloaded
    assert m.observe(2, plan.cpu, 7900).after is Load.NORMAL  # what the plan leaves clears it
    assert m.plan_node() == NODE
    m.observe(3, 100, 8100)  # memory over
    assert (m.plan_node().cpu, m.plan_node().memory_mb) == (400, 7199)
    m.observe(4, 500, 8100)  # CPU goes over too during the same overload: both must clear
    assert (m.plan_node().cpu, m.plan_node().memory_mb) == (359, 7199)
    assert m.observe(5, 359, 7199).after is Load.NORMAL


def test_bad_thresholds_and_time_going_back_are_refused() -> None:
    with pytest.raises(ValueError):
        Thresholds(overload_clear=1.1)
    with pytest.raises(ValueError):
        Thresholds(underload=0.5, underload_clear=0.4)
    with pytest.raises(ValueError):
        Thresholds(underload_dwell=-1)
    with pytest.raises(ValueError):
        Monitor(Node("z", "s", 0, 1))
    m = Monitor(NODE)
    m.observe(5, 0, 0)
    with pytest.raises(ValueError):
        m.observe(4, 0, 0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 600), min_size=1, max_size=60), st.sampled_from([0, 3, 30]))
def test_every_transition_is_earned(cpus: list[int], dwell: int) -> None:
    """Entering needs the threshold crossed (for the dwell); leaving needs the other threshold crossed."""
    th = Thresholds(overload_dwell=dwell, underload_dwell=dwell)
    m = Monitor(NODE, th)
    state = Load.NORMAL
    for t, cpu in enumerate(cpus):
        load = cpu / NODE.cpu
        tr = m.observe(t, cpu, 0)
        if tr is None:
            assert m.state is state
            continue
        assert tr.before is state
        if tr.after is Load.OVERLOAD:
            assert t >= dwell and all(c / NODE.cpu > th.overload for c in cpus[t - dwell:t + 1])
        elif tr.after is Load.UNDERLOAD:
            assert t >= dwell and all(c / NODE.cpu < th.underload for c in cpus[t - dwell:t + 1])
        else:
            assert load < th.overload_clear if state is Load.OVERLOAD else load >= th.underload_clear
        state = tr.after
    assert m.state is state


def test_cpu_demand_from_two_samples_of_cpu_time() -> None:
    assert cpu_demand(10**9, 25 * 10**8, 100.0, 101.0, 2) == 150  # 1.5 s of CPU in 1 s: 1.5 vCPU busy
    assert cpu_demand(0, 15 * 10**8, 0.0, 2.0, 2) == 75
    assert cpu_demand(0, 3 * 10**9, 0.0, 1.0, 2) == 200  # emulator threads on top: clipped to the vCPUs
    assert cpu_demand(0, 0, 0.0, 1.0, 1) == 0
    assert cpu_demand(5 * 10**9, 10**6, 0.0, 1.0, 1) is None  # counter restarted: the domain did
    with pytest.raises(ValueError):
        cpu_demand(0, 10, 1.0, 1.0, 1)


def test_memory_demand_from_balloon_stats() -> None:
    assert memory_demand_mb({"balloon.available": 1024 * 1024, "balloon.unused": 512 * 1024}, 1024) == 512
    assert memory_demand_mb({"balloon.rss": 300 * 1024 + 1}, 1024) == 301
    assert memory_demand_mb({"balloon.rss": 2000 * 1024}, 1024) == 1024  # QEMU's overhead is not the guest's
    assert memory_demand_mb({"balloon.current": 1024 * 1024}, 768) == 768
