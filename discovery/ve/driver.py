"""The thin trio shell of the VE transactions: it performs what a sans-IO core asks (`discovery.ve.transaction`:
a host call or several at once, a probe, a read, write, claim or delete of the VE record, an index update
(or one beside the next steps), a search for candidate nodes, a test pause) and feeds back what it saw,
until the core is done or refuses.

It decides nothing: what a failure means, what comes next, whether to go forward or back, is the core's
(`discovery.ve.creating`, `discovery.ve.moves`, `discovery.ve.failovers`, `discovery.ve.rebuilding`,
`discovery.ve.snapshotting`). It only turns answers and errors into observations, one line naming the node,
as the rest of the VE service words them, and a core's refusal into the RequestError of its kind.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from discovery.ve.base import HOST_TIMEOUT, pause_for_test
from discovery.ve.directory import Directory, Stored
from discovery.ve.index import Entry
from discovery.ve.spec import VESpec
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
    Core,
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
from overlay.dht import WriteConflict
from overlay.wire.rpc import Conflict, Endpoint, Forbidden, NotFound, RemoteError, RequestError, RpcError

log = logging.getLogger(__name__)
REFUSALS: dict[str, type[RequestError]] = {"not_found": NotFound, "conflict": Conflict, "forbidden": Forbidden}
Search = Callable[[VESpec, bool], Awaitable[Sequence[Candidate]]]
"""Where a new VE's VMs may go (`VEBase._candidates`): its spec, and whether to ask every member."""


async def drive(core: Core, record: Stored, transport: Endpoint, directory: Directory,
                search: Search | None = None) -> tuple[Stored, Any]:
    """Run `core`, built from `record` (a create's: the record it claims, at version 0), to its end; `search`
    answers `FindCandidates`. Returns the record as last read or written and the core's result; raises the
    core's refusal as a RequestError of its kind."""
    side_send, side_done = trio.open_memory_channel[Observation](1)

    async def beside(action: Action, record: Stored) -> None:
        _, observation = await _perform(action, record, transport, directory, search)
        await side_send.send(observation)

    action = core.start(time.time())
    async with trio.open_nursery() as nursery:
        while not isinstance(action, (Done, Refuse)):
            if isinstance(action, Beside):
                nursery.start_soon(beside, action.action, record)
                observation: Observation = Begun()
            elif isinstance(action, Join):
                observation = await side_done.receive()
            else:
                record, observation = await _perform(action, record, transport, directory, search)
            action = core.on(observation, time.time())
    if isinstance(action, Refuse):
        raise refusal(action)
    return record, action.result


def refusal(refuse: Refuse) -> RequestError:
    """A core's refusal as the RequestError the caller gets: of its kind, named or not (`unavailable`...)."""
    error = REFUSALS.get(refuse.kind, RequestError)(refuse.reason)
    error.kind = refuse.kind
    return error


async def _perform(action: Action, record: Stored, transport: Endpoint, directory: Directory,
                   search: Search | None) -> tuple[Stored, Observation]:
    within = action.within if isinstance(action, (CallHost, PauseForTest)) else None
    if within is None:
        return await _do(action, record, transport, directory, search)
    with trio.move_on_after(within):
        return await _do(action, record, transport, directory, search)
    return record, TimedOut()


