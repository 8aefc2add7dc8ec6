"""HostService on the embedded test:/// driver, called as a peer would (typed requests and answers): standby
copies (reserved, kept, refreshed, promoted, dropped, persisted), deleting a snapshot, the timeout of a
graceful stop, the VMs held off at start until the directory places them, and the metadata the layers above
set on a VM."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import trio

from agents.host.capacity import Resources
from agents.host.service import HostService
from agents.host.standby import standby_key
from agents.hypervisor.actor import Hypervisor, domain_xml, write_node_xml
from agents.hypervisor.guests import TestDomains
from agents.messages import (
    HOST_CONFIRM,
    HOST_EXPORT,
    HOST_INFO,
    HOST_PROMOTE,
    HOST_RESERVE,
    HOST_RESERVE_STANDBY,
    HOST_RESTORE,
    HOST_SNAPSHOT,
    HOST_SNAPSHOT_DELETE,
    HOST_STANDBY,
    HOST_STANDBYS,
    HOST_UNSTANDBY,
    HOST_VM_INFO,
    HOST_VM_RELEASE,
    HOST_VM_START,
    HOST_VM_STOP,
    HOST_VM_SUSPEND,
    HOST_VM_UNDEFINE,
    Confirm,
    Export,
    Exported,
    Promote,
    Reserve,
    Snapshot,
    SnapshotDeleted,
    SnapshotTag,
    Standby,
    StandbyKept,
    VmName,
    VmStop,
)
from overlay.messages import NoArgs
from overlay.wire import codec
from overlay.wire.rpc import Conflict, Endpoint, NotFound, RequestError
from tests.unit.conftest import ask, send

NEED = {"vcpus": 2, "memory_mb": 1024, "disk_gb": 1}


async def define(host: HostService, name: str) -> None:
    token = (await ask(host, HOST_RESERVE, Reserve(name, **NEED))).token
    await ask(host, HOST_CONFIRM, Confirm(token))


async def exported(host: HostService, name: str) -> Exported:
    """What `host.export` gives for a VM defined here (its XML and snapshots), then the VM undefined: a copy
    of a VM that runs on another node."""
    await define(host, name)
    await ask(host, HOST_SNAPSHOT, Snapshot(name, "t1"))
    carried = await ask(host, HOST_EXPORT, Export(name))
    await ask(host, HOST_VM_UNDEFINE, VmName(name))
    return carried


def standby(name: str, carried: Exported, token: str | None = None, taken: object = 1.0, **bad: object) -> Standby:
    """A `host.standby` request keeping what `host.export` gave (some field replaced by a `bad` one)."""
    return Standby(**{"name": name, "token": token, "xml": carried.xml, "taken": taken,
                      "snapshots": carried.snapshots, **bad})


async def test_a_standby_holds_room_is_no_domain_and_is_promoted_once(host: HostService, tmp_path: Path) -> None:
    carried = await exported(host, "ve:a")
    token = (await ask(host, HOST_RESERVE_STANDBY, Reserve("ve:a", **NEED))).token
    kept = await ask(host, HOST_STANDBY, standby("ve:a", carried, token, 5.0))
    assert kept == StandbyKept("ve:a", 5.0, 1)
    assert host.ledger.allocated == {standby_key("ve:a"): Resources(2, 1024, 1)}
    assert (await ask(host, HOST_INFO, NoArgs())).free == Resources(6, 7168, 99)
    assert (await ask(host, HOST_INFO, NoArgs())).domains == []
    with pytest.raises(NotFound):  # host.vm.* (and so the VE service's `_holds`) does not see it
        await ask(host, HOST_VM_INFO, VmName("ve:a"))
    again = await ask(host, HOST_STANDBY, standby("ve:a", carried, token, 6.0))  # retried
    assert again.taken == 6.0 and len(host.ledger.allocated) == 1
    assert [s.name for s in await ask(host, HOST_STANDBYS, NoArgs())] == ["ve:a"]

    # persisted: a restarted host service holds the room again
    restarted = HostService(Endpoint("node1"), host.hypervisor, host.total, tmp_path / "host.sqlite")
    await restarted.start()
    assert restarted.ledger.allocated == {standby_key("ve:a"): Resources(2, 1024, 1)}
    restarted.close()

    info = await ask(host, HOST_PROMOTE, Promote("ve:a", "paused"))
    assert info.state == "paused" and host.ledger.allocated == {"ve:a": Resources(2, 1024, 1)}
    assert await ask(host, HOST_STANDBYS, NoArgs()) == []
    assert (await ask(host, HOST_PROMOTE, Promote("ve:a", "running"))).state == "running"  # idempotent
    assert (await ask(host, HOST_RESTORE, SnapshotTag("ve:a", "t1"))).state == "running"  # snapshots came
    with pytest.raises(Conflict, match="ve:a itself is on this node"):
        await ask(host, HOST_RESERVE_STANDBY, Reserve("ve:a", **NEED))


async def test_standby_refusals_and_idempotent_drop(host: HostService) -> None:
    carried = await exported(host, "ve:b")
    with pytest.raises(NotFound, match="no standby of ve:b"):  # a refresh of a standby never made
        await ask(host, HOST_STANDBY, standby("ve:b", carried))
    with pytest.raises(NotFound, match="no standby of ve:b"):
        await ask(host, HOST_PROMOTE, Promote("ve:b", "running"))
    with pytest.raises(Conflict, match="no room for a standby of ve:b"):
        await ask(host, HOST_RESERVE_STANDBY, Reserve("ve:b", vcpus=9, memory_mb=1, disk_gb=0))
    token = (await ask(host, HOST_RESERVE_STANDBY, Reserve("ve:b", **NEED))).token
    good = codec.encode(standby("ve:b", carried, token))
    for bad, why in (({"xml": "<domain><name>other</name></domain>"}, "^xml must be the definition of ve:b"),
                     ({"taken": "now"}, "^host.standby: taken: expected a finite number, got 'now'$"),
                     ({"snapshots": [["t"]]}, "^each snapshot must be")):
        with pytest.raises(RequestError, match=why):
            await send(host, HOST_STANDBY, {**good, **bad})
    with pytest.raises(RequestError, match="^state must be one of running, paused, shutoff$"):
        await send(host, HOST_PROMOTE, {"name": "ve:b", "state": "gone"})
    with pytest.raises(RequestError, match="^name must be a non-empty string without '/'$"):
        await send(host, HOST_RESERVE_STANDBY, {"name": standby_key("ve:b"), **NEED})
    await ask(host, HOST_STANDBY, standby("ve:b", carried, token))
    assert await ask(host, HOST_UNSTANDBY, VmName("ve:b")) is True
    assert await ask(host, HOST_UNSTANDBY, VmName("ve:b")) is False
    assert host.ledger.allocated == {} and (await ask(host, HOST_INFO, NoArgs())).free.vcpus == 8


async def test_snapshot_delete_forgets_one_snapshot_and_is_idempotent(host: HostService) -> None:
    await define(host, "ve:d")
    for tag in ("t1", "t2"):
        await ask(host, HOST_SNAPSHOT, Snapshot("ve:d", tag))
    assert await ask(host, HOST_SNAPSHOT_DELETE, SnapshotTag("ve:d", "t1")) == SnapshotDeleted("ve:d", "t1", True)
    assert (await ask(host, HOST_SNAPSHOT_DELETE, SnapshotTag("ve:d", "t1"))).deleted is False  # a retry
    with pytest.raises(NotFound, match="no snapshot 't1' of ve:d on this node"):
        await ask(host, HOST_RESTORE, SnapshotTag("ve:d", "t1"))
    assert (await ask(host, HOST_RESTORE, SnapshotTag("ve:d", "t2"))).state == "running"
    assert [s[0] for s in (await ask(host, HOST_EXPORT, Export("ve:d"))).snapshots] == ["t2"]
    with pytest.raises(RequestError, match="^tag must be a non-empty string without '/'$"):
        await send(host, HOST_SNAPSHOT_DELETE, {"name": "ve:d", "tag": ""})
    with pytest.raises(NotFound, match="no VM ve:zz on this node"):
        await ask(host, HOST_SNAPSHOT_DELETE, SnapshotTag("ve:zz", "t2"))


class InternalSnapshots(TestDomains):
    """The test driver posing as a real guest's backend: snapshots are also libvirt snapshots (the test
    driver keeps them in memory), as a real guest's internal qcow2 snapshots."""

    kind = "internal"


