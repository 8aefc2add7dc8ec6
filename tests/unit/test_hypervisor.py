"""Tests for agents.hypervisor.actor: the libvirt actor on the embedded test:/// driver, driven from trio."""

from __future__ import annotations

import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TypeVar

import pykka
import pytest
import trio

from agents.hypervisor.actor import (
    DomainInfo,
    HostInfo,
    Hypervisor,
    HypervisorActor,
    HypervisorError,
    domain_xml,
    write_node_xml,
)
from dvms.monitor import cpu_demand

T = TypeVar("T")
UUID1 = "11111111-2222-3333-4444-555555555555"


def hypervisor_actors() -> list[pykka.ActorRef]:
    """The hypervisor actors running (others, such as libvirt's event loop of an embedded driver, live on)."""
    return pykka.ActorRegistry.get_by_class(HypervisorActor)


@pytest.fixture(autouse=True)
def no_leftover_actors() -> object:
    assert hypervisor_actors() == []
    yield
    leftovers = hypervisor_actors()
    for ref in leftovers:
        ref.stop()
    assert leftovers == [], "a test left a hypervisor actor running"


@pytest.fixture
async def hv(tmp_path: Path) -> AsyncIterator[Hypervisor]:
    hypervisor = Hypervisor.open(write_node_xml(tmp_path / "node.xml", vcpus=8, memory_mb=16384))
    try:
        yield hypervisor
    finally:
        await hypervisor.close()


async def define_vm(hv: Hypervisor, name: str = "vm1", vcpus: int = 2, memory_mb: int = 512) -> DomainInfo:
    return await hv.define(domain_xml(name, vcpus, memory_mb, uuid=UUID1 if name == "vm1" else None))


# -- XML helpers -----------------------------------------------------------------------------------


