"""The thin trio shell of the VE transactions: it performs what a sans-IO core asks (`discovery.ve.transaction`:
a host call, a probe, a read or write of the VE record, a test pause) and feeds back what it saw, until the
core is done or refuses.

It decides nothing: what a failure means, what comes next, whether to go forward or back, is the core's
(`discovery.ve.moves`, `discovery.ve.failovers`, `discovery.ve.snapshotting`). It only turns answers and
errors into observations, one line naming the node, as the rest of the VE service words them, and a core's
refusal into the RequestError of its kind.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import trio

from discovery.ve.base import HOST_TIMEOUT, pause_for_test
from discovery.ve.directory import Directory, Stored
from discovery.ve.transaction import (
    Action,
    CallHost,
    Continued,
    Core,
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
from overlay.wire.rpc import Conflict, Endpoint, Forbidden, NotFound, RemoteError, RequestError, RpcError

log = logging.getLogger(__name__)
REFUSALS: dict[str, type[RequestError]] = {"not_found": NotFound, "conflict": Conflict, "forbidden": Forbidden}


async def drive(core: Core, record: Stored, transport: Endpoint, directory: Directory) -> tuple[Stored, Any]:
    """Run `core`, built from `record`, to its end. Returns the record as last read or written and the
    core's result; raises the core's refusal as a RequestError of its kind."""
    action = core.start(time.time())
    while True:
        if isinstance(action, Done):
            return record, action.result
        if isinstance(action, Refuse):
            raise REFUSALS.get(action.kind, RequestError)(action.reason)
        record, observation = await _perform(action, record, transport, directory)
        action = core.on(observation, time.time())


async def _perform(action: Action, record: Stored, transport: Endpoint,
                   directory: Directory) -> tuple[Stored, Observation]:
    within = action.within if isinstance(action, (CallHost, PauseForTest)) else None
    if within is None:
        return await _do(action, record, transport, directory)
    with trio.move_on_after(within):
        return await _do(action, record, transport, directory)
    return record, TimedOut()


async def _do(action: Action, record: Stored, transport: Endpoint,
              directory: Directory) -> tuple[Stored, Observation]:
    match action:
        case CallHost(best_effort=True):
            answer = (await transport.call_many([action.addr], action.method, dict(action.args),
                                                action.timeout))[action.addr]
            if isinstance(answer, Exception):
                log.info("%s on %s (best effort) failed: %s", action.method, action.node, answer)
                return record, HostFailed(action.node, f"{action.node}: {answer}")
            return record, HostAnswered(action.node, answer)
        case CallHost():
            try:
                answer = await transport.call(action.addr, action.method, dict(action.args),
                                              timeout=action.timeout or HOST_TIMEOUT)
            except RpcError as err:
                return record, HostFailed(action.node, f"{action.node}: {err}")
            return record, HostAnswered(action.node, answer)
        case Probe():
            return record, await _probe(action, transport)
        case ReadRecord():
            try:
                fresh = await directory.get(record.ve.name)
            except RequestError as err:
                return record, DirectoryFailed(str(err), err.kind)
            return (record, RecordRead(None)) if fresh is None else (fresh, RecordRead(fresh.ve))
        case WriteRecord():
            try:
                record = await directory.put(action.value, after=record.version)
            except RequestError as err:
                return record, DirectoryFailed(str(err), err.kind)
            return record, RecordWritten()
        case PauseForTest():
            await pause_for_test(action.point)
            return record, Continued()
    raise TypeError(f"not an action a driver performs: {action!r}")


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