async def test_snapshot_delete_of_a_real_guest_deletes_its_libvirt_snapshot(tmp_path: Path) -> None:
    hv = Hypervisor.open(write_node_xml(tmp_path / "node.xml", vcpus=8, memory_mb=8192))
    host = HostService(Endpoint("node1"), hv, Resources(8, 8192, 100), tmp_path / "host.sqlite", InternalSnapshots())
    await host.start()
    try:
        await define(host, "ve:q")
        for tag in ("t1", "t2"):
            await ask(host, HOST_SNAPSHOT, Snapshot("ve:q", tag))
        assert await hv.snapshot_names("ve:q") == ["t1", "t2"]
        assert (await ask(host, HOST_SNAPSHOT_DELETE, SnapshotTag("ve:q", "t1"))).deleted is True
        assert await hv.snapshot_names("ve:q") == ["t2"]
        assert (await ask(host, HOST_SNAPSHOT_DELETE, SnapshotTag("ve:q", "t1"))).deleted is False
        await hv.snapshot("ve:q", "orphan")  # taken, but its row never written (the snapshot was interrupted)
        assert (await ask(host, HOST_SNAPSHOT_DELETE, SnapshotTag("ve:q", "orphan"))).deleted is True
        assert (await ask(host, HOST_SNAPSHOT_DELETE, SnapshotTag("ve:q", "t2"))).deleted is True
        assert await hv.snapshot_names("ve:q") == []  # nothing left to keep it from migrating live
        assert await host.db.one("SELECT COUNT(*) FROM snapshots") == (0,)
    finally:
        host.close()
        await hv.close()


