"""An in-memory network for simulations: the production services, thousands of nodes, one process.

`MemNetwork` connects `MemTransport`s (the `Endpoint` surface of the real transport) with a
per-pair one-way latency; run it under a virtual clock and simulated minutes pass in seconds. A
crashed node does not answer: its callers wait out their timeout, as they would for a host that
vanished. Nodes may speak different protocol versions (`endpoint(..., speaks=)`): a call between two
that share none is refused as the real handshake refuses it, and a handler sees the version as
`Caller.version`. Every request and answer is copied through msgpack, so a simulation catches what the wire
would refuse (the responder's `stamp` is handed over as is: it is the transport's, not the service's).

Two clocks work. `trio.testing.MockClock(autojump_threshold=0)` (what the tests use) costs a trio
timer per delay and a cancel scope with a deadline per call. `SimClock` is the same virtual time made
for thousands of nodes: it keeps its own timer heap, which the run loop consults whenever every task
is blocked, so one network delay is one heap entry and one task wake-up (about 4 times cheaper per
message); a call opens a deadline only for a handler that can await something at all.
"""

from __future__ import annotations

import dis
import functools
import heapq
import inspect
import math
import random
from collections.abc import Callable
from dataclasses import replace
from types import CodeType
from typing import Any

import msgpack
import trio
from trio.lowlevel import Abort, current_clock, current_task, reschedule, wait_task_rescheduled

from overlay.wire import versions
from overlay.wire.rpc import Caller, Endpoint, RemoteError, RequestError, RpcError, RpcTimeout, Unreachable
from overlay.wire.versions import SPOKEN, Versions

LatencyFn = Callable[[str, str], float]
"""One-way latency in seconds between two addresses."""


class SimClock(trio.abc.Clock):
    """Virtual time for `trio.run(..., clock=SimClock())`: when no task can run, time jumps to the next
    deadline (trio's or one of `call_at`'s), as `MockClock(autojump_threshold=0)` does.

    `call_at` timers are plain callbacks run by the run loop itself, between two batches of tasks:
    they may only reschedule tasks or cancel scopes (see `sleep`), never block or raise.
    """

    def __init__(self) -> None:
        self._now = 0.0
        self._timers: list[list[Any]] = []  # [when, sequence, callback or None when cancelled]
        self._sequence = 0

    def start_clock(self) -> None:
        pass

    def current_time(self) -> float:
        return self._now

    def call_at(self, when: float, callback: Callable[[], object]) -> list[Any]:
        """Run `callback` once virtual time reaches `when`; returns a handle for `cancel`."""
        entry = [when, self._sequence, callback]
        self._sequence += 1
        heapq.heappush(self._timers, entry)
        return entry

    @staticmethod
    def cancel(handle: list[Any]) -> None:
        handle[2] = None

    def deadline_to_sleep_time(self, deadline: float) -> float:
        """Called by the run loop with trio's next deadline when no task is runnable: jump there, or to
        our first timer if it comes earlier, and fire the timers that are due."""
        timers = self._timers
        while timers and timers[0][2] is None:
            heapq.heappop(timers)
        if timers and timers[0][0] <= deadline:
            self._now = max(self._now, timers[0][0])
            while timers and timers[0][0] <= self._now:
                callback = heapq.heappop(timers)[2]
                if callback is not None:
                    callback()
            return 0.0
        if deadline == math.inf:
            return math.inf  # nothing will ever happen: trio waits for I/O, as with MockClock
        self._now = max(self._now, deadline)
        return 0.0

    async def sleep_until(self, when: float) -> None:
        """`trio.sleep_until` on a heap entry instead of a cancel scope; cancellable all the same."""
        if when <= self._now:
            await trio.lowlevel.checkpoint()
            return
        task = current_task()
        handle = self.call_at(when, lambda: reschedule(task))

        def abort(_: Any) -> Abort:
            handle[2] = None
            return Abort.SUCCEEDED

        await wait_task_rescheduled(abort)


async def sleep(seconds: float) -> None:
    """`trio.sleep`, cheap under `SimClock`."""
    clock = current_clock()
    if isinstance(clock, SimClock):
        await clock.sleep_until(clock.current_time() + seconds)
    else:
        await trio.sleep(seconds)


class MemNetwork:
    def __init__(self, latency: LatencyFn | None = None, check_answers: bool = True) -> None:
        self.latency = latency or (lambda a, b: 0.0)
        self.check_answers = check_answers
        """`Endpoint.check_answers` of every node (off: every caller in the simulation `ask`s)."""
        self.endpoints: dict[str, MemTransport] = {}
        self.down: set[str] = set()
        self.messages = 0
        self.cut: set[tuple[str, str]] = set()
        """(from, to) address pairs whose messages are lost: a partition, one way or (both pairs) both."""
        self.loss = 0.0
        self.rng = random.Random(0)
        """Each message is also lost with probability `loss`, drawn from `rng`."""

    def endpoint(self, addr: str, node: str, site: str = "", speaks: Versions = SPOKEN) -> MemTransport:
        transport = MemTransport(self, addr, node, site, speaks)
        transport.check_answers = self.check_answers
        self.endpoints[addr] = transport
        self.down.discard(addr)
        return transport

    def crash(self, addr: str) -> None:
        """The node stops answering at once; its state is gone with it."""
        self.down.add(addr)
        self.endpoints.pop(addr, None)

    def lost(self, source: str, target: str) -> bool:
        """Whether a message from `source` to `target` is lost (cut, or by chance): its caller times out; an
        answer lost after the handler ran leaves the handler's effects in place, as on a real network."""
        return (source, target) in self.cut or (self.loss > 0 and self.rng.random() < self.loss)


