"""What the host service's operations wait for: the lock of their VM, and the gate of the whole node.

`VmLocks` gives one lock per VM name, made when an operation first wants it and dropped when nobody
holds or waits for it, so a node with many VMs keeps only the locks in use. Operations on one VM
(its start, a 30 s graceful stop, a live migration, a snapshot, a confirm carrying it here) run one
at a time; operations on different VMs, and the calls that touch no VM (`host.info`, reservations,
listings), never wait for each other. What is shared by every VM is protected where it lives: the
capacity ledger changes only in synchronous sections (atomic under trio), and SQLite statements run
one at a time in a worker thread (`agents.host.store`).

`Gate` lets any number of operations in at once, or none: it is closed while the service (re)builds
its state from SQLite (at start, and after a crash), and `drain` waits for the operations inside to
finish first. It never orders operations among themselves.

Nothing here knows about libvirt or the wire; this module must never grow a node-wide queue.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import trio

H = TypeVar("H", bound=Callable[..., Awaitable[Any]])


class VmLocks:
    """A lock per VM name, created on demand and dropped when unused."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[trio.Lock, int]] = {}  # name -> (lock, operations holding or waiting)

    @asynccontextmanager
    async def hold(self, name: str) -> AsyncIterator[None]:
        """Hold VM `name`'s lock for the length of the block (waiting for the operation before, if any)."""
        lock, users = self._locks.get(name, (None, 0))
        if lock is None:
            lock = trio.Lock()
        self._locks[name] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[name]
            if users == 1:
                del self._locks[name]
            else:
                self._locks[name] = (lock, users - 1)

    def in_use(self) -> dict[str, int]:
        """VM name -> how many operations hold or wait for its lock (what `host.info` reports as busy)."""
        return {name: users for name, (_, users) in self._locks.items()}


class Gate:
    """Many operations at once, or none while the state is (re)built. Starts closed."""

    def __init__(self) -> None:
        self._open = trio.Event()
        self._inside = 0
        self._empty = trio.Event()
        self._empty.set()

    @property
    def is_open(self) -> bool:
        return self._open.is_set()

    @asynccontextmanager
    async def enter(self) -> AsyncIterator[None]:
        """Run the block as one operation, once the gate is open."""
        while not self._open.is_set():
            await self._open.wait()
        if self._inside == 0:
            self._empty = trio.Event()
        self._inside += 1
        try:
            yield
        finally:
            self._inside -= 1
            if self._inside == 0:
                self._empty.set()

    def close(self) -> None:
        """Let no new operation in (those inside go on)."""
        if self._open.is_set():
            self._open = trio.Event()

    async def drain(self) -> None:
        """Close, then wait until no operation is inside."""
        self.close()
        await self._empty.wait()

    def open(self) -> None:
        self._open.set()


def one_vm(handler: H) -> H:
    """Run a `host.*` handler (a method of a service with `vm_locks`) holding the lock of the VM that its
    request names (`name`; the request's type checked it before anything waits)."""
    @functools.wraps(handler)
    async def locked(self: Any, caller: Any, request: Any) -> Any:
        async with self.vm_locks.hold(request.name):
            return await handler(self, caller, request)
    return locked  # type: ignore[return-value]
