"""The transactions' trio shell (discovery.ve.driver): each action performed, each answer or error turned into
the observation the cores expect, limits enforced, refusals raised by kind. The cores decide nothing here."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import trio

from discovery.ve.directory import Directory, Stored
from discovery.ve.driver import drive
from discovery.ve.records import write
from discovery.ve.transaction import (
    Action,
    CallHost,
    Continued,
    DirectoryFailed,
    Done,
    HostAnswered,
    HostFailed,
    Observation,
    PauseForTest,
    Probe,
    Probed,
    ReadRecord,
    RecordRead,
    RecordWritten,
    Refuse,
    TimedOut,
    WriteRecord,
)
from discovery.ve.world import record_of
from overlay.dht import Record
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

    async def call(self, addr: str, method: str, args: dict[str, Any], timeout: float | None = None) -> Any:
        self.calls.append((addr, method, args, timeout))
        answer = self.answers[addr, method]
        if answer == "slow":
            await trio.sleep(10)
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
    """The overlay's records under the directory: one record, or a failure."""

    def __init__(self, record: Record | None, fail: Exception | None = None) -> None:
        self.record, self.fail = record, fail

    async def get(self, key: str) -> Record | None:
        if self.fail:
            raise self.fail
        return self.record

    async def put(self, key: str, value: Any, after: int | None = None) -> Record:
        if self.fail:
            raise self.fail
        assert self.record is not None and after == self.record.version
        self.record = Record(key, value, after + 1, "me")
        return self.record


SHOP = record_of("shop", {})
STOPPED = replace(SHOP, state="stopped")
RECORD = Stored(SHOP, 4)


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
    assert result == "result" and record == Stored(STOPPED, 5)
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


async def test_a_record_this_agent_cannot_read_stops_the_core_as_a_directory_failure() -> None:
    core = Script(ReadRecord(), Done())
    record, _ = await drive(core, RECORD, Transport({}), directory(value={**write(SHOP), "version": 2}))
    assert core.heard == [DirectoryFailed("VE record 'shop' is of format 2, written by a newer agent (this one "
                                          "reads up to 1): upgrade this agent")] and record == RECORD


@pytest.mark.parametrize("kind, error", [("not_found", NotFound), ("conflict", Conflict),
                                         ("bad_request", RequestError)])
async def test_a_refusal_is_raised_by_its_kind(kind: str, error: type[RequestError]) -> None:
    with pytest.raises(error, match="^no such thing$") as raised:
        await drive(Script(Refuse("no such thing", kind)), RECORD, Transport({}), directory())
    assert type(raised.value) is error