def test_write_node_xml(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "node.xml"
    uri = write_node_xml(path, vcpus=4, memory_mb=2048)
    assert uri == "test://" + str(path.absolute())
    root = ET.parse(path).getroot()
    assert root.findtext("cpu/total") == "4" and root.findtext("cpu/active") == "4"
    assert root.findtext("memory") == str(2048 * 1024)
    with pytest.raises(ValueError):
        write_node_xml(path, vcpus=0, memory_mb=2048)


def test_domain_xml_escapes_and_is_stable() -> None:
    name = 'a&b <c> "d"'
    xml = domain_xml(name, 2, 512)
    root = ET.fromstring(xml)
    assert root.get("type") == "test"
    assert root.findtext("name") == name
    assert root.find("memory").get("unit") == "MiB" and root.findtext("memory") == "512"
    assert root.findtext("vcpu") == "2"
    assert domain_xml(name, 2, 512) == xml, "without a uuid, the same name gives the same uuid"
    assert root.findtext("uuid") != ET.fromstring(domain_xml("other", 2, 512)).findtext("uuid")
    assert ET.fromstring(domain_xml("x", 1, 1, uuid=UUID1, domain_type="kvm")).get("type") == "kvm"
    assert ET.fromstring(domain_xml("x", 1, 1, uuid=UUID1)).findtext("uuid") == UUID1
    with pytest.raises(ValueError):
        domain_xml("x", 1, 1, uuid="not-a-uuid")


# -- host ------------------------------------------------------------------------------------------


async def test_host_info_reflects_node_xml(hv: Hypervisor) -> None:
    assert await hv.host_info() == HostInfo(model="i686", vcpus=8, memory_mb=16384)
    assert await hv.list() == []


async def test_path_with_odd_characters(tmp_path: Path) -> None:
    uri = write_node_xml(tmp_path / "a dir:with+odd#chars é" / "node.xml", vcpus=3, memory_mb=1024)
    hv = Hypervisor.open(uri)
    try:
        assert await hv.host_info() == HostInfo("i686", 3, 1024)
    finally:
        await hv.close()


async def test_two_hypervisors_are_independent_hosts(tmp_path: Path) -> None:
    a = Hypervisor.open(write_node_xml(tmp_path / "a" / "node.xml", vcpus=2, memory_mb=4096))
    try:
        b = Hypervisor.open(write_node_xml(tmp_path / "b" / "node.xml", vcpus=16, memory_mb=65536))
        try:
            assert (await a.host_info()).vcpus == 2 and (await a.host_info()).memory_mb == 4096
            assert (await b.host_info()).vcpus == 16 and (await b.host_info()).memory_mb == 65536
            await define_vm(a, "only-on-a")
            await a.start("only-on-a")
            assert [d.name for d in await a.list()] == ["only-on-a"]
            assert await b.list() == []
            with pytest.raises(HypervisorError):
                await b.info("only-on-a")
        finally:
            await b.close()
    finally:
        await a.close()


# -- lifecycle -------------------------------------------------------------------------------------


async def test_full_lifecycle(hv: Hypervisor) -> None:
    info = await define_vm(hv)
    assert info == DomainInfo(name="vm1", uuid=UUID1, state="shutoff", vcpus=2, memory_mb=512)
    assert (await hv.start("vm1")).state == "running"
    assert (await hv.info("vm1")).state == "running"
    assert (await hv.suspend("vm1")).state == "paused"
    assert (await hv.resume("vm1")).state == "running"
    assert (await hv.shutdown("vm1", timeout=5)).state == "shutoff"
    assert (await hv.start("vm1")).state == "running"
    assert (await hv.destroy("vm1")).state == "shutoff"
    assert await hv.list() == [info]
    assert await hv.undefine("vm1") is None
    assert await hv.list() == []


async def test_operations_are_idempotent(hv: Hypervisor) -> None:
    first = await define_vm(hv)
    assert await define_vm(hv) == first
    assert (await hv.define(domain_xml("vm1", 4, 1024, uuid=UUID1))).vcpus == 4, "redefine updates"
    assert (await hv.start("vm1")).state == "running"
    assert (await hv.start("vm1")).state == "running"
    assert (await hv.suspend("vm1")).state == "paused"
    assert (await hv.suspend("vm1")).state == "paused"
    assert (await hv.start("vm1")).state == "paused", "start leaves an active domain as it is"
    assert (await hv.resume("vm1")).state == "running"
    assert (await hv.resume("vm1")).state == "running"
    assert (await hv.shutdown("vm1")).state == "shutoff"
    assert (await hv.shutdown("vm1")).state == "shutoff"
    assert (await hv.destroy("vm1")).state == "shutoff"
    assert (await hv.destroy("vm1")).state == "shutoff"
    await hv.undefine("vm1")
    await hv.undefine("vm1")
    assert await hv.list() == []


async def test_settle_reaches_each_state_from_each_state(hv: Hypervisor) -> None:
    await define_vm(hv)
    for start in ("shutoff", "running", "paused"):
        for want in ("running", "paused", "shutoff"):
            await hv.settle("vm1", start)
            assert (await hv.info("vm1")).state == start
            assert (await hv.settle("vm1", want)).state == want, (start, want)
            assert (await hv.settle("vm1", want)).state == want, "settling again changes nothing"
    with pytest.raises(HypervisorError, match="cannot bring 'vm1' to state 'crashed'"):
        await hv.settle("vm1", "crashed")
    with pytest.raises(HypervisorError, match="no domain named 'ghost'"):
        await hv.settle("ghost", "running")


async def test_xml_of_a_domain_defines_it_on_another_host(hv: Hypervisor, tmp_path: Path) -> None:
    """Relocation carries the domain's definition: same name, uuid and size on the other host."""
    await define_vm(hv, vcpus=3, memory_mb=768)
    await hv.start("vm1")
    xml = await hv.xml("vm1")
    assert ET.fromstring(xml).findtext("uuid") == UUID1
    other = Hypervisor.open(write_node_xml(tmp_path / "other" / "node.xml", vcpus=4, memory_mb=4096))
    try:
        assert await other.define(xml) == DomainInfo("vm1", UUID1, "shutoff", 3, 768)
        assert (await other.settle("vm1", "paused")).state == "paused"
    finally:
        await other.close()
    with pytest.raises(HypervisorError, match="no domain named 'ghost'"):
        await hv.xml("ghost")


async def test_define_without_uuid_twice_keeps_the_domain(hv: Hypervisor) -> None:
    xml = '<domain type="test"><name>bare</name><memory unit="MiB">256</memory><vcpu>1</vcpu>' \
          "<os><type>hvm</type></os></domain>"
    first = await hv.define(xml)
    again = await hv.define(xml)
    assert again.uuid == first.uuid
    assert [d.name for d in await hv.list()] == ["bare"]


async def test_redefine_with_another_uuid_is_an_error(hv: Hypervisor) -> None:
    await define_vm(hv)
    with pytest.raises(HypervisorError, match="already exists"):
        await hv.define(domain_xml("vm1", 2, 512, uuid="99999999-2222-3333-4444-555555555555"))


async def test_shutdown_of_a_paused_domain(hv: Hypervisor) -> None:
    await define_vm(hv)
    await hv.start("vm1")
    await hv.suspend("vm1")
    assert (await hv.shutdown("vm1", timeout=5)).state == "shutoff"


async def test_undefine_destroys_a_running_domain(hv: Hypervisor) -> None:
    await define_vm(hv)
    await hv.start("vm1")
    await hv.undefine("vm1")
    assert await hv.list() == []
    with pytest.raises(HypervisorError, match="no domain named 'vm1'"):
        await hv.info("vm1")


class IgnoresAcpi(HypervisorActor):
    """A guest that never reacts to the ACPI power button."""

    def request_shutdown(self, name: str) -> tuple[DomainInfo, bool]:
        return self.info(name), True


class StubbornHypervisor(Hypervisor):
    actor_class = IgnoresAcpi


async def test_shutdown_forces_off_after_timeout(tmp_path: Path) -> None:
    hv = StubbornHypervisor.open(write_node_xml(tmp_path / "node.xml", 4, 4096))
    try:
        await define_vm(hv)
        await hv.start("vm1")
        with trio.fail_after(5):
            start = trio.current_time()
            info = await hv.shutdown("vm1", timeout=0.3)
            elapsed = trio.current_time() - start
        assert info.state == "shutoff"
        assert 0.3 <= elapsed < 2
    finally:
        await hv.close()


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("operation", ["info", "start", "shutdown", "destroy", "suspend", "resume"])
async def test_unknown_domain_is_a_clear_error(hv: Hypervisor, operation: str) -> None:
    with pytest.raises(HypervisorError) as caught:
        await getattr(hv, operation)("ghost")
    assert str(caught.value) == "no domain named 'ghost'"
    await hv.undefine("ghost")  # idempotent: nothing to do


async def test_suspend_or_resume_a_stopped_domain_is_an_error(hv: Hypervisor) -> None:
    await define_vm(hv)
    with pytest.raises(HypervisorError, match="cannot suspend 'vm1': it is shutoff"):
        await hv.suspend("vm1")
    with pytest.raises(HypervisorError, match="cannot resume 'vm1': it is shutoff"):
        await hv.resume("vm1")


async def test_libvirt_errors_are_one_line_hypervisor_errors(hv: Hypervisor) -> None:
    with pytest.raises(HypervisorError) as caught:
        await hv.define("<domain type='test'><name>broken")
    assert "\n" not in str(caught.value) and str(caught.value)
    assert caught.value.__cause__ is not None


@pytest.mark.parametrize("uri", ["test:///nonexistent/dir/node.xml", "nosuchdriver:///x", "not a uri"])
async def test_open_bad_uri_raises_and_leaves_no_actor(uri: str) -> None:
    with pytest.raises(HypervisorError, match="cannot open") as caught:
        Hypervisor.open(uri)
    assert "\n" not in str(caught.value)
    assert hypervisor_actors() == []


async def test_open_a_file_that_is_not_node_xml(tmp_path: Path) -> None:
    junk = tmp_path / "junk.xml"
    junk.write_text("this is not xml\nat all\n")
    with pytest.raises(HypervisorError, match="cannot open") as caught:
        Hypervisor.open(f"test://{junk}")
    assert "\n" not in str(caught.value)
    assert hypervisor_actors() == []


async def test_close_twice_and_use_after_close(tmp_path: Path) -> None:
    hv = Hypervisor.open(write_node_xml(tmp_path / "node.xml", 2, 2048))
    assert len(hypervisor_actors()) == 1
    await hv.close()
    await hv.close()
    assert hypervisor_actors() == []
    with pytest.raises(HypervisorError, match="closed"):
        await hv.list()


async def test_close_when_cancelled_still_stops_the_actor(tmp_path: Path) -> None:
    hv = Hypervisor.open(write_node_xml(tmp_path / "node.xml", 2, 2048))
    with trio.CancelScope() as scope:
        scope.cancel()
        await hv.close()
    with trio.fail_after(5):
        while hypervisor_actors():
            await trio.sleep(0.01)


# -- concurrency -----------------------------------------------------------------------------------


class WatchedActor(HypervisorActor):
    """Records which thread runs each request and whether two ever overlap; `list` is slow."""

    instances: list[WatchedActor] = []

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        WatchedActor.instances.append(self)
        self.threads: set[int] = set()
        self.busy = 0
        self.overlaps = 0

    def _watched(self, request: Callable[[], T]) -> T:
        self.threads.add(threading.get_ident())
        self.busy += 1
        self.overlaps += self.busy > 1
        try:
            return request()
        finally:
            self.busy -= 1

    def define(self, xml: str) -> DomainInfo:
        return self._watched(lambda: super(WatchedActor, self).define(xml))

    def start_domain(self, name: str) -> DomainInfo:
        return self._watched(lambda: super(WatchedActor, self).start_domain(name))

    def suspend(self, name: str) -> DomainInfo:
        return self._watched(lambda: super(WatchedActor, self).suspend(name))

    def list(self) -> list[DomainInfo]:
        def slow() -> list[DomainInfo]:
            time.sleep(0.5)
            return super(WatchedActor, self).list()
        return self._watched(slow)


class WatchedHypervisor(Hypervisor):
    actor_class = WatchedActor


async def test_concurrent_calls_are_serialized_and_loop_stays_responsive(tmp_path: Path) -> None:
    hv = WatchedHypervisor.open(write_node_xml(tmp_path / "node.xml", 8, 16384))
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await trio.sleep(0.01)
            ticks += 1

    async def lifecycle(i: int) -> None:
        name = f"vm{i:02d}"
        await hv.define(domain_xml(name, 1, 128))
        assert (await hv.start(name)).state == "running"
        assert (await hv.suspend(name)).state == "paused"

    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ticker)
                async with trio.open_nursery() as workers:
                    workers.start_soon(hv.list)  # blocks the actor for 0.5 s
                    for i in range(50):
                        workers.start_soon(lifecycle, i)
                nursery.cancel_scope.cancel()
        assert ticks >= 20, f"the trio loop stalled: only {ticks} ticks in more than 0.5 s"
        domains = await hv.list()
        assert [d.name for d in domains] == [f"vm{i:02d}" for i in range(50)]
        assert {d.state for d in domains} == {"paused"}
    finally:
        await hv.close()
    actor = WatchedActor.instances[-1]  # stopped now: its fields are safe to read from here
    assert actor.overlaps == 0
    assert len(actor.threads) == 1 and threading.get_ident() not in actor.threads


