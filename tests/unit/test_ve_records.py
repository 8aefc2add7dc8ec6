"""The VE record (discovery.ve.records): records written before it existed (plain maps, no version) read as
version 1 and keep their shape; fields and versions this agent does not know are refused in one line."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from discovery.ve.directory import Directory, Unreadable
from discovery.ve.records import (
    VERSION,
    FailoverIntent,
    MoveIntent,
    NetState,
    Nic,
    RebuildIntent,
    RecordError,
    Shortfall,
    Slot,
    SnapshotMarker,
    Standby,
    Transfer,
    VERecord,
    incarnation,
    read,
    view,
    write,
)
from discovery.ve.spec import HaPolicy, VESpec, VMSpec
from overlay.dht import Record

SPEC = {"name": "shop", "site": None,
        "vms": [{"name": "db", "vcpus": 2, "memory_mb": 512, "disk_gb": 4, "image": "none"},
                {"name": "web", "vcpus": 1, "memory_mb": 256, "disk_gb": 1, "image": "none"}],
        "constraints": {"anti_affinity": [["db", "web"]]}}
OLD = {  # as agents before the records module wrote it: created, web relocated, replicated, snapshotted
    "name": "shop", "spec": SPEC, "owner": "alice", "state": "running",
    "placement": {
        "db": {"node": "node1", "addr": "127.0.0.1:7001", "site": "rennes", "rtt_ms": 0.0,
               "why": "nearest with room (this node)"},
        "web": {"node": "node3", "addr": "127.0.0.1:7003", "site": "lyon", "rtt_ms": 12.5,
                "why": "relocated to node3 by alice", "transfer": {"how": "carry", "seconds": 0.412}}},
    "coordinator": "node1", "created": 1717171717.25, "uid": "8d3c0f6f6e2b4f0c9d5b0c7e0f1a2b3c",
    "copies": 1,
    "replicas": {"db": [{"node": "node2", "addr": "127.0.0.1:7002", "site": "lyon", "taken": 1717171800.5}],
                 "web": [{"node": "node4", "addr": "127.0.0.1:7004", "site": "nancy", "taken": 1717171800.5}]},
    "snapshots": [{"tag": "before-upgrade", "time": 1717171900.0, "state": "running",
                   "vms": {"db": {"node": "node1", "state": "running"}, "web": {"node": "node3", "state": "running"}}}],
}
IN_FLIGHT = {  # the same VE as an interrupted move, failover and snapshot left it
    **OLD,
    "placement": {
        "db": {**OLD["placement"]["db"],
               "failing_over": {"node": "node2", "addr": "127.0.0.1:7002", "site": "lyon", "from": "node1",
                                "why": "node1 does not answer", "state": "running", "coordinator": "node5",
                                "since": 1717172000.0}},
        "web": {**OLD["placement"]["web"],
                "moving_to": {"node": "node5", "addr": "127.0.0.1:7005", "site": "nancy", "rtt_ms": None,
                              "why": "relocated to node5 by alice", "phase": "started", "state": "paused",
                              "coordinator": "node5", "since": 1717172001.5}}},
    "snapshotting": {"tag": "t2", "paused": ["db"], "coordinator": "node4", "since": 1717172002.0},
}


@pytest.mark.parametrize("old", [OLD, IN_FLIGHT], ids=["settled", "in flight"])
def test_a_record_written_before_versions_reads_as_version_1_and_keeps_its_shape(old: dict[str, Any]) -> None:
    ve = read(msgpack.unpackb(msgpack.packb(old)))
    assert ve.version == 1 < VERSION and ve.networks == {} and ve.nics == {}  # VMs without interfaces
    assert write(ve) == {**old, "version": 1}  # stored again: the same map, its version now said (older agents
    # of format 1 go on reading it)
    assert view(ve) == old  # what `ve show --json` prints: the shape it always had
    assert read(write(ve)) == ve


def test_what_an_old_record_holds_reads_typed() -> None:
    ve = read(IN_FLIGHT)
    assert ve.spec == VESpec.from_dict(SPEC) and ve.spec.constraints.anti_affinity == (("db", "web"),)
    db, web = ve.placement["db"], ve.placement["web"]
    assert db.failing_over == FailoverIntent("node2", "127.0.0.1:7002", "lyon", "node1", "node1 does not answer",
                                             "running", "node5", 1717172000.0)
    assert web.transfer == Transfer("carry", 0.412) and web.moving_to is not None and web.moving_to.rtt_ms is None
    assert isinstance(web.moving_to, MoveIntent) and web.named() == ["node3", "node5"]
    assert ve.standbys_of("db") == (Standby("node2", "127.0.0.1:7002", "lyon", 1717171800.5),)
    assert ve.snapshotting == SnapshotMarker("t2", ("db",), "node4", 1717172002.0)
    assert [type(i).__name__ for i in ve.intents()] == ["FailoverIntent", "MoveIntent", "SnapshotMarker"]


def test_a_rebuild_under_way_round_trips_and_a_record_without_one_keeps_its_shape() -> None:
    """The `rebuilding` intent is sparse, as the others: records without it (the old-format tests above) are
    stored as before; one with it carries it in the shape of the other intents, and reads back the same."""
    rebuilding = {"node": "node3", "addr": "127.0.0.1:7003", "site": "rennes", "rtt_ms": 0.8, "from": "node1",
                  "why": "node1 is dead", "image": "tiny", "state": "running", "coordinator": "node4",
                  "since": 1717172003.0}
    stored = {**OLD, "placement": {**OLD["placement"], "db": {**OLD["placement"]["db"], "rebuilding": rebuilding}}}
    ve = read(msgpack.unpackb(msgpack.packb(stored)))
    db = ve.placement["db"]
    assert db.rebuilding == RebuildIntent("node3", "127.0.0.1:7003", "rennes", 0.8, "node1", "node1 is dead", "tiny",
                                          "running", "node4", 1717172003.0)
    assert db.named() == ["node1", "node3"] and [type(i).__name__ for i in ve.intents()] == ["RebuildIntent"]
    assert view(ve) == stored and read(write(ve)) == ve
    assert "rebuilding" not in write(read(OLD))["placement"]["db"]


def test_an_ha_policy_and_its_shortfall_round_trip_and_are_left_off_when_unset() -> None:
    """A record without an HA policy is stored exactly as before policies existed (the old-format tests above);
    one with a policy and a shortfall carries both, in the spec's own words, and reads back the same."""
    ha = {"mode": "standby", "copies": 2, "priority": 5}
    stored = {**OLD, "spec": {**SPEC, "ha": ha}, "shortfall": {"why": "no room", "since": 1717172100.0}}
    ve = read(msgpack.unpackb(msgpack.packb(stored)))
    assert ve.spec.ha == HaPolicy("standby", 2, priority=5) and ve.shortfall == Shortfall("no room", 1717172100.0)
    assert view(ve) == stored and read(write(ve)) == ve
    assert read({**OLD, "spec": {**SPEC, "ha": {"mode": "none"}}}).spec.ha == HaPolicy()
    assert "ha" not in write(read({**OLD, "spec": {**SPEC, "ha": {"mode": "none"}}}))["spec"]
    restart = {"mode": "restart", "snapshot_every": 30, "keep": 3}
    assert view(read({**OLD, "spec": {**SPEC, "ha": restart}}))["spec"]["ha"] == restart


