"""The transactions' trio shell (discovery.ve.driver): each action performed, each answer or error turned into
the observation the cores expect, limits enforced, refusals raised by kind. The cores decide nothing here."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import trio

from discovery.ve.directory import Directory, Stored
from discovery.ve.driver import drive
from discovery.ve.index import Entry, bucket_key, bucket_of, decode
from discovery.ve.records import VERSION, write
from discovery.ve.spec import VESpec, VMSpec
from discovery.ve.transaction import (
    Action,
    AddToIndex,
    Begun,
    Beside,
    CallHost,
    CallHosts,
    Candidate,
    CandidatesFound,
    ClaimLost,
    ClaimRecord,
    Continued,
    DeleteRecord,
    DirectoryFailed,
    Done,
    FindCandidates,
    HostAnswered,
    HostFailed,
    HostsAnswered,
    Indexed,
    Join,
    Observation,
    PauseForTest,
    Probe,
    Probed,
    ReadRecord,
    RecordRead,
    RecordWritten,
    Refuse,
    RemoveFromIndex,
    SearchFailed,
    TimedOut,
    WriteRecord,
)
from discovery.ve.world import record_of
from overlay.dht import Record, WriteConflict
from overlay.wire.rpc import Conflict, NotFound, RemoteError, RequestError, RpcError, RpcTimeout, Unreachable


class Script:
    """A core that asks `actions` in turn, whatever it hears, and keeps what it heard."""

    def __init__(self, *actions: Action) -> None:
        self.actions, self.heard = list(actions), list[Observation]()

    def start(self, now: float) -> Action:
        return self.actions.pop(0)

    def on(self, observation: Observation, now: float) -> Action:
        self.heard.append(observation)
        return self.actions.pop(0)


class Transport:
    def __init__(self, answers: dict[tuple[str, str], Any]) -> None:
        self.answers, self.calls = answers, list[tuple[str, str, dict[str, Any], float | None]]()
        self.sent: dict[str, float] = {}

    async def call(self, addr: str, method: str, args: dict[str, Any], timeout: float | None = None) -> Any:
        self.calls.append((addr, method, args, timeout))
        self.sent[addr] = trio.current_time()
        answer = self.answers[addr, method]
        if answer == "slow":
            await trio.sleep(30)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def call_many(self, addrs: list[str], method: str, args: dict[str, Any],
                        timeout: float | None = None) -> dict[str, Any]:
        out = {}
        for addr in addrs:
            try:
                out[addr] = await self.call(addr, method, args, timeout)
            except (RpcError, RequestError) as err:
                out[addr] = err
        return out


class Records:
    """The overlay's records under the directory: the VE's record and the index's buckets, or a failure."""

    def __init__(self, record: Record | None, fail: Exception | None = None) -> None:
        self.record, self.fail = record, fail
        self.buckets: dict[str, Record] = {}

    async def get(self, key: str) -> Record | None:
        if self.fail:
            raise self.fail
        return self.record

    async def get_record(self, key: str) -> Record | None:
        if self.fail:
            raise self.fail
        return self.buckets.get(key) if key.startswith("ve-index/") else self.record

    async def put_if(self, key: str, value: Any, expect: Record | None) -> Record:
        if self.fail:
            raise self.fail
        held = self.buckets.get(key) if key.startswith("ve-index/") else self.record
        if (held and held.stamp) != (expect and expect.stamp):
            raise WriteConflict(key, (held.version, held.writer) if held else (0, ""))
        written = Record(key, value, (expect.version if expect else 0) + 1, "me")
        if key.startswith("ve-index/"):
            self.buckets[key] = written
        else:
            self.record = written
        return written

    async def update(self, key: str, value: Any, expect: Record | None) -> Record:
        return await self.put_if(key, value, expect)


SHOP = record_of("shop", {})
STOPPED = replace(SHOP, state="stopped")
RECORD = Stored(SHOP, 4, "n1")


def directory(fail: Exception | None = None, value: Any = None) -> Directory:
    return Directory(Records(Record("ve/shop", write(SHOP) if value is None else value, 4, "n1"), fail))