async def test_cancelled_caller_does_not_break_the_hypervisor(tmp_path: Path) -> None:
    hv = WatchedHypervisor.open(write_node_xml(tmp_path / "node.xml", 2, 2048))
    try:
        with trio.move_on_after(0.05) as scope:
            await hv.list()  # slow: abandoned by the timeout
        assert scope.cancelled_caught
        await define_vm(hv)
        assert [d.name for d in await hv.list()] == ["vm1"]
    finally:
        await hv.close()


class BlockingActor(HypervisorActor):
    """`list` waits, in the actor's thread, until the test releases it."""

    entered = threading.Event()
    release = threading.Event()

    def list(self) -> list[DomainInfo]:
        BlockingActor.entered.set()
        BlockingActor.release.wait(10)
        return super().list()


class BlockingHypervisor(Hypervisor):
    actor_class = BlockingActor


async def test_a_long_call_holds_one_connection_of_the_pool_only(tmp_path: Path) -> None:
    """With several connections (a node's own libvirtd), a long request leaves the other actors to serve;
    a cancelled caller's actor returns to the pool only once its request is over."""
    BlockingActor.entered.clear()
    BlockingActor.release.clear()
    hv = BlockingHypervisor.open(write_node_xml(tmp_path / "node.xml", 4, 4096), connections=2)
    try:
        assert hv.connections == 2 and len(hypervisor_actors()) == 2
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hv.list)
            await trio.to_thread.run_sync(BlockingActor.entered.wait, 5)
            with trio.fail_after(5):
                assert (await hv.host_info()).vcpus == 4  # the other connection answers meanwhile
                assert (await hv.host_info()).vcpus == 4
            BlockingActor.release.set()
        BlockingActor.entered.clear()
        BlockingActor.release.clear()
        with trio.move_on_after(0.05):
            await hv.list()  # its caller leaves; the actor stays busy until released
        await trio.to_thread.run_sync(BlockingActor.entered.wait, 5)
        with trio.fail_after(5):
            assert (await hv.host_info()).vcpus == 4
        BlockingActor.release.set()
        with trio.fail_after(5):
            await hv.list()
    finally:
        BlockingActor.release.set()
        await hv.close()


