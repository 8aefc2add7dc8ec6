"""Which VMs `Rebuilds.rebuild` (discovery.ve.rebuilds) rebuilds, as the HA watchers call it in-process (VE, VMs,
reason; `host`: the one they recover): those whose host is down, each with the reason and why, the VMs still
to come pending; a second call for the same host rebuilds nothing. And what a rebuilt VM boots: its newest
shipped snapshot, else its spec's image. The transaction itself is stubbed (its tests: test_ve_rebuilding.py)."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest

from discovery.ve.directory import Stored
from discovery.ve.rebuilds import Rebuilds
from discovery.ve.records import Slot, VERecord
from discovery.ve.shipped import ShippedLog, ShippedSnapshot
from discovery.ve.spec import VMSpec
from discovery.ve.world import record_of
from overlay.wire.rpc import Caller, Conflict, NotFound, RequestError, RpcTimeout


class Stub(Rebuilds):
    """The service with its record, the hosts taken for down (`dead`), and each rebuild recorded (onto n3)."""

    def __init__(self, ve: VERecord, dead: set[str]) -> None:
        self.node, self._locks = "n2", {}
        self.membership = SimpleNamespace(me=SimpleNamespace(site="rennes"))  # type: ignore[assignment]
        self.stored, self.dead = Stored(ve, 1), dead
        self.calls: list[tuple[str, str | None, list[str]]] = []
        self.callers: list[Caller] = []

    async def _record(self, caller: Caller, name: str) -> Stored:
        self.callers.append(caller)
        return self.stored

    async def _settle(self, record: Stored) -> Stored:
        return record

    async def _down(self, ve: VERecord, vm: str) -> str | None:
        node = ve.placement[vm].node
        return f"{node} is dead" if node in self.dead else None

    async def _rebuild(self, record: Stored, vm: str, why: str | None, pending: list[str]) -> Stored:
        self.calls.append((vm, why, pending))
        self.stored = Stored(record.ve.with_slot(vm, Slot("n3", "n3:1", "rennes", 0.5, "rebuilt")), record.version + 1)
        return self.stored


def slot(node: str) -> Slot:
    return Slot(node, f"{node}:1", "rennes", 1.0, "created")


VE = record_of("rb", {"x": slot("n1"), "y": slot("n1"), "z": slot("n4")})


async def test_a_watcher_rebuilds_the_vms_of_the_host_it_recovers_once() -> None:
    service = Stub(VE, {"n1"})
    ve, rebuilt = await service.rebuild("rb", ["x", "y", "z"], "n1's lease revoked by n2", host="n1")
    assert rebuilt == {"x": "n3", "y": "n3"} and ve.placement["z"] == slot("n4")
    assert service.calls == [("x", "n1's lease revoked by n2; n1 is dead", ["y"]),
                             ("y", "n1's lease revoked by n2; n1 is dead", [])]
    assert service.callers[0] == Caller("ha@n2", "operator", "n2", "rennes")  # this agent, as an operator
    assert await service.rebuild("rb", ["x", "y", "z"], "n1's lease revoked by n2", host="n1") == (ve, {})
    assert len(service.calls) == 2  # a second call (a follower watcher) rebuilds nothing


async def test_a_vm_whose_host_answers_is_skipped_refused_alone_or_forced() -> None:
    service = Stub(VE, {"n1"})
    assert (await service.rebuild("rb", None, None))[1] == {"x": "n3", "y": "n3"}  # z's host n4 answers
    service = Stub(VE, set())
    with pytest.raises(Conflict, match="^cannot rebuild rb/z: its host n4 is alive and answering"):
        await service.rebuild("rb", ["z"], None)
    assert (await service.rebuild("rb", ["z"], None, force=True))[1] == {"z": "n3"}
    assert service.calls == [("z", None, [])]  # forced: no why, its copy is switched off first
    with pytest.raises(NotFound, match="^VE 'rb' has no VM 'w' "):
        await service.rebuild("rb", ["w"], None)


async def test_a_host_filter_that_leaves_nothing_is_no_refusal() -> None:
    service = Stub(replace(VE, placement={"z": slot("n4")}), {"n4"})
    assert (await service.rebuild("rb", None, "lease lapsed", host="n1"))[1] == {}
    assert service.calls == []


class Logs:
    """The shipped-snapshot logs: `log`, or a directory that does not answer (None)."""

    def __init__(self, log: ShippedLog | None) -> None:
        self.log = log

    async def get(self, ve: VERecord) -> ShippedLog:
        if self.log is None:
            raise RpcTimeout("no replica answered")
        return self.log


async def test_a_rebuilt_vm_boots_its_newest_shipped_snapshot_else_its_image() -> None:
    vms = (VMSpec("x", 1, 256, 1, "tiny"), VMSpec("y", 1, 256), VMSpec("z", 1, 256))
    ve = replace(VE, spec=replace(VE.spec, vms=vms))
    snapshots = tuple(ShippedSnapshot(f"snap/rb/x:2026010{i}-000000", f"d{i}", float(i)) for i in (1, 2))
    service = Stub(ve, set())
    service.shipped = Logs(ShippedLog(ve.uid, {"x": snapshots}))  # type: ignore[assignment]
    assert await service._boot_image(ve, "x") == "snap/rb/x:20260102-000000"
    assert await service._boot_image(ve, "y") is None  # none shipped, and its spec boots no image
    service.shipped = Logs(ShippedLog(ve.uid))  # type: ignore[assignment]
    assert await service._boot_image(ve, "x") == "tiny"
    service.shipped = Logs(None)  # type: ignore[assignment]
    with pytest.raises(RequestError, match="^cannot rebuild rb/x: its shipped snapshots cannot be read: "):
        await service._boot_image(ve, "x")
