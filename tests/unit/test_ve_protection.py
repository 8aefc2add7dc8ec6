"""Each VM's protection as `ve show` reports it (discovery.ve.protection): the status each policy gives from its
copies' answers and its snapshots, and what a degraded VM is told it lacks."""

from __future__ import annotations

from dataclasses import replace

import pytest

from discovery.ve.protection import HELD, MISSING, CopyAge, Mirror, VMProtection, assess, copy_state
from discovery.ve.records import Shortfall, Slot, SnapshotEntry, SnapshotVM, Standby, VERecord
from discovery.ve.shipped import ShippedSnapshot
from discovery.ve.spec import NO_HA, HaPolicy, VESpec, VMSpec
from overlay.wire import codec

NOW = 10_000.0
CREATED = 1_000.0


def record(ha: HaPolicy, copies: tuple[Standby, ...] = (), snapshots: tuple[float, ...] = ()) -> VERecord:
    slot = Slot("node1", "a1", "rennes", 0.0, "nearest")
    spec = VESpec("shop", (VMSpec("db", 1, 64),), ha=ha)
    taken = tuple(SnapshotEntry(f"t{i}", t, "running", {"db": SnapshotVM("node1", "running")})
                  for i, t in enumerate(snapshots))
    return VERecord("shop", spec, "alice", "running", {"db": slot}, "node1", CREATED, "u1",
                    standbys={"db": copies} if copies else {}, snapshots=taken)


def copy(node: str, taken: float = NOW - 12) -> Standby:
    return Standby(node, f"a-{node}", "lyon", taken)


STANDBY_2 = HaPolicy("standby", 2, priority=5)


@pytest.mark.parametrize(("answers", "status", "why"), [
    ([HELD, HELD], "protected", None),
    ([HELD, MISSING], "degraded", "1 of 2 standby copies held (node3: missing)"),
    ([HELD, "unknown (timed out)"], "degraded", "1 of 2 standby copies held (node3: unknown (timed out))"),
])
def test_standby_counts_the_copies_their_nodes_hold(answers: list[str], status: str, why: str | None) -> None:
    ve = record(STANDBY_2, (copy("node2"), copy("node3")))
    found = assess(ve, {"db": answers}, NOW)["db"]
    assert (found.status, found.why) == (status, why)
    assert found.copies == (CopyAge("node2", "lyon", NOW - 12, 12.0, answers[0]),
                            CopyAge("node3", "lyon", NOW - 12, 12.0, answers[1]))


def test_standby_with_fewer_copies_says_why_they_could_not_be_made() -> None:
    ve = replace(record(STANDBY_2, (copy("node2"),)), shortfall=Shortfall("cannot keep 2 standby copies: no room", 1.0))
    found = assess(ve, {"db": [HELD]}, NOW)["db"]
    assert found.status == "degraded"
    assert found.why == "1 of 2 standby copies held; cannot keep 2 standby copies: no room"
    assert assess(replace(ve, standbys={}), {}, NOW)["db"].why == (
        "0 of 2 standby copies held; cannot keep 2 standby copies: no room")
    assert assess(replace(ve, spec=replace(ve.spec, ha=HaPolicy("standby", 1))), {"db": [HELD]}, NOW)["db"].status \
        == "protected"  # enough copies: a shortfall left from before says nothing any more


def test_a_copy_on_the_vms_own_host_protects_nothing() -> None:
    found = assess(record(HaPolicy("standby", 1), (copy("node1"),)), {"db": [HELD]}, NOW)["db"]
    assert (found.status, found.why) == ("degraded", "0 of 1 standby copies held (node1: on the VM's own host)")


@pytest.mark.parametrize(("shipped", "status", "why"), [
    (None, "degraded", "no shipped snapshot in the 2h30m since the VE was created; the policy takes one every 30s"),
    (NOW - 60, "protected", None),  # twice the interval: late, not yet degraded
    (NOW - 61, "degraded", "last shipped snapshot 1m1s old; the policy takes one every 30s"),
])
def test_restart_is_degraded_once_its_last_shipped_snapshot_is_late(shipped: float | None, status: str,
                                                                    why: str | None) -> None:
    last = {} if shipped is None else {"db": ShippedSnapshot("snap/shop/db:t", "d" * 64, shipped)}
    found = assess(record(HaPolicy("restart", 0, 30, 3)), {}, NOW, last)["db"]
    assert (found.status, found.why) == (status, why)
    assert found.last_shipped == last.get("db")


def test_a_ve_that_does_not_run_is_never_late() -> None:
    stopped = replace(record(HaPolicy("restart", 0, 30, 3)), state="stopped")
    assert assess(stopped, {}, NOW)["db"].status == "protected"


def test_a_snapshot_its_host_keeps_is_no_restart_point() -> None:
    """It dies with the host: only a shipped snapshot keeps a `restart` VM protected."""
    found = assess(record(HaPolicy("restart", 0, 30, 3), snapshots=(NOW - 3000, NOW - 5)), {}, NOW)["db"]
    assert (found.status, found.last_snapshot, found.last_shipped) == ("degraded", NOW - 5, None)


def test_restart_without_periodic_snapshots_restarts_from_the_image() -> None:
    found = assess(record(HaPolicy("restart")), {}, NOW)["db"]
    assert (found.status, found.why, found.last_snapshot) == ("protected", None, None)


