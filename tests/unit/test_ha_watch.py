"""One watcher of one host (`discovery.ha.watch`), fed by hand; and who watches whom."""

from __future__ import annotations

from discovery.ha.lease import Lease, revoked
from discovery.ha.watch import (
    FOLLOW_GRACE,
    MARGIN,
    STAGGER,
    HostWatch,
    ReadLease,
    Recover,
    Revoke,
    watchers_of,
)

LEASE = Lease("h", 3, 4.0, ("ve1", "ve2"))
WAIT = 4.0 * 1.05 + MARGIN


def test_watchers_are_of_the_host_s_site_first_and_the_same_for_everyone() -> None:
    members = [("h", "s1"), ("a", "s1"), ("b", "s2"), ("c", "s1"), ("d", "s2")]
    chosen = watchers_of("h", "s1", members)
    assert set(chosen) == {"a", "c"}
    assert watchers_of("h", "s1", list(reversed(members))) == chosen
    assert watchers_of("h", "s1", [m for m in members if m[0] != "a"])[0] in ("c", "b", "d")
    assert watchers_of("h", "s1", [("h", "s1")]) == []


def observed(rank: int = 0) -> HostWatch:
    """A watcher that saw the host suspected at 0 and read version 7 of its lease."""
    watch = HostWatch("w", "h", rank)
    watch.suspect(0.0)
    assert watch.poll(0.0) == [ReadLease("h")]
    assert watch.read(LEASE, "rec7", 7, 0.0) == []
    return watch


def test_an_unchanged_lease_of_a_dead_host_is_revoked_after_a_term_and_margin_then_recovered() -> None:
    watch = observed()
    assert watch.wake_at() is None  # only suspected: no revocation on a suspicion
    watch.declared_dead(3.0)
    assert watch.wake_at() == WAIT and watch.poll(WAIT - 0.01) == []
    assert watch.poll(WAIT) == [ReadLease("h")]  # read once more before revoking
    (revoke,) = watch.read(LEASE, "rec7", 7, WAIT)
    assert revoke == Revoke(revoked(LEASE, "w"), "rec7")
    assert revoke.lease.holder is None and revoke.lease.epoch == 4
    assert watch.revoke_won(revoke.lease, WAIT) == [Recover("h", ("ve1", "ve2"), 4, "w")]
    watch.recovered(True, WAIT + 1)
    assert watch.state.value == "done"


def test_a_renewed_lease_restarts_the_wait() -> None:
    watch = observed()
    watch.declared_dead(3.0)
    watch.poll(WAIT)
    assert watch.read(LEASE, "rec8", 8, WAIT) == []  # the host still renews (cut off from SWIM only)
    assert watch.wake_at() == 2 * WAIT


def test_a_later_watcher_waits_its_stagger() -> None:
    watch = observed(rank=1)
    watch.declared_dead(3.0)
    assert watch.wake_at() == WAIT + STAGGER


def test_a_lost_revocation_reads_again_then_confirms_the_winner_s_and_recovers_a_term_later() -> None:
    """A revoked record read may have reached only a minority: the follower writes it again itself (to a
    majority), then waits for the holder, whose renewals now fail, to freeze."""
    watch = observed()
    watch.declared_dead(3.0)
    watch.poll(WAIT)
    watch.read(LEASE, "rec7", 7, WAIT)
    watch.conflicted(WAIT)
    assert watch.poll(WAIT) == [ReadLease("h")]
    gone = revoked(LEASE, "other")
    assert watch.read(gone, "rec9", 9, WAIT) == []
    assert watch.poll(WAIT + FOLLOW_GRACE - 0.1) == []
    assert watch.poll(WAIT + FOLLOW_GRACE) == [Revoke(gone, "rec9")]
    assert watch.revoke_won(gone, WAIT + FOLLOW_GRACE) == []
    assert watch.poll(WAIT + FOLLOW_GRACE + WAIT - 0.1) == []
    assert watch.poll(WAIT + FOLLOW_GRACE + WAIT) == [Recover("h", ("ve1", "ve2"), 4, "other")]


def test_the_host_back_alive_stops_the_watch_unless_its_lease_is_revoked() -> None:
    watch = observed()
    watch.alive(1.0)
    assert watch.state.value == "idle" and watch.poll(100.0) == []
    watch = observed()
    watch.declared_dead(3.0)
    watch.poll(WAIT)
    (revoke,) = watch.read(LEASE, "rec7", 7, WAIT)
    watch.revoke_won(revoke.lease, WAIT)
    watch.alive(WAIT + 0.5)  # it will fence; its VEs must run again
    watch.recovered(False, WAIT + 1)
    assert watch.poll(WAIT + 10) == [Recover("h", ("ve1", "ve2"), 4, "w")]


def test_no_lease_means_nothing_to_recover_yet_and_is_read_again_later() -> None:
    watch = HostWatch("w", "h")
    watch.declared_dead(0.0)
    watch.poll(0.0)
    assert watch.read(None, None, None, 0.0) == []
    assert watch.poll(1.0) == [] and watch.wake_at() is not None and watch.wake_at() > 1.0
