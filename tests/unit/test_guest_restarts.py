"""Crashed guests restarted in place: the host's check of its own intent (`agents.host.crashes`) and the actor
that drives it from libvirt's lifecycle events (`agents.host.restarts`), on the embedded test:/// driver.

The test driver cannot crash a guest, nor say a domain stopped by crashing: a crash here is the domain forced
off with libvirt's `crashed` listing patched to name it, and the events are delivered by hand, as the watch
(`agents.hypervisor.events`, proven with real guests in tests/integration/test_qemu_agents.py) delivers them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio.testing

from agents.host.restarts import REOPEN_PAUSE, GuestRestarts
from agents.host.service import HostService
from agents.hypervisor.actor import Hypervisor, HypervisorError, write_node_xml
from agents.hypervisor.events import Deliver, Stopped, WatchLost
from agents.messages import (
    HOST_CONFIRM,
    HOST_INFO,
    HOST_RESERVE,
    HOST_VM_DESTROY,
    HOST_VM_INFO,
    HOST_VM_START,
    Confirm,
    Reserve,
    VmName,
)
from overlay.messages import NoArgs
from overlay.wire.rpc import Endpoint
from tests.unit.conftest import ask


async def define(host: HostService, name: str, state: str = "running") -> None:
    token = (await ask(host, HOST_RESERVE, Reserve(name, 1, 256, 1))).token
    await ask(host, HOST_CONFIRM, Confirm(token, state=state))


async def crash(host: HostService, monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """The guests of `names` die: forced off, and libvirt's listing of crashed domains names them."""
    for name in names:
        if await host.hypervisor.persistent(name):
            await host.hypervisor.destroy(name)
    dead = set(names)

    async def crashed() -> list[str]:
        return [d.name for d in await host.hypervisor.list() if d.name in dead and d.state == "shutoff"]

    monkeypatch.setattr(host.hypervisor, "crashed", crashed)


async def state(host: HostService, name: str) -> str:
    return (await ask(host, HOST_VM_INFO, VmName(name))).state


# -- the host's side ----------------------------------------------------------------------------------------


async def test_a_crashed_vm_meant_to_run_is_started_again(host: HostService, monkeypatch: pytest.MonkeyPatch) -> None:
    await define(host, "ve:a")
    await crash(host, monkeypatch, "ve:a")
    assert await host.restart_crashed("ve:a") is True
    assert await state(host, "ve:a") == "running" and host.guest_restarts == 1
    assert await host.restart_crashed("ve:a") is False  # running again: nothing to do
    assert host.guest_restarts == 1