def test_a_new_ve_has_its_first_snapshot_interval_to_take_one() -> None:
    assert assess(record(HaPolicy("restart", 0, 30, 3)), {}, CREATED + 45)["db"].status == "protected"


def test_no_policy_is_unprotected_and_still_lists_hand_made_copies() -> None:
    found = assess(record(NO_HA, (copy("node2"),)), {"db": [HELD]}, NOW)["db"]
    assert found == VMProtection("unprotected", NO_HA, (CopyAge("node2", "lyon", NOW - 12, 12.0, HELD),))
    assert codec.encode(found) == {"status": "unprotected", "policy": {"mode": "none"},
                                   "copies": [{"node": "node2", "site": "lyon", "taken": NOW - 12, "lag": 12.0,
                                               "standby": "held"}]}


def test_protection_encodes_sparsely_for_ve_show_json() -> None:
    found = assess(record(STANDBY_2, snapshots=(NOW - 5,)), {}, NOW)["db"]
    assert codec.encode(found) == {"status": "degraded", "policy": {"mode": "standby", "copies": 2, "priority": 5},
                                   "last_snapshot": NOW - 5, "why": "0 of 2 standby copies held"}


def test_copy_state_reads_the_nodes_answer() -> None:
    assert copy_state([{"name": "shop:db"}, {"name": "x:y"}], "shop:db") == HELD
    assert copy_state([{"name": "x:y"}], "shop:db") == MISSING
    assert copy_state(ConnectionError("refused"), "shop:db") == "unknown (refused)"


# -- the mirror of a standby VM's disk ------------------------------------------------------------------------

MIRRORED = HaPolicy("standby", 2, max_lag=10)


def test_a_ready_mirror_gives_its_copy_the_mirrors_lag() -> None:
    """The copy the disk is mirrored to is as fresh as the mirror, not as old as its export; the other copy is
    as old as before."""
    ve = record(MIRRORED, (copy("node2", NOW - 600), copy("node3")))
    found = assess(ve, {"db": [HELD, HELD]}, NOW, mirrors={"db": Mirror("node2", "ready", 1.5)})["db"]
    assert found.copies == (CopyAge("node2", "lyon", NOW - 600, 1.5, HELD, "ready"),
                            CopyAge("node3", "lyon", NOW - 12, 12.0, HELD))
    assert (found.status, found.why) == ("protected", None)
    assert codec.encode(found.copies[0])["mirror"] == "ready" and "mirror" not in codec.encode(found.copies[1])


@pytest.mark.parametrize(("lag", "status", "why"), [
    (10.0, "protected", None),  # at max_lag: still within the policy
    (12.5, "degraded", "its mirror to node2 is 12.5 s behind (the policy allows 10s)"),
    (3600.0, "degraded", "its mirror to node2 is 3600.0 s behind (the policy allows 10s)"),
])
def test_a_ready_mirror_behind_more_than_max_lag_degrades_the_vm(lag: float, status: str, why: str | None) -> None:
    ve = record(MIRRORED, (copy("node2"), copy("node3")))
    found = assess(ve, {"db": [HELD, HELD]}, NOW, mirrors={"db": Mirror("node2", "ready", lag)})["db"]
    assert (found.status, found.why) == (status, why)
    assert found.copies[0].lag == lag


def test_max_lag_defaults_to_five_seconds() -> None:
    ve = record(HaPolicy("standby", 1), (copy("node2"),))
    found = assess(ve, {"db": [HELD]}, NOW, mirrors={"db": Mirror("node2", "ready", 5.5)})["db"]
    assert (found.status, found.why) == ("degraded", "its mirror to node2 is 5.5 s behind (the policy allows 5s)")


@pytest.mark.parametrize("state", ["syncing", "waiting: the job ended (an operation on the VM, or the VM stopped)"])
def test_a_mirror_not_ready_shows_its_state_and_leaves_the_copys_age(state: str) -> None:
    """Its lag says nothing yet (the first pass, or no job): the copy is as old as its export, and the VM is as
    protected as its held copies make it."""
    ve = record(MIRRORED, (copy("node2"), copy("node3")))
    found = assess(ve, {"db": [HELD, HELD]}, NOW, mirrors={"db": Mirror("node2", state, 900.0)})["db"]
    assert found.copies[0] == CopyAge("node2", "lyon", NOW - 12, 12.0, HELD, state)
    assert (found.status, found.why) == ("protected", None)


def test_a_mirror_to_a_node_without_a_copy_marks_no_copy() -> None:
    """The copy moved since the host's answer: no copy is shown mirrored."""
    ve = record(MIRRORED, (copy("node2"), copy("node3")))
    found = assess(ve, {"db": [HELD, HELD]}, NOW, mirrors={"db": Mirror("node7", "ready", 1.0)})["db"]
    assert [(c.lag, c.mirror) for c in found.copies] == [(12.0, None), (12.0, None)]


def test_too_few_copies_is_what_a_degraded_vm_is_told_first() -> None:
    ve = record(MIRRORED, (copy("node2"), copy("node3")))
    found = assess(ve, {"db": [HELD, MISSING]}, NOW, mirrors={"db": Mirror("node2", "ready", 60.0)})["db"]
    assert (found.status, found.why) == ("degraded", "1 of 2 standby copies held (node3: missing)")
