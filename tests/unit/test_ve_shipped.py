"""The rules of shipped snapshots (discovery.ve.shipped): their names, when one is due, which nodes keep it, what
`keep` prunes, what a rebuild boots, and the log as stored (an earlier incarnation's is no log of this one)."""

from __future__ import annotations

import pytest

from discovery.ve.shipped import (
    LogError,
    ShippedLog,
    ShippedSnapshot,
    due,
    image_name,
    read,
    restore_point,
    ship_targets,
    write,
)
from images.messages import check_image_name

T0 = 1_750_000_000.0  # 2025-06-15 15:06:40 UTC


def snap(seconds: float, vm: str = "db") -> ShippedSnapshot:
    return ShippedSnapshot(image_name("shop", vm, T0 + seconds), f"{int(seconds):064d}", T0 + seconds)


def test_a_snapshot_is_an_image_named_after_its_ve_vm_and_second() -> None:
    name = image_name("shop", "db", T0 + 0.9)
    assert name == "snap/shop/db:20250615-150640" == check_image_name(name)
    assert snap(0).tag == "20250615-150640"


@pytest.mark.parametrize(("last", "attempted", "now", "expected"), [
    (None, None, T0, True),  # never shipped: at once
    (T0, None, T0 + 29, False),
    (T0, None, T0 + 30, True),
    (T0, T0 + 25, T0 + 30, False),  # an attempt that failed waits its interval too
    (T0, T0 + 25, T0 + 55, True),
    (None, T0, T0 + 10, False),
])
def test_a_snapshot_is_due_every_interval_after_the_last_one_and_the_last_attempt(
        last: float | None, attempted: float | None, now: float, expected: bool) -> None:
    shipped = ShippedSnapshot("snap/shop/db:x", "d", last) if last is not None else None
    assert due(30, shipped, attempted, now) is expected


def test_targets_are_other_sites_first_and_the_previous_holders_among_them() -> None:
    live = {"a1": "a", "a2": "a", "a3": "a", "b1": "b", "b2": "b", "b3": "b", "c1": "c"}
    fresh = ship_targets("a1", live, (), "shop/db")
    assert len(fresh) == 2 and all(live[n] != "a" for n in fresh) and "a1" not in fresh
    assert ship_targets("a1", live, (), "shop/db") == fresh  # the same nodes each time: incremental
    again = ship_targets("a1", live, ["a2", "b3", "c1"], "shop/db", 3)
    assert again[:2] == ["b3", "c1"] and live[again[2]] == "b"  # another site before a holder in the host's
    assert ship_targets("a1", live, ["a2", "b3", "c1"], "shop/db", 6)[5] == "a3"  # the host's site last
    assert ship_targets("a1", {"a1": "a", "a2": "a"}, (), "shop/db") == ["a2"]  # one site: its other nodes
    assert ship_targets("a1", {"a1": "a"}, (), "shop/db") == []
    spread = {ship_targets("a1", live, (), f"shop/vm{i}", 1)[0] for i in range(20)}
    assert len(spread) > 1  # different VMs go to different nodes


def test_the_log_lists_by_time_and_prunes_the_oldest_beyond_keep() -> None:
    log = ShippedLog("u1")
    for t in (0, 30, 60):
        log = log.with_shipped("db", snap(t))
    log = log.with_shipped("db", snap(45))  # a slower host's earlier one stays older
    assert [s.time - T0 for s in log.of("db")] == [0, 30, 45, 60] and log.last("db") == snap(60)
    assert log.beyond("db", 2) == (snap(0), snap(30)) and log.beyond("db", 5) == ()
    assert log.with_shipped("db", snap(60)) == log  # the same entry twice is listed once
    pruned = log.without("db", [snap(0).image, snap(30).image])
    assert pruned.of("db") == (snap(45), snap(60)) and pruned.of("web") == ()
    assert log.without("db", [s.image for s in log.of("db")]).vms == {}


def test_a_restore_point_is_the_newest_or_the_one_tagged() -> None:
    log = ShippedLog("u1").with_shipped("db", snap(0)).with_shipped("db", snap(30))
    assert restore_point(log, "shop", "db") == snap(30)
    assert restore_point(log, "shop", "db", snap(0).tag) == snap(0)
    with pytest.raises(LookupError, match=r"shop/db has no shipped snapshot 'x' \(shipped: 20250615-150640, "):
        restore_point(log, "shop", "db", "x")
    with pytest.raises(LookupError, match=r"shop/web has no shipped snapshot \(none shipped\)"):
        restore_point(log, "shop", "web")


def test_the_log_round_trips_and_an_earlier_incarnations_log_reads_empty() -> None:
    log = ShippedLog("u1").with_shipped("db", snap(0))
    stored = write(log)
    assert stored == {"uid": "u1", "vms": {"db": [{"image": snap(0).image, "digest": snap(0).digest,
                                                   "time": T0}]}, "version": 1}
    assert read(stored, "u1") == log
    assert read(stored, "u2") == ShippedLog("u2") == read(None, "u2")
    assert write(ShippedLog("u1")) == {"uid": "u1", "version": 1}  # no VM shipped yet: sparse


@pytest.mark.parametrize(("value", "error"), [
    ({"uid": "u1", "version": 2}, "of format 2: this agent reads format 1"),
    ({"uid": "u1", "extra": 1}, "extra"),
    ("junk", "of format None"),
])
def test_a_log_this_agent_cannot_read_is_refused_in_one_line(value: object, error: str) -> None:
    with pytest.raises(LogError, match=error):
        read(value, "u1")
