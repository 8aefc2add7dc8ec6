"""HostService on the embedded test:/// driver, its handlers called directly: standby copies (reserved,
kept, refreshed, promoted, dropped, persisted), deleting a snapshot, the timeout of a graceful stop, the
VMs held off at start until the directory places them, and the metadata the layers above set on a VM."""

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
from overlay.wire.rpc import Caller, Conflict, Endpoint, NotFound, RequestError

AGENT = Caller("node9", "node", "node9", "rennes")
NEED = {"vcpus": 2, "memory_mb": 1024, "disk_gb": 1}


async def define(host: HostService, name: str) -> None:
    token = (await host._on_reserve(AGENT, {"name": name, **NEED}))["token"]
    await host._on_confirm(AGENT, {"token": token})


async def exported(host: HostService, name: str) -> dict:
    """What `host.export` gives for a VM defined here (its XML and snapshots), then the VM undefined: a copy
    of a VM that runs on another node."""
    await define(host, name)
    await host._on_snapshot(AGENT, {"name": name, "tag": "t1"})
    carried = await host._on_export(AGENT, {"name": name})
    await host._on_vm(AGENT, {"name": name, "action": "undefine"})
    return carried


async def test_a_standby_holds_room_is_no_domain_and_is_promoted_once(host: HostService, tmp_path: Path) -> None:
    carried = await exported(host, "ve:a")
    token = (await host._on_reserve_standby(AGENT, {"name": "ve:a", **NEED}))["token"]
    kept = await host._on_standby(AGENT, {"name": "ve:a", "token": token, "taken": 5.0, **carried})
    assert kept == {"name": "ve:a", "taken": 5.0, "snapshots": 1}
    assert host.ledger.allocated == {standby_key("ve:a"): Resources(2, 1024, 1)}
    assert (await host._on_info(AGENT, {}))["free"] == {"vcpus": 6, "memory_mb": 7168, "disk_gb": 99}
    assert (await host._on_info(AGENT, {}))["domains"] == []
    with pytest.raises(NotFound):  # host.vm (and so the VE service's `_holds`) does not see it
        await host._on_vm(AGENT, {"name": "ve:a", "action": "info"})
    again = await host._on_standby(AGENT, {"name": "ve:a", "token": token, "taken": 6.0, **carried})  # retried
    assert again["taken"] == 6.0 and len(host.ledger.allocated) == 1
    assert [s["name"] for s in await host._on_standbys(AGENT, {})] == ["ve:a"]

    # persisted: a restarted host service holds the room again
    restarted = HostService(Endpoint("node1"), host.hypervisor, host.total, tmp_path / "host.sqlite")
    await restarted.start()
    assert restarted.ledger.allocated == {standby_key("ve:a"): Resources(2, 1024, 1)}
    restarted.close()

    info = await host._on_promote(AGENT, {"name": "ve:a", "state": "paused"})
    assert info["state"] == "paused" and host.ledger.allocated == {"ve:a": Resources(2, 1024, 1)}
    assert await host._on_standbys(AGENT, {}) == []
    assert (await host._on_promote(AGENT, {"name": "ve:a", "state": "running"}))["state"] == "running"  # idempotent
    assert (await host._on_restore(AGENT, {"name": "ve:a", "tag": "t1"}))["state"] == "running"  # snapshots came
    with pytest.raises(Conflict, match="ve:a itself is on this node"):
        await host._on_reserve_standby(AGENT, {"name": "ve:a", **NEED})


async def test_standby_refusals_and_idempotent_drop(host: HostService) -> None:
    carried = await exported(host, "ve:b")
    with pytest.raises(NotFound, match="no standby of ve:b"):  # a refresh of a standby never made
        await host._on_standby(AGENT, {"name": "ve:b", "taken": 1.0, **carried})
    with pytest.raises(NotFound, match="no standby of ve:b"):
        await host._on_promote(AGENT, {"name": "ve:b", "state": "running"})
    with pytest.raises(Conflict, match="no room for a standby of ve:b"):
        await host._on_reserve_standby(AGENT, {"name": "ve:b", "vcpus": 9, "memory_mb": 1, "disk_gb": 0})
    token = (await host._on_reserve_standby(AGENT, {"name": "ve:b", **NEED}))["token"]
    for bad, why in (({"xml": "<domain><name>other</name></domain>"}, "xml must be the definition of ve:b"),
                     ({"taken": "now"}, "taken must be a time"), ({"snapshots": [["t"]]}, "each snapshot must be")):
        with pytest.raises(RequestError, match=why):
            await host._on_standby(AGENT, {"name": "ve:b", "token": token, "taken": 1.0, **carried, **bad})
    with pytest.raises(RequestError, match="state must be one of"):
        await host._on_promote(AGENT, {"name": "ve:b", "state": "gone"})
    with pytest.raises(RequestError, match="name must be a non-empty string without '/'"):
        await host._on_reserve_standby(AGENT, {"name": standby_key("ve:b"), **NEED})
    await host._on_standby(AGENT, {"name": "ve:b", "token": token, "taken": 1.0, **carried})
    assert await host._on_unstandby(AGENT, {"name": "ve:b"}) is True
    assert await host._on_unstandby(AGENT, {"name": "ve:b"}) is False
    assert host.ledger.allocated == {} and (await host._on_info(AGENT, {}))["free"]["vcpus"] == 8


