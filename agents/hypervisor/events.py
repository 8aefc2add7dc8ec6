"""libvirt's lifecycle events of a node's real guests: which domain stopped, and why (for crash restarts).

libvirt says why a domain stopped (VIR_DOMAIN_EVENT_ID_LIFECYCLE: STOPPED with a detail). A QEMU that dies
without having said it shuts down (kill -9, a QEMU crash) is STOPPED/FAILED: libvirt sees its monitor close
with no SHUTDOWN event before (`processMonitorEOFEvent` in libvirt's qemu_process.c; measured here with kill
-9 on libvirt 9.0). A guest panic that `on_crash` turns into a stop is STOPPED/CRASHED. A stop on purpose says
which it was: SHUTDOWN, DESTROYED, SAVED (a managed save), MIGRATED, FROM_SNAPSHOT. The first two leave the
domain shut off with reason CRASHED, which `agents.hypervisor.actor.HypervisorActor.crashed` reads back when
events may have been missed.

The events come on a connection of their own, owned by a pykka actor (`LifecycleWatch`), as every libvirt
connection is (`agents.hypervisor.actor`), and opened once libvirt's event loop runs
(`qemu_xml.start_event_loop`): a connection to a daemon opened before delivers none. libvirt calls back in
its event loop's thread, which also drives the embedded QEMU driver, so `deliver` must never block (the
host hands each event to trio with `TrioToken.run_sync_soon`). The test driver is never watched: a second
`test:///` connection would be another, empty host. This module decides nothing about a stop.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pykka
import trio

from agents.hypervisor.actor import HypervisorError
from agents.hypervisor.qemu_xml import open_embed, start_event_loop

log = logging.getLogger(__name__)

_WHY = {
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED: "destroyed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_MIGRATED: "migrated",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SAVED: "saved",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED: "failed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_FROM_SNAPSHOT: "from_snapshot",
}
CRASHES = frozenset({"crashed", "failed"})
"""The reasons of a stop that nobody asked for: a guest panic, and a QEMU that died."""


@dataclass(frozen=True)
class Stopped:
    """Domain `name` stopped; `why` is libvirt's detail ("failed", "crashed", "destroyed", "shutdown"...)."""

    name: str
    why: str


@dataclass(frozen=True)
class WatchLost:
    """The events' connection closed (the daemon restarted or died): events may be missed until it reopens."""

    reason: int


Event = Stopped | WatchLost
Deliver = Callable[[Event], None]


class LifecycleWatch(pykka.ThreadingActor):
    """Owns the events' connection: opens it (event loop first), registers the callbacks, closes it."""

    use_daemon_thread = True  # it never holds a request: a process that exits need not wait for it

    def __init__(self, uri: str, deliver: Deliver) -> None:
        super().__init__()
        self._uri, self._deliver = uri, deliver
        self._conn: libvirt.virConnect | None = None
        self._callback: int | None = None
        self._error: HypervisorError | None = None

    def on_start(self) -> None:
        start_event_loop()
        try:
            if self._uri.startswith("qemu:///embed?root="):
                self._conn = open_embed(Path(self._uri.partition("=")[2]))
            else:
                self._conn = libvirt.open(self._uri)
            self._callback = self._conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                                               self._on_lifecycle, None)
            with contextlib.suppress(libvirt.libvirtError):  # a local driver may not support it: never closes
                self._conn.registerCloseCallback(self._on_close, None)
        except libvirt.libvirtError as err:
            self._error = HypervisorError(f"cannot watch {self._uri}: {err.get_error_message()}")
            self._disconnect()

    def on_stop(self) -> None:
        self._disconnect()

    def check_open(self) -> None:
        if self._error is not None:
            raise self._error

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        with contextlib.suppress(libvirt.libvirtError):
            if self._callback is not None:
                conn.domainEventDeregisterAny(self._callback)
            conn.unregisterCloseCallback()
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()

    # -- in libvirt's event loop thread: never block --

    def _on_lifecycle(self, _conn: libvirt.virConnect, dom: libvirt.virDomain, event: int, detail: int,
                      _opaque: object) -> None:
        if event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
            self._deliver(Stopped(dom.name(), _WHY.get(detail, "other")))

    def _on_close(self, _conn: libvirt.virConnect, reason: int, _opaque: object) -> None:
        self._deliver(WatchLost(reason))


class GuestEvents:
    """Trio-facing handle of a `LifecycleWatch`: open it with `await GuestEvents.open(uri, deliver)`."""

    def __init__(self, ref: pykka.ActorRef[LifecycleWatch]) -> None:
        self._ref = ref

    @classmethod
    async def open(cls, uri: str, deliver: Deliver) -> GuestEvents:
        """Watch the domains at `uri`, calling `deliver` (in libvirt's thread) with each stop; HypervisorError
        when the connection cannot be opened."""
        return cls(await trio.to_thread.run_sync(_start, uri, deliver))

    def close(self) -> None:
        """Stop watching (the actor closes its connection in its thread; this does not wait)."""
        self._ref.stop(block=False)


def _start(uri: str, deliver: Deliver) -> pykka.ActorRef[LifecycleWatch]:
    ref = LifecycleWatch.start(uri, deliver)
    try:
        ref.proxy().check_open().get()
    except HypervisorError:
        ref.stop()
        raise
    return ref