async def test_a_vm_landing_by_live_migration_after_its_reservation_lapsed_is_adopted(tmp_path: Path) -> None:
    """A live migration may outlast the target's reservation (RESERVATION_TTL; a loaded machine, a big VM),
    which then lapses before the next sweep: the VM that landed is adopted with the room reserved for it,
    and the host does not fail (it used to raise UnknownReservation, and the move ended through recovery)."""
    hv = Hypervisor.open(write_node_xml(tmp_path / "node.xml", vcpus=8, memory_mb=8192))
    host = HostService(Endpoint("node1"), hv, Resources(8, 8192, 100), tmp_path / "host.sqlite", InternalSnapshots())
    await host.start()
    try:
        token = (await ask(host, HOST_RESERVE, Reserve("ve:m", **NEED))).token
        lapsed = host.ledger.reserved[token]
        host.ledger.reserved[token] = dataclasses.replace(lapsed, expires=trio.current_time() - 1)
        await hv.define(domain_xml("ve:m", 2, 1024))  # what an incoming live migration leaves in libvirt
        assert (await ask(host, HOST_VM_INFO, VmName("ve:m"))).name == "ve:m"
        assert host.ledger.allocated == {"ve:m": Resources(2, 1024, 1)} and host.ledger.reserved == {}
    finally:
        host.close()
        await hv.close()


async def test_stop_passes_its_timeout_to_the_hypervisor_and_checks_it(host: HostService,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    await define(host, "ve:s")
    waits = []
    shutdown = host.hypervisor.shutdown

    async def spy(name: str, timeout: float = 30.0):
        waits.append(timeout)
        return await shutdown(name, timeout)

    monkeypatch.setattr(host.hypervisor, "shutdown", spy)
    assert (await ask(host, HOST_VM_STOP, VmStop("ve:s", 7))).state == "shutoff"
    await ask(host, HOST_VM_START, VmName("ve:s"))
    await ask(host, HOST_VM_STOP, VmStop("ve:s"))
    assert waits == [7.0, 30.0]
    assert await host.db.one("SELECT desired FROM domains WHERE name = 've:s'") == ("shutoff",)
    for bad in (0, -1, 600.5):
        with pytest.raises(RequestError, match="^timeout must be a number of seconds, more than 0 and at most 600$"):
            await send(host, HOST_VM_STOP, {"name": "ve:s", "timeout": bad})
    for bad in ("7", True, None):  # not a number at all: the codec's line
        with pytest.raises(RequestError, match="^host.vm.stop: timeout: expected a finite number"):
            await send(host, HOST_VM_STOP, {"name": "ve:s", "timeout": bad})


async def test_a_vm_recovered_off_at_start_is_held_until_the_directory_releases_it(
        host: HostService, tmp_path: Path) -> None:
    """While a node was down its VM may have failed over elsewhere: restarted, the host defines it but keeps
    it off until released (the VE layer's fencing pass), or until HOLD_LIMIT passes without a word."""
    await define(host, "ve:a")
    await define(host, "ve:b")
    await ask(host, HOST_VM_SUSPEND, VmName("ve:b"))
    fresh = Hypervisor.open(write_node_xml(tmp_path / "again.xml", vcpus=8, memory_mb=8192))  # forgot them all
    restarted = HostService(Endpoint("node1"), fresh, host.total, tmp_path / "host.sqlite")
    try:
        await restarted.start()
        assert restarted.held == {"ve:a": "running", "ve:b": "paused"}
        info = await ask(restarted, HOST_VM_INFO, VmName("ve:a"))
        assert info.state == "shutoff" and info.held is True
        assert (await ask(restarted, HOST_VM_RELEASE, VmName("ve:a"))).state == "running"
        assert (await ask(restarted, HOST_VM_RELEASE, VmName("ve:a"))).state == "running"  # no-op
        assert "ve:a" not in restarted.held
        await restarted.tick()
        assert restarted.held == {"ve:b": "paused"}  # not yet: HOLD_LIMIT has not passed
        restarted._hold_until = 0.0
        await restarted.tick()
        assert restarted.held == {} and (await fresh.info("ve:b")).state == "paused"
    finally:
        restarted.close()
        await fresh.close()


async def test_metadata_set_on_a_vm_is_exported_with_it_and_kept_across_a_restart(
        host: HostService, tmp_path: Path) -> None:
    """What the layers above annotate a VM with (DVMS: its pinned demand) is part of its definition."""
    uri, pin = "urn:discovery:test", '<pin cpu="5"/>'
    await define(host, "ve:a")
    await host.set_metadata("ve:a", uri, "t", pin)
    assert uri in (await ask(host, HOST_EXPORT, Export("ve:a"))).xml  # what a relocation carries
    with pytest.raises(NotFound):
        await host.set_metadata("ve:zz", uri, "t", pin)
    fresh = Hypervisor.open(write_node_xml(tmp_path / "again.xml", vcpus=8, memory_mb=8192))  # forgot them all
    restarted = HostService(Endpoint("node1"), fresh, host.total, tmp_path / "host.sqlite")
    try:
        await restarted.start()
        assert await fresh.metadata("ve:a", uri) == '<pin cpu="5"/>'
    finally:
        restarted.close()
        await fresh.close()
