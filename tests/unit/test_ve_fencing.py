"""Fencing (discovery.ve.replicas.Replicas.fence) of a VM a host holds off since its start, by what the directory
says: started if the record places it here and nothing moves it; undefined once the record places it on another
node that holds it (failed over, or rebuilt: discovery.ve.rebuilding); left held while an operation under way
may be defining it elsewhere, and while the other node cannot be asked."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from agents.eventlog import EventLog
from agents.host.capacity import Ledger, Resources
from discovery.ve.directory import PREFIX, Directory
from discovery.ve.records import FailoverIntent, RebuildIntent, Slot, write
from discovery.ve.replicas import Replicas
from discovery.ve.world import record_of
from overlay.dht import Record
from overlay.wire.rpc import RemoteError, RpcTimeout

HERE = Slot("n1", "n1:1", "rennes", 1.0, "created")
"""The VM's slot on this node, n1."""
ELSEWHERE = Slot("n3", "n3:1", "rennes", 0.4, "rebuilt, its host n1 lost (n1 does not answer)")
REBUILDING = RebuildIntent("n3", "n3:1", "rennes", 0.4, "n1", "n1 does not answer", None, "running", "n2", 9.0)
FAILING_OVER = FailoverIntent("n4", "n4:1", "lyon", "n1", "n1 does not answer", "running", "n2", 9.0)


class Records:
    """The directory's records: VE rb's, as `slot` places its VM x."""

    def __init__(self, slot: Slot) -> None:
        self.value = write(record_of("rb", {"x": slot}))

    async def get_record(self, key: str) -> Record | None:
        return Record(key, self.value, 4, "n2") if key == PREFIX + "rb" else None


class Host:
    """This node's host: it holds VM rb:x off since its start."""

    def __init__(self, covered: bool = True) -> None:
        self.ledger = Ledger(Resources(8, 8192, 100))
        self.ledger.allocated["rb:x"] = Resources(1, 256, 1)
        self.held = {"rb:x": "running"}
        self.covered = covered

    def may_run(self, name: str) -> bool:
        """What the HA layer says: False for a protected VM that this host's lease does not cover."""
        return self.covered


class Transport:
    """Calls to the other nodes (`host.vm.info`: whether they hold the VM) and to this node's host (what
    fencing does here, recorded)."""

    addr = "n1:1"

    def __init__(self, answering: bool) -> None:
        self.answering = answering
        self.done: list[str] = []

    async def call(self, addr: str, method: str, args: dict[str, Any], timeout: float | None = None) -> Any:
        assert method == "host.vm.info" and addr != self.addr
        if not self.answering:
            raise RpcTimeout(f"{addr} did not answer")
        if addr == "n3:1":
            return {"state": "running"}
        raise RemoteError("not_found", f"no VM {args['name']} on this node")

    async def call_many(self, addrs: list[str], method: str, args: dict[str, Any],
                        timeout: float | None = None) -> dict[str, Any]:
        assert addrs == [self.addr]
        self.done.append(method.removeprefix("host.vm."))
        return {self.addr: None}


@pytest.mark.parametrize("slot, answering, done, covered", [
    (HERE, True, ["release"], True),  # the directory says it is ours: started
    (HERE, True, [], False),  # ours, but protected and not covered by this host's HA lease: kept held
    (ELSEWHERE, True, ["undefine"], True),  # rebuilt on n3, which holds it: this stale copy goes, never started
    (ELSEWHERE, False, [], True),  # n3 cannot be asked: no positive evidence, nothing changes
    (replace(HERE, rebuilding=REBUILDING), True, [], True),  # n3 may be defining it: the rebuild's recovery decides
    (replace(HERE, failing_over=FAILING_OVER), True, [], True),  # likewise for a failover under way
    (replace(ELSEWHERE, node="n4", addr="n4:1"), True, [], True),  # n4 does not hold it: kept, held
])
async def test_a_held_vm_is_started_removed_or_kept_held_by_what_the_directory_says(
        slot: Slot, answering: bool, done: list[str], covered: bool) -> None:
    transport, host = Transport(answering), Host(covered)
    fencing = Replicas(node="n1", joins=False, directory=Directory(Records(slot)),  # type: ignore[arg-type]
                       transport=transport, membership=None, nearest=None, distances=None,  # type: ignore[arg-type]
                       host=host, images=None, shipped=None, events=EventLog())  # type: ignore[arg-type]
    await fencing.fence()
    assert transport.done == done
