"""Per-VM locks in the host service: one VM's operations run one at a time, while a long operation on a VM
(a graceful stop) delays neither `host.info`, nor reservations, nor operations on other VMs; requests wait
for the node's recovery at start, and an unexpected failure closes the gate until the service rebuilt its
state. Requests go through the routes the transport serves, as a peer's would. No fixed sleeps: the tests
wait on events, with deadlines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from agents.host.capacity import Resources
from agents.host.locks import Gate, VmLocks
from agents.host.service import LISTING_PATIENCE, HostService
from agents.hypervisor.actor import DomainInfo, Hypervisor, write_node_xml
from agents.messages import (
    HOST_CONFIRM,
    HOST_EXPORT,
    HOST_INFO,
    HOST_RESERVE,
    HOST_SNAPSHOT,
    HOST_STANDBYS,
    HOST_VM_INFO,
    HOST_VM_START,
    HOST_VM_STOP,
    HOST_VM_SUSPEND,
    HOST_VM_UNDEFINE,
    Confirm,
    Export,
    Reserve,
    Snapshot,
    VmName,
    VmStop,
)
from overlay.messages import NoArgs
from overlay.wire.rpc import Endpoint, Method
from tests.unit.conftest import ask

NEED = {"vcpus": 1, "memory_mb": 512, "disk_gb": 1}
DEADLINE = 10.0


async def define(host: HostService, name: str) -> None:
    token = (await ask(host, HOST_RESERVE, Reserve(name, **NEED))).token
    await ask(host, HOST_CONFIRM, Confirm(token))


class SlowStops:
    """Replaces the hypervisor's graceful shutdown: each stop waits until the test lets it finish."""

    def __init__(self, host: HostService, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started: dict[str, trio.Event] = {}
        self.finish: dict[str, trio.Event] = {}
        self._shutdown = host.hypervisor.shutdown
        monkeypatch.setattr(host.hypervisor, "shutdown", self.shutdown)

    def expect(self, name: str) -> None:
        self.started[name], self.finish[name] = trio.Event(), trio.Event()

    async def shutdown(self, name: str, timeout: float = 30.0) -> DomainInfo:
        self.started[name].set()
        await self.finish[name].wait()
        return await self._shutdown(name, timeout)


async def test_a_long_stop_of_one_vm_delays_neither_info_nor_reservations_nor_other_vms(
        host: HostService, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ve:a", "ve:b"):
        await define(host, name)
    stops = SlowStops(host, monkeypatch)
    stops.expect("ve:a")
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, host, HOST_VM_STOP, VmStop("ve:a"))
            await stops.started["ve:a"].wait()  # ve:a's stop is under way, and holds ve:a's lock
            info = await ask(host, HOST_INFO, NoArgs())
            assert info.busy == {"ve:a": 1}
            assert {d.name: d.state for d in info.domains} == {"ve:a": "running", "ve:b": "running"}
            token = (await ask(host, HOST_RESERVE, Reserve("ve:c", **NEED))).token
            assert (await ask(host, HOST_CONFIRM, Confirm(token))).state == "running"
            assert (await ask(host, HOST_VM_SUSPEND, VmName("ve:b"))).state == "paused"
            assert (await ask(host, HOST_SNAPSHOT, Snapshot("ve:b", "t1"))).state == "paused"
            assert (await ask(host, HOST_EXPORT, Export("ve:b"))).state == "paused"
            assert await ask(host, HOST_STANDBYS, NoArgs()) == []
            assert not stops.finish["ve:a"].is_set()  # all of that while ve:a was still stopping
            stops.finish["ve:a"].set()
    assert (await ask(host, HOST_VM_INFO, VmName("ve:a"))).state == "shutoff"
    assert host.vm_locks.in_use() == {}  # locks are dropped once unused


async def test_operations_on_one_vm_run_one_at_a_time_in_arrival_order(
        host: HostService, monkeypatch: pytest.MonkeyPatch) -> None:
    await define(host, "ve:a")
    stops = SlowStops(host, monkeypatch)
    stops.expect("ve:a")
    done: list[str] = []

    async def act(method: Method, request: Any) -> None:
        await ask(host, method, request)
        done.append(method.name)

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(act, HOST_VM_STOP, VmStop("ve:a"))
            await stops.started["ve:a"].wait()
            nursery.start_soon(act, HOST_VM_START, VmName("ve:a"))
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(act, HOST_VM_SUSPEND, VmName("ve:a"))
            await trio.testing.wait_all_tasks_blocked()
            assert done == [] and host.vm_locks.in_use() == {"ve:a": 3}  # both wait behind the stop
            stops.finish["ve:a"].set()
    assert done == ["host.vm.stop", "host.vm.start", "host.vm.suspend"]
    assert (await ask(host, HOST_VM_INFO, VmName("ve:a"))).state == "paused"


async def test_a_confirm_waits_for_the_operation_on_its_vm_and_an_undefine_for_the_confirm(
        host: HostService, monkeypatch: pytest.MonkeyPatch) -> None:
    """The confirm takes the lock of the VM its reservation names: an undefine that arrives meanwhile
    finds the VM defined (it runs after), never half-made."""
    token = (await ask(host, HOST_RESERVE, Reserve("ve:n", **NEED))).token
    entered, proceed = trio.Event(), trio.Event()
    define_domain = host.hypervisor.define

    async def slow_define(xml: str) -> DomainInfo:
        entered.set()
        await proceed.wait()
        return await define_domain(xml)

    monkeypatch.setattr(host.hypervisor, "define", slow_define)
    results: dict[str, Any] = {}

    async def confirm() -> None:
        results["confirm"] = await ask(host, HOST_CONFIRM, Confirm(token))

    async def undefine() -> None:
        results["undefine"] = await ask(host, HOST_VM_UNDEFINE, VmName("ve:n"))

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(confirm)
            await entered.wait()
            nursery.start_soon(undefine)
            await trio.testing.wait_all_tasks_blocked()
            assert results == {}
            proceed.set()
    assert results["confirm"].state == "running" and results["undefine"] is None
    assert host.ledger.allocated == {} and await host.hypervisor.list() == []


async def test_requests_wait_for_recovery_and_a_crash_closes_the_gate_until_the_state_is_rebuilt(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hv = Hypervisor.open(write_node_xml(tmp_path / "node.xml", vcpus=8, memory_mb=8192))
    host = HostService(Endpoint("node1"), hv, Resources(8, 8192, 100), tmp_path / "host.sqlite")
    try:
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery:
                answers: list[Any] = []

                async def info() -> None:
                    answers.append(await ask(host, HOST_INFO, NoArgs()))

                nursery.start_soon(info)
                await trio.testing.wait_all_tasks_blocked()
                assert answers == []  # not started: the gate is closed
                await host.start()
        assert answers[0].free.vcpus == 8
        await define(host, "ve:a")

        async def broken(name: str) -> DomainInfo:
            raise RuntimeError("a bug")

        monkeypatch.setattr(host.hypervisor, "suspend", broken)
        with pytest.raises(RuntimeError, match="a bug"):
            await ask(host, HOST_VM_SUSPEND, VmName("ve:a"))
        assert not host.gate.is_open  # the supervisor restarts the service: `run` calls `start` again
        with pytest.raises(RuntimeError, match="a bug"):
            await host.handle(host._receive.receive_nowait()[0])
        host.ledger.allocated.clear()  # whatever the crash left in memory
        await host.start()
        assert host.gate.is_open and host.ledger.allocated == {"ve:a": Resources(1, 512, 1)}
    finally:
        host.close()
        await hv.close()


async def test_vm_locks_are_made_on_demand_and_dropped_when_unused() -> None:
    locks = VmLocks()
    order: list[str] = []

    async def hold(name: str, tag: str, release: trio.Event) -> None:
        async with locks.hold(name):
            order.append(tag)
            await release.wait()

    first, second, other = trio.Event(), trio.Event(), trio.Event()
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold, "a", "a1", first)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(hold, "a", "a2", second)
            nursery.start_soon(hold, "b", "b1", other)
            await trio.testing.wait_all_tasks_blocked()
            assert order == ["a1", "b1"] and locks.in_use() == {"a": 2, "b": 1}
            other.set()
            first.set()
            await trio.testing.wait_all_tasks_blocked()
            assert order == ["a1", "b1", "a2"] and locks.in_use() == {"a": 1}
            second.set()
    assert locks.in_use() == {}
    async with locks.hold("c"):
        with trio.CancelScope() as scope:  # a waiter cancelled while it waits gives its place back
            scope.cancel()
            async with locks.hold("c"):
                raise AssertionError("held twice")
        assert scope.cancelled_caught and locks.in_use() == {"c": 1}
    assert locks.in_use() == {}


async def test_the_gate_drains_what_is_inside_before_a_rebuild() -> None:
    gate = Gate()
    inside, leave = trio.Event(), trio.Event()
    events: list[str] = []

    async def operation() -> None:
        async with gate.enter():
            inside.set()
            await leave.wait()
        events.append("left")

    async def rebuild() -> None:
        await gate.drain()
        events.append("drained")
        gate.open()

    gate.open()
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(operation)
            await inside.wait()
            nursery.start_soon(rebuild)
            await trio.testing.wait_all_tasks_blocked()
            assert events == [] and not gate.is_open
            leave.set()
    assert events == ["left", "drained"] and gate.is_open


async def test_info_answers_the_last_listing_while_libvirt_is_slow_to_list(
        host: HostService, monkeypatch: pytest.MonkeyPatch, mock_clock: trio.testing.MockClock) -> None:
    """libvirtd holds listings while live migrations run: `host.info` then answers at once with the room
    (the ledger's) and the last complete listing, saying how old it is. The clock moves only when the test
    says, so a loaded machine cannot let LISTING_PATIENCE pass early."""
    await define(host, "ve:a")
    first = await ask(host, HOST_INFO, NoArgs())
    assert [d.name for d in first.domains] == ["ve:a"] and first.listed_ago == 0
    answer = trio.Event()
    list_now = host.hypervisor.list

    async def slow_list() -> list[DomainInfo]:
        await answer.wait()
        return await list_now()

    monkeypatch.setattr(host.hypervisor, "list", slow_list)
    with trio.fail_after(DEADLINE):
        await define(host, "ve:b")
        async with trio.open_nursery() as nursery:
            answers: list[Any] = []

            async def info() -> None:
                answers.append(await ask(host, HOST_INFO, NoArgs()))

            nursery.start_soon(info)  # starts a listing, which libvirt holds
            await trio.testing.wait_all_tasks_blocked()
            assert answers == []
            beside = await ask(host, HOST_INFO, NoArgs())  # one listing at a time: this one answers at once
            assert answers == [] and [d.name for d in beside.domains] == ["ve:a"]
            mock_clock.jump(LISTING_PATIENCE)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()  # a first call still waiting fails below instead of hanging
        assert len(answers) == 1
        stale = answers[0]  # the first answered too, after LISTING_PATIENCE
    assert [d.name for d in stale.domains] == ["ve:a"] and stale.listed_ago == LISTING_PATIENCE
    assert stale.free == Resources(8 - 2, 8192 - 1024, 100 - 2)  # the room is never stale
    answer.set()
    fresh = await ask(host, HOST_INFO, NoArgs())
    assert sorted(d.name for d in fresh.domains) == ["ve:a", "ve:b"] and fresh.listed_ago == 0