async def _do(action: Action, record: Stored, transport: Endpoint, directory: Directory,
              search: Search | None) -> tuple[Stored, Observation]:
    match action:
        case CallHost():
            return record, await _call(action, transport)
        case CallHosts(calls=calls):
            return record, HostsAnswered(await _call_all(calls, transport))
        case Probe():
            return record, await _probe(action, transport)
        case FindCandidates(spec=spec, everyone=everyone):
            assert search is not None, "a core that searches is driven with a search"
            try:
                return record, CandidatesFound(tuple(await search(spec, everyone)))
            except RequestError as err:
                return record, SearchFailed(str(err), err.kind)
            except RpcError as err:
                return record, SearchFailed(str(err), "upstream")
        case ReadRecord() | WriteRecord() | ClaimRecord() | DeleteRecord() | AddToIndex() | RemoveFromIndex():
            try:
                return await _directory(action, record, directory)
            except WriteConflict as err:
                return record, ClaimLost(str(err)) if isinstance(action, ClaimRecord) else \
                    DirectoryFailed(str(err), err.kind)
            except RequestError as err:
                return record, DirectoryFailed(str(err), err.kind)
            except RpcError as err:
                return record, DirectoryFailed(str(err), "upstream")
        case PauseForTest():
            await pause_for_test(action.point)
            return record, Continued()
    raise TypeError(f"not an action a driver performs: {action!r}")


async def _directory(action: Action, record: Stored, directory: Directory) -> tuple[Stored, Observation]:
    """A read or change of the record or of the index; what fails raises (`_do` words it)."""
    name = record.ve.name
    match action:
        case ReadRecord():
            fresh = await directory.get(name)
            return (record, RecordRead(None)) if fresh is None else (fresh, RecordRead(fresh.ve))
        case WriteRecord(value=value):
            return await directory.put(value, after=record), RecordWritten()
        case ClaimRecord(value=value):
            try:  # most names are new: claim one as never written, and read only if it was (a round trip less)
                return await directory.put_if(value, None), RecordWritten()
            except WriteConflict:
                pass
            newest, live = await directory.newest(value.name)
            if live is not None:
                return record, RecordRead(live.ve)
            return await directory.put_if(value, newest), RecordWritten()
        case DeleteRecord():
            await directory.delete(name, after=record)
            return record, RecordWritten()
        case AddToIndex(name=ve, owner=owner, uid=uid):
            await directory.index.add(Entry(ve, owner, uid))
            return record, Indexed()
        case RemoveFromIndex(name=ve, uid=uid):
            await directory.index.remove(ve, uid)
            return record, Indexed()
    raise TypeError(f"not a directory action: {action!r}")


async def _call(call: CallHost, transport: Endpoint) -> HostAnswered | HostFailed:
    if call.best_effort:
        answer = (await transport.call_many([call.addr], call.method, dict(call.args), call.timeout))[call.addr]
        if isinstance(answer, Exception):
            log.info("%s on %s (best effort) failed: %s", call.method, call.node, answer)
            return HostFailed(call.node, f"{call.node}: {answer}")
        return HostAnswered(call.node, answer)
    try:
        answer = await transport.call(call.addr, call.method, dict(call.args), timeout=call.timeout or HOST_TIMEOUT)
    except RpcError as err:
        return HostFailed(call.node, f"{call.node}: {err}")
    return HostAnswered(call.node, answer)


async def _call_all(calls: Sequence[CallHost], transport: Endpoint) -> tuple[HostAnswered | HostFailed, ...]:
    """Every call at once; the answers in the order of the calls."""
    answers: dict[int, HostAnswered | HostFailed] = {}

    async def one(i: int, call: CallHost) -> None:
        answers[i] = await _call(call, transport)

    async with trio.open_nursery() as nursery:
        for i, call in enumerate(calls):
            nursery.start_soon(one, i, call)
    return tuple(answers[i] for i in range(len(calls)))


async def _probe(probe: Probe, transport: Endpoint) -> Probed:
    """Whether the host holds the domain: a `host.vm.info` that answers (holds), answers not_found (does
    not), or fails otherwise (unknown)."""
    try:
        answer = await transport.call(probe.addr, "host.vm.info", {"name": probe.domain},
                                      timeout=probe.timeout)
    except RemoteError as err:
        if err.kind == "not_found":
            return Probed(probe.node, False)
        return Probed(probe.node, None, reason=f"cannot tell whether {probe.node} holds {probe.domain}: {err}")
    except RpcError as err:
        return Probed(probe.node, None, reason=f"{probe.node} cannot be reached: {err}")
    return Probed(probe.node, True, answer)
