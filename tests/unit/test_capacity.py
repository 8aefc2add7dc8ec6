"""The two-phase reservation ledger: reserve, confirm, release, expiry, and refusals that explain."""

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agents.host.capacity import Insufficient, Ledger, Resources, UnknownReservation

TOTAL = Resources(8, 16384, 100)


def test_reserve_then_confirm_moves_the_slot_to_allocated():
    ledger = Ledger(TOTAL)
    r = ledger.reserve("ve:a", Resources(2, 1024, 10), now=0, ttl=10)
    assert ledger.free(1) == Resources(6, 15360, 90)
    ledger.confirm(r.token, now=5)
    assert ledger.allocated == {"ve:a": Resources(2, 1024, 10)}
    assert ledger.free(100) == Resources(6, 15360, 90)  # allocations do not expire


def test_unconfirmed_reservation_lapses_and_cannot_be_confirmed_late():
    ledger = Ledger(TOTAL)
    r = ledger.reserve("ve:a", Resources(8, 1024, 0), now=0, ttl=10)
    assert ledger.free(9.9).vcpus == 0
    assert ledger.free(10).vcpus == 8
    with pytest.raises(UnknownReservation):
        ledger.confirm(r.token, now=10)


def test_refusal_names_what_is_missing():
    ledger = Ledger(TOTAL)
    with pytest.raises(Insufficient, match=r"needs 12 vCPUs \(has 8\)"):
        ledger.reserve("ve:a", Resources(12, 1024, 0), now=0, ttl=10)
    with pytest.raises(Insufficient, match="MiB memory"):
        ledger.reserve("ve:a", Resources(1, 20000, 0), now=0, ttl=10)


def test_same_vm_cannot_be_reserved_twice():
    ledger = Ledger(TOTAL)
    ledger.reserve("ve:a", Resources(1, 64, 0), now=0, ttl=10)
    with pytest.raises(Insufficient, match="already"):
        ledger.reserve("ve:a", Resources(1, 64, 0), now=0, ttl=10)


def test_release_frees_immediately_and_is_idempotent():
    ledger = Ledger(TOTAL)
    r = ledger.reserve("ve:a", Resources(8, 64, 0), now=0, ttl=10)
    ledger.release(r.token)
    ledger.release(r.token)
    assert ledger.free(0) == TOTAL


ops = st.lists(st.tuples(st.sampled_from(["reserve", "confirm", "release", "dealloc"]),
                         st.integers(0, 5), st.integers(1, 4), st.floats(0, 3)), max_size=40)


@given(ops)
def test_never_overcommits(sequence):
    ledger = Ledger(TOTAL)
    now, tokens = 0.0, []
    for op, vm, cpus, dt in sequence:
        now += dt
        key = f"ve:{vm}"
        if op == "reserve":
            with contextlib.suppress(Insufficient):
                tokens.append(ledger.reserve(key, Resources(cpus, 1024 * cpus, cpus), now, ttl=5).token)
        elif op == "confirm" and tokens:
            with contextlib.suppress(UnknownReservation):
                ledger.confirm(tokens.pop(0), now)
        elif op == "release" and tokens:
            ledger.release(tokens.pop())
        elif op == "dealloc":
            ledger.deallocate(key)
        free = ledger.free(now)
        assert free.vcpus >= 0 and free.memory_mb >= 0 and free.disk_gb >= 0