class MemTransport(Endpoint):
    def __init__(self, network: MemNetwork, addr: str, node: str, site: str, speaks: Versions = SPOKEN) -> None:
        super().__init__(node, site)
        self.network = network
        self.addr = addr
        self.versions = speaks
        self.caller = Caller(node, "node", node, site, speaks.newest)
        """How this node appears to the handlers it calls (of a node that speaks the same versions)."""

    async def call(self, addr: str, method: str, args: dict[str, Any] | None = None,
                   timeout: float | None = None) -> Any:
        deadline = timeout if timeout is not None else self.default_timeout
        net = self.network
        if self.addr in net.down:
            raise Unreachable(f"{addr}: this node is down")
        target = net.endpoints.get(addr)
        if target is not None and target.versions is not self.versions and target.versions != self.versions:
            self._agree(addr, target)
        one_way = net.latency(self.addr, addr)
        net.messages += 1
        clock = current_clock()
        if isinstance(clock, SimClock):
            ok, value, target = await self._exchange(clock, addr, method, args, one_way, deadline)
        else:
            ok, value, target = await self._exchange_trio(addr, method, args, one_way, deadline)
        if target is None:
            raise RpcTimeout(f"{addr}: no answer to {method} within {deadline:g}s")
        if self.on_rtt is not None:
            self.on_rtt(target.node, 2 * one_way, target.stamp() if target.stamp else None)
        if ok:
            return _copy(value)
        raise RemoteError(value["kind"], value["message"])

    async def _exchange_trio(self, addr: str, method: str, args: dict[str, Any] | None, one_way: float,
                             deadline: float) -> tuple[bool, Any, MemTransport | None]:
        """Request, handler, answer on trio's own timers; target None means the deadline passed."""
        with trio.move_on_after(deadline):
            await trio.sleep(one_way)
            target = self.network.endpoints.get(addr)
            if target is None or self.network.lost(self.addr, addr):
                await trio.sleep_forever()  # a vanished host or a lost request: the caller can only time out
            ok, value = await target.serve(self, method, _copy(args or {}))
            if self.network.lost(addr, self.addr):
                await trio.sleep_forever()
            await trio.sleep(one_way)
            return ok, value, target
        return False, None, None

    async def _exchange(self, clock: SimClock, addr: str, method: str, args: dict[str, Any] | None,
                        one_way: float, deadline: float) -> tuple[bool, Any, MemTransport | None]:
        """The same exchange on `SimClock` timers, with the same timing to the tick."""
        expiry = clock.current_time() + deadline
        if one_way >= deadline:
            await clock.sleep_until(expiry)
            return False, None, None
        await clock.sleep_until(clock.current_time() + one_way)
        target = self.network.endpoints.get(addr)
        if target is None or self.network.lost(self.addr, addr):  # the caller can only time out
            await clock.sleep_until(expiry)
            return False, None, None
        if _never_suspends(target.handler(method)):  # the Chord handlers: nothing to time out
            ok, value = await target.serve(self, method, _copy(args or {}))
        else:
            with trio.CancelScope() as scope:
                timer = clock.call_at(expiry, scope.cancel)
                try:
                    ok, value = await target.serve(self, method, _copy(args or {}))
                finally:
                    clock.cancel(timer)
            if scope.cancelled_caught:
                return False, None, None
        back = clock.current_time() + one_way
        if back > expiry or self.network.lost(addr, self.addr):  # the answer would come too late, or not at all
            await clock.sleep_until(expiry)
            return False, None, None
        await clock.sleep_until(back)
        return ok, value, target

    async def peer_version(self, addr: str, timeout: float | None = None) -> int:
        target = self.network.endpoints.get(addr)
        if target is None or self.addr in self.network.down:
            raise Unreachable(f"{addr}: no such node is up")
        return self._agree(addr, target)

    def _agree(self, addr: str, target: MemTransport) -> int:
        """The version of a connection to `target`, or Unreachable as the real handshake refuses."""
        try:
            return versions.agree(self.versions, versions.Hello(target.node, target.site, target.versions), addr)
        except versions.NoCommonVersion as err:
            raise Unreachable(f"{addr}: handshake failed: {err}") from None

    async def serve(self, caller: MemTransport, method: str, args: dict[str, Any]) -> tuple[bool, Any]:
        """Run a handler as the real transport would; a handler's bug propagates (a simulation should stop)."""
        who = caller.caller
        if caller.versions is not self.versions and caller.versions != self.versions:  # `call` refused a disjoint one
            who = replace(who, version=versions.negotiate(caller.versions, self.versions) or 0)
        try:
            return True, await self.dispatch(who, method, args)
        except RequestError as err:
            return False, {"kind": err.kind, "message": str(err)}
        except RpcError as err:
            return False, {"kind": "upstream", "message": str(err)}


_SUSPENDING = {"GET_AWAITABLE", "GET_AITER", "GET_ANEXT", "BEFORE_ASYNC_WITH", "SEND", "YIELD_VALUE"}


def _never_suspends(handler: Any) -> bool:
    """True for an `async def` whose body contains no await (nor async for/with): it runs to the end
    without yielding to trio, so the caller's deadline cannot expire inside it."""
    code = getattr(getattr(handler, "__func__", handler), "__code__", None)
    return code is not None and _code_never_suspends(code)


@functools.lru_cache(maxsize=1024)
def _code_never_suspends(code: CodeType) -> bool:
    return bool(code.co_flags & inspect.CO_COROUTINE) and not any(
        op.opname in _SUSPENDING for op in dis.get_instructions(code))


_packer = msgpack.Packer(use_bin_type=True)


def _copy(value: Any) -> Any:
    return msgpack.unpackb(_packer.pack(value), raw=False, strict_map_key=False)
