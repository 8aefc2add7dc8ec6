"""The host's side of its lease (`discovery.ha.lease`): its whole cycle, fed by hand."""

from __future__ import annotations

from discovery.ha.lease import Fence, Freeze, Lease, LeaseKeeper, Read, Renew, Thaw, revoked

TERM = 4.0


def held(now: float = 0.0, ves: frozenset[str] = frozenset({"a"})) -> LeaseKeeper:
    """A keeper that read no record, then wrote its first lease at `now`."""
    keeper = LeaseKeeper("h1", TERM)
    keeper.cover(ves)
    assert keeper.poll(now) == [Read()]
    assert keeper.read(None, None, now) == []
    (renew,) = keeper.poll(now)
    assert isinstance(renew, Renew) and renew.expect is None and renew.lease.epoch == 1
    assert keeper.renewed(renew.lease, "v1", now) == []
    return keeper


def test_a_first_lease_lists_the_protected_ves_and_holds_for_a_term_from_its_send() -> None:
    keeper = held(10.0, frozenset({"b", "a"}))
    assert keeper.listed == ("a", "b") and keeper.held_until == 14.0
    assert keeper.covered("a", 13.9) and not keeper.covered("a", 14.0) and not keeper.covered("c", 11.0)
    assert keeper.wake_at() == 10.0 + TERM / 3  # the next renewal, before the term runs out


def test_a_new_protected_ve_is_listed_at_once_and_covered_only_once_written() -> None:
    keeper = held()
    keeper.cover(frozenset({"x"}))
    (renew,) = keeper.poll(0.1)  # not due by time: due because x is not listed
    assert isinstance(renew, Renew) and renew.lease.ves == ("x",) and renew.expect == "v1"
    assert not keeper.covered("x", 0.2)
    keeper.renewed(renew.lease, "v2", 0.1)
    assert keeper.covered("x", 0.2)


def test_no_renewal_for_a_term_freezes_then_a_renewal_thaws() -> None:
    keeper = held(0.0, frozenset({"x"}))
    (renew,) = keeper.poll(TERM / 3)
    keeper.failed(TERM / 3 + 3.0)  # the directory did not answer
    assert keeper.poll(TERM) == [Freeze()]
    assert not keeper.covered("x", TERM)
    assert keeper.poll(TERM + 1) == [Read()]  # frozen: read before writing again
    keeper.read(Lease("h1", 1, TERM, ("x",)), "v1", TERM + 1)
    (renew,) = keeper.poll(TERM + 1)
    assert keeper.renewed(renew.lease, "v2", TERM + 1) == [Thaw()]
    assert keeper.covered("x", TERM + 2)


def test_a_renewal_sent_before_the_freeze_and_written_after_it_thaws_for_what_is_left() -> None:
    keeper = held(0.0, frozenset({"x"}))
    (renew,) = keeper.poll(TERM / 3)
    assert keeper.poll(TERM) == [Freeze()]  # the write is still in flight
    assert keeper.renewed(renew.lease, "v2", TERM / 3) == [Thaw()]
    assert keeper.held_until == TERM / 3 + TERM


def test_a_revoked_lease_fences_what_it_listed_and_takes_a_new_one_above_its_epoch() -> None:
    keeper = held(0.0, frozenset({"x"}))
    keeper.poll(TERM / 3)
    keeper.conflicted(TERM / 3)  # a watcher wrote the record meanwhile
    assert keeper.poll(TERM / 3) == [Read()]
    gone = revoked(Lease("h1", 1, TERM, ("x",)), by="w1")
    assert keeper.read(gone, "v3", TERM / 3) == [Fence(("x",), 2)]
    assert keeper.held_until is None and keeper.listed == () and not keeper.covered("x", TERM / 3)
    (renew,) = keeper.poll(TERM / 3)  # the revoked record replaced at once, even with nothing protected
    assert isinstance(renew, Renew) and renew.lease == Lease("h1", 3, TERM, ()) and renew.expect == "v3"


def test_a_restarted_host_reads_its_own_lease_and_keeps_its_epoch() -> None:
    keeper = LeaseKeeper("h1", TERM)
    keeper.cover(frozenset({"x"}))
    keeper.poll(0.0)
    keeper.read(Lease("h1", 5, TERM, ("x",)), "v9", 0.0)
    (renew,) = keeper.poll(0.0)
    assert isinstance(renew, Renew) and renew.lease.epoch == 5 and renew.expect == "v9"


def test_one_directory_call_at_a_time() -> None:
    keeper = held()
    (renew,) = keeper.poll(TERM / 3)
    assert keeper.poll(TERM / 3 + 0.5) == [] and keeper.wake_at() == TERM  # only the freeze can come now


def test_a_host_with_nothing_protected_reads_and_writes_its_lease_once_then_keeps_none() -> None:
    keeper = LeaseKeeper("h1", TERM)
    assert keeper.poll(0.0) == [Read()]  # at start, whatever is protected: a revocation missed while away?
    gone = revoked(Lease("h1", 1, TERM, ("x",)), by="w1")
    assert keeper.read(gone, "v3", 0.0) == [Fence(("x",), 2)]
    (renew,) = keeper.poll(0.0)  # the revoked record replaced, above its epoch
    assert isinstance(renew, Renew) and renew.lease == Lease("h1", 3, TERM, ())
    assert keeper.renewed(renew.lease, "v4", 0.0) == []
    assert keeper.held_until is None and keeper.wake_at() is None
    assert keeper.poll(10 * TERM) == []  # then no directory call at all

    keeper = held(0.0, frozenset({"x"}))
    keeper.cover(frozenset())  # x left this host: one renewal lists nothing...
    (renew,) = keeper.poll(TERM / 3)
    assert isinstance(renew, Renew) and renew.lease.ves == ()
    assert keeper.renewed(renew.lease, "v2", TERM / 3) == []
    assert keeper.held_until is None and keeper.wake_at() is None
    assert keeper.poll(10 * TERM) == []  # ...and then nothing: no renewal, no freeze


def test_a_call_abandoned_by_a_restarted_shell_is_made_again_from_a_read() -> None:
    keeper = held(0.0, frozenset({"x"}))
    (renew,) = keeper.poll(TERM / 3)
    assert keeper.poll(TERM / 3 + 0.1) == []  # one call at a time: this one will never be answered
    keeper.abandon()
    assert keeper.poll(TERM / 3 + 0.1) == [Read()]
