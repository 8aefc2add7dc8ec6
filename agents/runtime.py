"""The actor runtime of an agent: supervised services with mailboxes, and a notification bus.

Every service of an agent is an actor: one trio task that runs its periodic work (`tick`) and handles the
messages of its mailbox one at a time. Mailboxes carry events (membership news, protocol messages), not
the node's requests: RPCs are served in the tasks the transport starts for them, and a service whose
requests share state protects it as finely as that state allows (the host service: a lock per VM,
`agents.host.locks`), never by queueing every request in one mailbox. A `Supervisor` restarts a crashed service
(one-for-one) up to `max_restarts` times within `window` seconds, then escalates by raising
`EscalatedFailure`, which stops the agent: a service that keeps crashing is a bug, not weather.
The `Notifier` fans overlay events (member joined/left/died) out to the actors that subscribed,
as the DISCOVERY paper's Peer and Notification actors do.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

log = logging.getLogger(__name__)


TICK_GRID = 0.5
"""Seconds between the instants at which the ticks of a process may fall (see `on_grid`)."""


def on_grid(when: float, interval: float) -> float:
    """`when`, moved to the nearest multiple of TICK_GRID (on the process's clock) if `interval` is a multiple of
    it, else unchanged. An idle agent costs its host mostly wake-ups, each a cold pass through the interpreter
    (~0.1 ms here): its actors ticking every 0.5, 1, 2 or 5 s at their own phases would wake it ten times a
    second; on one grid they wake it twice. Rounding to the nearest point keeps each actor's rate (a tick
    that ends up to half a grid late still keeps its period); trio's clock starts at a random offset, so the
    agents of one machine are not aligned with each other."""
    steps = interval / TICK_GRID
    if not (TICK_GRID <= interval < math.inf and math.isfinite(when)) or abs(steps - round(steps)) > 1e-9:
        return when
    return round(when / TICK_GRID) * TICK_GRID


class EscalatedFailure(Exception):
    """A service crashed more often than its restart budget allows."""


class Actor:
    """Base of a service: override `handle` (mailbox messages) and/or `tick` (periodic work).

    `ask` posts a message and awaits the answer; the actor processes messages one at a time, so
    `handle` may mutate state freely. An exception inside `handle` is sent back to the asker (its
    request failed) and, unless it is an `Exception` the actor declares expected in
    `expected_errors`, also crashes the actor so the supervisor restarts it from a clean state.
    """

    name = "actor"
    tick_interval: float = math.inf
    expected_errors: tuple[type[Exception], ...] = ()

    def __init__(self, mailbox_size: int = 256) -> None:
        self._send, self._receive = trio.open_memory_channel[tuple[Any, Any]](mailbox_size)

    async def start(self) -> None:
        """Called at each (re)start before messages flow: load state, open resources."""

    async def handle(self, message: Any) -> Any:
        raise NotImplementedError(f"{self.name} takes no messages")

    async def tick(self) -> None:
        """Periodic work, every `tick_interval` seconds, between messages."""

    def tick_due(self, last: float) -> float:
        """When the next tick is due, the last one having ended at `last`; asked again after each message.
        By default `tick_interval` later, on the grid the process's ticks share (`on_grid`); an actor whose
        periodic work has deadlines of its own says when the nearest is, so that an idle actor sleeps instead
        of waking up to find nothing to do."""
        return on_grid(last + self.tick_interval, self.tick_interval)

    async def ask(self, message: Any) -> Any:
        reply_send, reply_receive = trio.open_memory_channel[tuple[bool, Any]](1)
        await self._send.send((message, reply_send))
        ok, value = await reply_receive.receive()
        if ok:
            return value
        raise value

    async def tell(self, message: Any) -> None:
        await self._send.send((message, None))

    def tell_nowait(self, message: Any) -> None:
        """Post without waiting; a full mailbox drops the message (the sender must not block)."""
        try:
            self._send.send_nowait((message, None))
        except trio.WouldBlock:
            log.warning("%s: mailbox full, dropped %r", self.name, message)

    async def run(self) -> None:
        await self.start()
        last = trio.current_time()
        while True:
            item = None
            with trio.move_on_at(self.tick_due(last)):  # only the wait is bounded: a handler is never cut short
                item = await self._receive.receive()
            if item is not None:
                await self._dispatch(*item)
            if trio.current_time() >= self.tick_due(last):
                await self.tick()
                last = trio.current_time()

    async def _dispatch(self, message: Any, reply: trio.MemorySendChannel | None) -> None:
        try:
            result = await self.handle(message)
        except Exception as err:
            if reply is not None:
                reply.send_nowait((False, err))
            if not isinstance(err, self.expected_errors):
                raise
            return
        if reply is not None:
            reply.send_nowait((True, result))


class Periodic(Actor):
    """An actor that runs `work` every `interval` seconds and nothing else (a background pass: a failure is
    logged, and the next tick tries again)."""

    def __init__(self, name: str, interval: float, work: Callable[[], Awaitable[object]]) -> None:
        super().__init__()
        self.name, self.tick_interval, self.work = name, interval, work

    async def tick(self) -> None:
        try:
            await self.work()
        except Exception as err:  # a background pass must not take the agent down
            log.info("%s pass failed: %s", self.name, err)


@dataclass
class _Budget:
    max_restarts: int
    window: float
    crashes: deque[float] = field(default_factory=deque)

    def spend(self, now: float) -> bool:
        """Record a crash; False once the budget for the window is exhausted."""
        self.crashes.append(now)
        while self.crashes and self.crashes[0] < now - self.window:
            self.crashes.popleft()
        return len(self.crashes) <= self.max_restarts


class Supervisor:
    """Runs services one-for-one: a crash restarts that service only, within a restart budget."""

    def __init__(self, max_restarts: int = 5, window: float = 60.0, backoff: float = 0.1) -> None:
        self.max_restarts = max_restarts
        self.window = window
        self.backoff = backoff
        self.restarts: dict[str, int] = {}

    async def supervise(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        """Run `run()` until it returns; restart it when it raises, escalate past the budget."""
        budget = _Budget(self.max_restarts, self.window)
        while True:
            try:
                await run()
                return
            except Exception as err:
                log.error("service %s crashed: %r", name, err, exc_info=err)
                if not budget.spend(trio.current_time()):
                    raise EscalatedFailure(f"service {name} crashed {len(budget.crashes)} times "
                                           f"in {self.window:g}s; giving up") from err
                self.restarts[name] = self.restarts.get(name, 0) + 1
                await trio.sleep(self.backoff)

    def start_actor(self, nursery: trio.Nursery, actor: Actor) -> None:
        nursery.start_soon(self.supervise, actor.name, actor.run)


@dataclass(frozen=True)
class Event:
    """An overlay event: `kind` is e.g. "member_joined", "member_dead", "member_left"."""

    kind: str
    data: dict[str, Any]


class Notifier:
    """Fans events out to subscribers' non-blocking `deliver` callbacks (typically `Actor.tell_nowait`)."""

    def __init__(self) -> None:
        self._subscribers: list[tuple[frozenset[str] | None, Callable[[Event], None]]] = []

    def subscribe(self, deliver: Callable[[Event], None], kinds: set[str] | None = None) -> None:
        self._subscribers.append((frozenset(kinds) if kinds else None, deliver))

    def publish(self, kind: str, **data: Any) -> None:
        event = Event(kind, data)
        for kinds, deliver in self._subscribers:
            if kinds is None or kind in kinds:
                deliver(event)