async def test_each_action_and_what_comes_back() -> None:
    transport = Transport({
        ("a:1", "host.vm.info"): {"state": "running"},
        ("b:1", "host.vm.info"): RemoteError("not_found", "no VM shop:db"),
        ("c:1", "host.vm.info"): Unreachable("c:1: connection refused"),
        ("d:1", "host.vm.info"): RemoteError("internal", "boom"),
        ("a:1", "host.reserve"): RemoteError("conflict", "no room"), ("b:1", "host.release"): Unreachable("gone")})
    records = directory()
    core = Script(
        CallHost("a", "a:1", "host.vm.info", {"name": "shop:db"}),
        CallHost("a", "a:1", "host.reserve", {"name": "shop:db"}, timeout=7.0),
        CallHost("b", "b:1", "host.release", {"token": "t"}, best_effort=True),
        Probe("a", "a:1", "shop:db"), Probe("b", "b:1", "shop:db"), Probe("c", "c:1", "shop:db"),
        Probe("d", "d:1", "shop:db"),
        WriteRecord(STOPPED), ReadRecord(), PauseForTest("prepared"), Done("result"))
    record, result = await drive(core, RECORD, transport, records)
    assert result == "result" and record == Stored(STOPPED, 5, "me")
    assert core.heard == [
        HostAnswered("a", {"state": "running"}),
        HostFailed("a", "a: no room"),
        HostFailed("b", "b: gone"),
        Probed("a", True, {"state": "running"}),
        Probed("b", False),
        Probed("c", None, reason="c cannot be reached: c:1: connection refused"),
        Probed("d", None, reason="cannot tell whether d holds shop:db: boom"),
        RecordWritten(),
        RecordRead(STOPPED),
        Continued(),
    ]
    timeouts = [t for _, method, _, t in transport.calls if method != "host.vm.info" or t != 10.0]
    assert timeouts == [40.0, 7.0, None]  # a host call's default, as asked, call_many's default


async def test_a_limit_ends_an_action_as_timed_out() -> None:
    transport = Transport({("a:1", "host.confirm"): "slow", ("b:1", "host.vm.info"): RpcTimeout("no answer")})
    core = Script(CallHost("a", "a:1", "host.confirm", {}, within=0.05), CallHost("b", "b:1", "host.vm.info", {}),
                  Done())
    await drive(core, RECORD, transport, directory())
    assert core.heard == [TimedOut(), HostFailed("b", "b: no answer")]


async def test_the_directory_failing_and_a_record_gone() -> None:
    core = Script(WriteRecord(SHOP), ReadRecord(), Done())
    await drive(core, RECORD, Transport({}), directory(Conflict("the record changed")))
    assert core.heard == [DirectoryFailed("the record changed", "conflict"), DirectoryFailed("the record changed",
                                                                                             "conflict")]
    core = Script(ReadRecord(), Done())
    record, _ = await drive(core, RECORD, Transport({}), Directory(Records(None)))
    assert core.heard == [RecordRead(None)] and record == RECORD  # the last record known is kept


async def test_a_write_after_a_record_that_changed_meanwhile_is_a_conflict_and_writes_nothing() -> None:
    records = directory()
    stale = Stored(SHOP, 3, "n1")  # read before another agent wrote version 4
    core = Script(WriteRecord(STOPPED), DeleteRecord(), Done())
    record, _ = await drive(core, stale, Transport({}), records)
    lost = DirectoryFailed("'ve/shop' changed meanwhile: a replica holds version 4 by n1", "conflict")
    assert core.heard == [lost, lost] and record == stale
    assert records.records.record == Record("ve/shop", write(SHOP), 4, "n1")


async def test_a_record_this_agent_cannot_read_stops_the_core_as_a_directory_failure() -> None:
    core = Script(ReadRecord(), Done())
    record, _ = await drive(core, RECORD, Transport({}), directory(value={**write(SHOP), "version": VERSION + 1}))
    assert core.heard == [DirectoryFailed(f"VE record 'shop' is of format {VERSION + 1}, written by a newer agent "
                                          f"(this one reads up to {VERSION}): upgrade this agent")] and record == RECORD


@pytest.mark.parametrize("kind, error", [("not_found", NotFound), ("conflict", Conflict),
                                         ("bad_request", RequestError)])
async def test_a_refusal_is_raised_by_its_kind(kind: str, error: type[RequestError]) -> None:
    with pytest.raises(error, match="^no such thing$") as raised:
        await drive(Script(Refuse("no such thing", kind)), RECORD, Transport({}), directory())
    assert type(raised.value) is error


async def test_calls_at_once_go_out_together_and_come_back_in_order(autojump_clock) -> None:
    """A create's confirms: a guest slow to start (30 s) must not hold the others back, whose reservations
    would lapse meanwhile; every answer comes back, in the order of the calls."""
    transport = Transport({("a:1", "host.confirm"): "slow", ("c:1", "host.confirm"): {"state": "running"},
                           ("b:1", "host.confirm"): RemoteError("conflict", "reservation t2 is unknown or expired")})
    core = Script(CallHosts(tuple(CallHost(n, f"{n}:1", "host.confirm", {"token": f"t{i}"})
                                  for i, n in enumerate("abc", 1))), Done())
    await drive(core, RECORD, transport, directory())
    assert transport.sent == {"a:1": 0.0, "b:1": 0.0, "c:1": 0.0}
    assert core.heard == [HostsAnswered((HostAnswered("a", "slow"),
                                         HostFailed("b", "b: reservation t2 is unknown or expired"),
                                         HostAnswered("c", {"state": "running"})))]