async def test_snapshot_delete_forgets_one_snapshot_and_is_idempotent(host: HostService) -> None:
    await define(host, "ve:d")
    for tag in ("t1", "t2"):
        await host._on_snapshot(AGENT, {"name": "ve:d", "tag": tag})
    assert await host._on_snapshot_delete(AGENT, {"name": "ve:d", "tag": "t1"}) == {
        "name": "ve:d", "tag": "t1", "deleted": True}
    assert (await host._on_snapshot_delete(AGENT, {"name": "ve:d", "tag": "t1"}))["deleted"] is False  # a retry
    with pytest.raises(NotFound, match="no snapshot 't1' of ve:d on this node"):
        await host._on_restore(AGENT, {"name": "ve:d", "tag": "t1"})
    assert (await host._on_restore(AGENT, {"name": "ve:d", "tag": "t2"}))["state"] == "running"
    assert [s[0] for s in (await host._on_export(AGENT, {"name": "ve:d"}))["snapshots"]] == ["t2"]
    with pytest.raises(RequestError, match="^tag must be a non-empty string without '/'$"):
        await host._on_snapshot_delete(AGENT, {"name": "ve:d", "tag": ""})
    with pytest.raises(NotFound, match="no VM ve:zz on this node"):
        await host._on_snapshot_delete(AGENT, {"name": "ve:zz", "tag": "t2"})


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
            await host._on_snapshot(AGENT, {"name": "ve:q", "tag": tag})
        assert await hv.snapshot_names("ve:q") == ["t1", "t2"]
        assert (await host._on_snapshot_delete(AGENT, {"name": "ve:q", "tag": "t1"}))["deleted"] is True
        assert await hv.snapshot_names("ve:q") == ["t2"]
        assert (await host._on_snapshot_delete(AGENT, {"name": "ve:q", "tag": "t1"}))["deleted"] is False
        await hv.snapshot("ve:q", "orphan")  # taken, but its row never written (the snapshot was interrupted)
        assert (await host._on_snapshot_delete(AGENT, {"name": "ve:q", "tag": "orphan"}))["deleted"] is True
        assert (await host._on_snapshot_delete(AGENT, {"name": "ve:q", "tag": "t2"}))["deleted"] is True
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
        token = (await host._on_reserve(AGENT, {"name": "ve:m", **NEED}))["token"]
        lapsed = host.ledger.reserved[token]
        host.ledger.reserved[token] = dataclasses.replace(lapsed, expires=trio.current_time() - 1)
        await hv.define(domain_xml("ve:m", 2, 1024))  # what an incoming live migration leaves in libvirt
        assert (await host._on_vm(AGENT, {"name": "ve:m", "action": "info"}))["name"] == "ve:m"
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
    assert (await host._on_vm(AGENT, {"name": "ve:s", "action": "stop", "timeout": 7}))["state"] == "shutoff"
    await host._on_vm(AGENT, {"name": "ve:s", "action": "start"})
    await host._on_vm(AGENT, {"name": "ve:s", "action": "stop"})
    assert waits == [7.0, 30.0]
    assert await host.db.one("SELECT desired FROM domains WHERE name = 've:s'") == ("shutoff",)
    for bad in (0, -1, 600.5, "7", True, None):
        with pytest.raises(RequestError, match="timeout must be a number of seconds, more than 0 and at most 600"):
            await host._on_vm(AGENT, {"name": "ve:s", "action": "stop", "timeout": bad})


async def test_a_vm_recovered_off_at_start_is_held_until_the_directory_releases_it(
        host: HostService, tmp_path: Path) -> None:
    """While a node was down its VM may have failed over elsewhere: restarted, the host defines it but keeps
    it off until released (the VE layer's fencing pass), or until HOLD_LIMIT passes without a word."""
    await define(host, "ve:a")
    await define(host, "ve:b")
    await host._on_vm(AGENT, {"name": "ve:b", "action": "suspend"})
    fresh = Hypervisor.open(write_node_xml(tmp_path / "again.xml", vcpus=8, memory_mb=8192))  # forgot them all
    restarted = HostService(Endpoint("node1"), fresh, host.total, tmp_path / "host.sqlite")
    try:
        await restarted.start()
        assert restarted.held == {"ve:a": "running", "ve:b": "paused"}
        info = await restarted._on_vm(AGENT, {"name": "ve:a", "action": "info"})
        assert info["state"] == "shutoff" and info["held"] is True
        assert (await restarted._on_vm(AGENT, {"name": "ve:a", "action": "release"}))["state"] == "running"
        assert (await restarted._on_vm(AGENT, {"name": "ve:a", "action": "release"}))["state"] == "running"  # no-op
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
    await host._set_metadata(AGENT, {"name": "ve:a", "uri": uri, "key": "t", "xml": pin})
    assert uri in (await host._on_export(AGENT, {"name": "ve:a"}))["xml"]  # what a relocation carries
    with pytest.raises(NotFound):
        await host._set_metadata(AGENT, {"name": "ve:zz", "uri": uri, "key": "t", "xml": pin})
    fresh = Hypervisor.open(write_node_xml(tmp_path / "again.xml", vcpus=8, memory_mb=8192))  # forgot them all
    restarted = HostService(Endpoint("node1"), fresh, host.total, tmp_path / "host.sqlite")
    try:
        await restarted.start()
        assert await fresh.metadata("ve:a", uri) == '<pin cpu="5"/>'
    finally:
        restarted.close()
        await fresh.close()