def test_empty_optional_parts_are_left_off() -> None:
    """Old records sometimes held an empty map or list (`ve replicate --copies 0`, the last snapshot deleted);
    they read the same, and are stored without them, as records that never had any."""
    ve = read({**OLD, "copies": 0, "replicas": {}, "snapshots": []})
    assert ve.standbys == {} and ve.snapshots == () and ve.copies == 0
    assert {"replicas", "snapshots"}.isdisjoint(write(ve)) and write(ve)["copies"] == 0


@pytest.mark.parametrize("change, message", [
    ({"leases": {"db": "node1"}}, "VE record 'shop': leases: unknown field"),
    ({"placement": {"db": {**OLD["placement"]["db"], "fenced": True}}},
     "VE record 'shop': placement.db.fenced: unknown field"),
    ({"version": 3}, "VE record 'shop' is of format 3, written by a newer agent (this one reads up to 2): upgrade "
                     "this agent"),
    ({"version": "1"}, "VE record 'shop': version must be a format number from 1 to 2, got '1'"),
    ({"version": True}, "VE record 'shop': version must be a format number from 1 to 2, got True"),
    ({"version": 0}, "VE record 'shop': version must be a format number from 1 to 2, got 0"),
    ({"state": "lost"}, "VE record 'shop': state: expected one of creating, running, stopped, suspended"),
    ({"owner": None}, "VE record 'shop': owner: expected str, got nothing"),
    ({"placement": {"db": {"node": "node1"}}}, "VE record 'shop': placement.db.addr: missing field"),
    ({"spec": {**SPEC, "ha": {"mode": "standby", "watchers": 2}}}, "VE record 'shop': spec.ha.watchers: unknown field"),
    ({"spec": {**SPEC, "ha": {"mode": "hot"}}}, "VE record 'shop': spec.ha.mode: expected one of none, restart"),
    ({"shortfall": "no room"}, "VE record 'shop': shortfall: expected a map, got str"),
])
def test_what_this_agent_does_not_know_is_refused_in_one_line(change: dict[str, Any], message: str) -> None:
    """Unknown fields are refused, not dropped: every change rewrites the whole record, so an agent that dropped
    what it did not know (a newer kind of intent) would erase it, and with it a transaction's recovery."""
    with pytest.raises(RecordError) as refused:
        read({**OLD, **change})
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)