class BlockingMigrations(HypervisorActor):
    """`migrate` waits, in the actor's thread, until the test releases it."""

    started = threading.Semaphore(0)
    release = threading.Event()

    def migrate(self, name: str, uri: str, flags: int, params: dict) -> None:
        BlockingMigrations.started.release()
        BlockingMigrations.release.wait(10)


class MigratingHypervisor(Hypervisor):
    actor_class = BlockingMigrations


async def test_long_calls_leave_one_connection_to_the_short_ones(tmp_path: Path) -> None:
    """Four migrations on a pool of four: three run, the fourth waits, and `list` answers meanwhile."""
    BlockingMigrations.release.clear()
    hv = MigratingHypervisor.open(write_node_xml(tmp_path / "node.xml", 4, 4096), connections=4)
    try:
        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(hv.migrate, f"vm{i}", "qemu+tcp://x/system", 0, {})
            for _ in range(3):
                assert await trio.to_thread.run_sync(BlockingMigrations.started.acquire, True, 5)
            with trio.fail_after(5):
                assert await hv.list() == []  # the fourth connection is free for it
            assert not BlockingMigrations.started.acquire(timeout=0.2)  # the fourth migration waits its turn
            BlockingMigrations.release.set()
    finally:
        BlockingMigrations.release.set()
        await hv.close()