async def test_a_vm_stopped_on_purpose_held_gone_or_not_crashed_is_never_restarted(
        host: HostService, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ve:destroyed", "ve:held", "ve:off", "ve:paused", "ve:fine"):
        await define(host, name, "paused" if name == "ve:paused" else "running")
    await ask(host, HOST_VM_DESTROY, VmName("ve:destroyed"))  # destroyed on purpose: the intent is shutoff
    host.held["ve:held"] = "running"  # off since the node's start, until the directory places it
    await crash(host, monkeypatch, "ve:destroyed", "ve:held", "ve:paused", "ve:gone")
    await host.hypervisor.destroy("ve:off")  # forced off behind the host's back, but libvirt says not by a crash
    for name in ("ve:destroyed", "ve:held", "ve:off", "ve:paused", "ve:gone", "ve:fine"):
        assert await host.restart_crashed(name) is False, name
        assert await host.mark_crashed(name) is False, name
    assert host.guest_restarts == 0 and host.crashed == set()


async def test_a_vm_marked_crashed_is_shown_so_stays_down_across_a_restart_until_started(
        host: HostService, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    await define(host, "ve:a")
    await define(host, "ve:b")
    await crash(host, monkeypatch, "ve:a")
    assert await host.mark_crashed("ve:a") is True
    assert await state(host, "ve:a") == "crashed"
    listed = {d.name: d.state for d in (await ask(host, HOST_INFO, NoArgs())).domains}
    assert listed == {"ve:a": "crashed", "ve:b": "running"}
    assert await host.restart_crashed("ve:a") is False  # given up: only a verb brings it back
    fresh = Hypervisor.open(write_node_xml(tmp_path / "again.xml", vcpus=8, memory_mb=8192))
    again = HostService(Endpoint("node1"), fresh, host.total, tmp_path / "host.sqlite")
    try:
        await again.start()  # the agent restarted: still down, still shown crashed, not held for the directory
        assert again.crashed == {"ve:a"} and "ve:a" not in again.held
        assert await state(again, "ve:a") == "crashed"
        assert (await ask(again, HOST_VM_START, VmName("ve:a"))).state == "running"  # `ve start`
        assert again.crashed == set() and await state(again, "ve:a") == "running"
    finally:
        again.close()
        await fresh.close()


# -- the actor, on the host ---------------------------------------------------------------------------------


class FakeWatch:
    """What `agents.hypervisor.events.GuestEvents.open` gives: the test keeps `deliver` to post events."""

    def __init__(self) -> None:
        self.deliver: Deliver | None = None
        self.opened = 0
        self.closed = 0
        self.refuse = 0  # opens to refuse before one succeeds

    async def open(self, deliver: Deliver) -> FakeWatch:
        if self.refuse:
            self.refuse -= 1
            raise HypervisorError("cannot watch qemu+tcp://x/system: connection refused")
        self.deliver, self.opened = deliver, self.opened + 1
        return self

    def close(self) -> None:
        self.closed += 1


CLOCK_RATE = 20.0
"""Not autojump: the host's SQLite and libvirt calls run in threads, and an autojump clock races ahead while
they do (each poll of a waiting task jumps it), which would scatter a VM's restarts over its whole window."""


@dataclass
class Rig:
    """A host with VM ve:a running, and its `GuestRestarts` actor running on a fake watch, on a clock that runs
    CLOCK_RATE times faster than the real one (the tests that use it ask for `mock_clock` too: pytest-trio
    takes the clock from a test's own arguments only)."""

    host: HostService
    actor: GuestRestarts
    watch: FakeWatch

    def post(self, event: Stopped | WatchLost) -> None:
        """Deliver `event` as libvirt's thread would (through the actor's `deliver`)."""
        assert self.watch.deliver is not None
        self.watch.deliver(event)


@pytest.fixture
async def rig(host: HostService, mock_clock: trio.testing.MockClock) -> AsyncIterator[Rig]:
    mock_clock.rate = CLOCK_RATE
    watch = FakeWatch()
    actor = GuestRestarts(host, watch.open)
    await define(host, "ve:a")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(actor.run)
        await wait(lambda: watch.opened == 1)
        yield Rig(host, actor, watch)
        nursery.cancel_scope.cancel()
    assert watch.closed == watch.opened  # a stopped actor leaves no watch open


async def wait(predicate: object, seconds: float = 300.0) -> None:
    with trio.fail_after(seconds):
        while not predicate():  # type: ignore[operator]
            await trio.sleep(0.05)


async def test_a_crash_event_restarts_the_guest_after_its_backoff_and_a_stop_on_purpose_does_not(
        rig: Rig, monkeypatch: pytest.MonkeyPatch, mock_clock: trio.testing.MockClock) -> None:
    host = rig.host
    await define(host, "ve:b")
    await crash(host, monkeypatch, "ve:a")
    await ask(host, HOST_VM_DESTROY, VmName("ve:b"))
    crashed_at = trio.current_time()
    rig.post(Stopped("ve:b", "destroyed"))
    rig.post(Stopped("ve:a", "failed"))
    await wait(lambda: host.guest_restarts == 1)
    assert trio.current_time() - crashed_at >= 1.0  # FIRST_BACKOFF
    assert await state(host, "ve:a") == "running" and await state(host, "ve:b") == "shutoff"
    assert rig.actor.budget.restarts("ve:a", trio.current_time()) == 1


async def test_once_the_budget_is_spent_the_vm_stays_down_marked_crashed(
        rig: Rig, monkeypatch: pytest.MonkeyPatch, mock_clock: trio.testing.MockClock) -> None:
    host = rig.host
    for count in (1, 2, 3):
        await crash(host, monkeypatch, "ve:a")
        rig.post(Stopped("ve:a", "crashed"))
        await wait(lambda: host.guest_restarts == count)  # noqa: B023 - awaited at once
    await crash(host, monkeypatch, "ve:a")
    rig.post(Stopped("ve:a", "failed"))
    await wait(lambda: host.crashed == {"ve:a"})
    assert await state(host, "ve:a") == "crashed" and host.guest_restarts == 3
    await trio.sleep(30)
    assert await state(host, "ve:a") == "crashed"


async def test_crashes_missed_while_the_watch_was_lost_are_found_when_it_reopens(
        rig: Rig, monkeypatch: pytest.MonkeyPatch, mock_clock: trio.testing.MockClock) -> None:
    host, watch = rig.host, rig.watch
    await crash(host, monkeypatch, "ve:a")  # its event is lost with the connection
    watch.refuse = 2  # the daemon restarts: two opens fail before one works
    rig.post(WatchLost(1))
    await wait(lambda: watch.opened == 2)
    await wait(lambda: host.guest_restarts == 1)
    assert watch.closed == 1 and await state(host, "ve:a") == "running"
    assert trio.current_time() >= REOPEN_PAUSE[0] * 3  # it waited 1 s, then 2 s, between the opens