@pytest.mark.parametrize("value, message", [
    (["shop"], "VE record: expected a map, got list"),
    ({k: v for k, v in OLD.items() if k != "owner"}, "VE record 'shop': owner: missing field"),
])
def test_what_is_no_record_is_refused(value: Any, message: str) -> None:
    with pytest.raises(RecordError, match=f"^{message}$"):
        read(value)


def test_the_incarnation_reads_from_any_version() -> None:
    """The index must tell a VE's incarnation even from a record of a newer format, or it would unlist it."""
    assert incarnation({**OLD, "version": 7, "leases": {}}) == OLD["uid"]
    assert incarnation({"name": "x"}) == "" and incarnation(None) == ""


async def test_the_directory_refuses_what_it_cannot_read_in_one_line() -> None:
    class Records:
        async def get(self, key: str) -> Record:
            return Record(key, {**OLD, "version": 3}, 3, "node9")

    with pytest.raises(Unreadable, match="^VE record 'shop' is of format 3, written by a newer agent"):
        await Directory(Records()).get("shop")  # type: ignore[arg-type]


names = st.text("abcdef", min_size=1, max_size=4)
floats = st.floats(allow_nan=False, allow_infinity=False, width=32)
places = st.tuples(names, names, names)
moves = st.builds(MoveIntent, names, names, names, st.none() | floats, names, st.sampled_from(["prepare", "started"]),
                  st.sampled_from(["running", "paused", "shutoff"]), names, floats)
failovers = st.builds(FailoverIntent, names, names, names, names, names, st.sampled_from(["running", "shutoff"]),
                      names, floats)
rebuilds = st.builds(RebuildIntent, names, names, names, st.none() | floats, names, names, st.none() | names,
                     st.sampled_from(["running", "paused", "shutoff"]), names, floats)
slots = st.builds(Slot, names, names, names, st.none() | floats, names,
                  st.none() | st.builds(Transfer, st.sampled_from(["live", "ship", "carry"]), floats),
                  st.none() | moves, st.none() | failovers, st.none() | rebuilds)
policies = st.sampled_from([HaPolicy(), HaPolicy("standby", 2, priority=-3), HaPolicy("restart", 0, 30, 3, 9),
                            HaPolicy("restart")])
records = st.builds(
    lambda placement, copies, standbys, marker, ha, short: VERecord(
        "shop", VESpec("shop", tuple(VMSpec(vm, 1, 64) for vm in placement), ha=ha), "alice", "running", placement,
        "n1", 1.0, "u1", copies, {vm: standbys for vm in placement if standbys}, (), marker, short),
    st.dictionaries(names, slots, max_size=3), st.none() | st.integers(0, 4),
    st.lists(st.builds(Standby, names, names, names, floats), max_size=2).map(tuple),
    st.none() | st.builds(SnapshotMarker, names, st.lists(names, max_size=2).map(tuple), names, floats),
    policies, st.none() | st.builds(Shortfall, names, floats))


@given(records)
def test_every_record_reads_back_as_written(ve: VERecord) -> None:
    assert read(msgpack.unpackb(msgpack.packb(write(ve)))) == ve


def test_a_ve_s_networks_and_nics_round_trip_in_format_2() -> None:
    networks = {"back": {"vni": 70000, "subnet": "10.0.0.0/24"}}
    nics = {"db": [{"network": "back", "mac": "02:aa:bb:cc:dd:ee", "address": "10.0.0.2"}]}
    stored = {**OLD, "networks": networks, "nics": nics, "version": 2}
    ve = read(msgpack.unpackb(msgpack.packb(stored)))
    assert ve.networks == {"back": NetState(70000, "10.0.0.0/24")} and ve.networks["back"].gateway == "10.0.0.1"
    assert ve.nics == {"db": (Nic("back", "02:aa:bb:cc:dd:ee", "10.0.0.2"),)}
    assert write(ve) == stored and read(write(ve)) == ve
    with pytest.raises(RecordError, match="format 3, written by a newer agent"):
        read({**stored, "version": 3})