async def test_a_claim_the_index_and_a_delete() -> None:
    new = replace(SHOP, state="creating", uid="u1")
    records = Records(Record("ve/shop", None, 3, "n2"))  # a tombstone: the name is free
    core = Script(ClaimRecord(new), AddToIndex("shop", "alice", "u1"), ReadRecord(), DeleteRecord(),
                  RemoveFromIndex("shop", "u1"), Done())
    record, _ = await drive(core, Stored(new, 0), Transport({}), Directory(records))
    assert core.heard == [RecordWritten(), Indexed(), RecordRead(new), RecordWritten(), Indexed()]
    assert record == Stored(new, 4, "me") and records.record == Record("ve/shop", None, 5, "me")
    assert decode(records.buckets[bucket_key(bucket_of("shop"))]) == []  # added, then removed
    taken = Script(ClaimRecord(new), AddToIndex("shop", "alice", "u1"), Done())
    await drive(taken, Stored(new, 0), Transport({}), directory())
    assert taken.heard[0] == RecordRead(SHOP)  # the name is live: the claim writes nothing


async def test_an_index_entry_is_added_beside_the_next_steps(autojump_clock) -> None:
    """`Beside` answers at once, the add runs while the next action does (a 30 s host call here), and `Join`
    returns what the add led to."""
    new = replace(SHOP, state="creating", uid="u1")
    records = Records(None)
    key = bucket_key(bucket_of("shop"))

    class Watched(Transport):
        async def call(self, addr: str, method: str, args: dict[str, Any], timeout: float | None = None) -> Any:
            indexed_during_call.append(key in records.buckets)
            answer = await super().call(addr, method, args, timeout)
            indexed_during_call.append(key in records.buckets)
            return answer

    indexed_during_call: list[bool] = []
    core = Script(Beside(AddToIndex("shop", "alice", "u1")), CallHost("a", "a:1", "host.info", {}), Join(), Done())
    await drive(core, Stored(new, 0), Watched({("a:1", "host.info"): "slow"}), Directory(records))
    assert core.heard == [Begun(), HostAnswered("a", "slow"), Indexed()]
    assert indexed_during_call == [False, True]  # the add landed while the host call ran
    assert decode(records.buckets[key]) == [Entry("shop", "alice", "u1")]


async def test_a_new_name_is_claimed_without_a_read() -> None:
    class Unread(Records):
        async def get_record(self, key: str) -> Record | None:
            raise AssertionError(f"{key} read")

    new = replace(SHOP, state="creating", uid="u1")
    records = Unread(None)
    record, _ = await drive(Script(ClaimRecord(new), Done()), Stored(new, 0), Transport({}), Directory(records))
    assert record == Stored(new, 1, "me") and records.record is not None and records.record.value["uid"] == "u1"


async def test_a_lost_claim_race_and_a_failing_directory(autojump_clock) -> None:
    class Racing(Records):
        async def put_if(self, key: str, value: Any, expect: Record | None) -> Record:
            raise WriteConflict(key, (2, "n3"))

    new = replace(SHOP, state="creating")
    core = Script(ClaimRecord(new), AddToIndex("shop", "alice", ""), Done())
    await drive(core, Stored(new, 0), Transport({}), Directory(Racing(None)))
    assert core.heard == [ClaimLost("'ve/shop' changed meanwhile: a replica holds version 2 by n3"),
                          DirectoryFailed(f"index bucket {bucket_key(bucket_of('shop'))!r} kept changing for 12 "
                                          "attempts; try again")]
    down = Script(ClaimRecord(new), DeleteRecord(), Done())
    await drive(down, Stored(new, 0), Transport({}), directory(Unreachable("no replica answered")))
    assert down.heard == [DirectoryFailed("no replica answered", "upstream")] * 2


async def test_candidates_are_searched_and_a_failed_search_named() -> None:
    spec = VESpec("shop", (VMSpec("a", 1, 256),))
    found = [Candidate("n1", "n1:1", "rennes", 0.0, free={"vcpus": 4})]
    asked: list[tuple[VESpec, bool]] = []

    async def search(wanted: VESpec, everyone: bool) -> list[Candidate]:
        asked.append((wanted, everyone))
        if everyone:
            raise RequestError("no live node in site 'mars' (sites: rennes)")
        return found

    core = Script(FindCandidates(spec), FindCandidates(spec, everyone=True), Done())
    await drive(core, RECORD, Transport({}), directory(), search)
    assert asked == [(spec, False), (spec, True)]
    assert core.heard == [CandidatesFound(tuple(found)),
                          SearchFailed("no live node in site 'mars' (sites: rennes)", "bad_request")]


async def test_a_refusal_of_another_kind_keeps_it() -> None:
    with pytest.raises(RequestError, match="^retry in a moment$") as raised:
        await drive(Script(Refuse("retry in a moment", "unavailable")), RECORD, Transport({}), directory())
    assert raised.value.kind == "unavailable"