# -- what the layers above read: stats and metadata ------------------------------------------------


async def test_stats_give_cpu_time_of_active_domains_that_dvms_turns_into_demand(hv: Hypervisor) -> None:
    await define_vm(hv, "on", vcpus=2)
    await define_vm(hv, "off")
    await hv.start("on")
    first = await hv.stats()
    await trio.sleep(0.2)
    second = await hv.stats()
    assert set(first) == set(second) == {"on"}  # an inactive domain uses nothing
    a, b = first["on"], second["on"]
    assert b.cpu_time_ns > a.cpu_time_ns and b.sampled > a.sampled and a.balloon == {}
    # the test driver's cpu time is its wall clock: one busy vCPU
    assert 80 <= cpu_demand(a.cpu_time_ns, b.cpu_time_ns, a.sampled, b.sampled, 2) <= 120


async def test_metadata_is_part_of_the_definition_and_can_be_removed(hv: Hypervisor) -> None:
    await define_vm(hv)
    uri = "urn:discovery:test"
    assert await hv.metadata("vm1", uri) is None
    definition = await hv.set_metadata("vm1", uri, "t", '<pin cpu="7"/>')
    assert definition == await hv.xml("vm1") and "urn:discovery:test" in definition  # what a move carries
    assert ET.fromstring(await hv.metadata("vm1", uri)).get("cpu") == "7"
    await hv.start("vm1")
    await hv.set_metadata("vm1", uri, "t", None)
    assert await hv.metadata("vm1", uri) is None
    with pytest.raises(HypervisorError, match="no domain"):
        await hv.metadata("nope", uri)
