"""The host's side of the HA lease (`agents.host.freezing`, `HostBase.may_run`), on the embedded test:/// driver:
a freeze pauses and holds the running VMs named, leaving what should run persisted; nothing runs a VM that
`may_run` refuses (a verb, a release, a restart of the service); a thaw brings it back once allowed."""

from __future__ import annotations

import pytest

from agents.host.service import HostService
from agents.messages import HOST_VM_INFO, HOST_VM_RELEASE, HOST_VM_RESUME, HOST_VM_START, HOST_VM_UNDEFINE, VmName
from overlay.wire.rpc import RequestError
from tests.unit.conftest import ask
from tests.unit.test_guest_restarts import define


async def state(host: HostService, name: str) -> str:
    return (await ask(host, HOST_VM_INFO, VmName(name))).state


async def test_a_freeze_holds_the_vms_and_nothing_runs_them_until_the_lease_allows(host: HostService) -> None:
    await define(host, "ve:a")
    await define(host, "ve:b", state="paused")
    await define(host, "other:c")
    covered = False
    host.may_run = lambda name: covered or not name.startswith("ve:")

    assert await host.freeze(["ve:a", "ve:b", "ve:gone"]) == ["ve:a"]  # b is paused already; gone is not here
    assert (await state(host, "ve:a"), await state(host, "other:c")) == ("paused", "running")
    assert host.held == {"ve:a": "running"}
    for verb in (HOST_VM_START, HOST_VM_RESUME, HOST_VM_RELEASE):
        with pytest.raises(RequestError, match="may not run on this node now: its HA lease does not cover"):
            await ask(host, verb, VmName("ve:a"))
    assert await host.thaw(["ve:a"]) == []  # still refused: it stays held
    assert await state(host, "ve:a") == "paused"

    await host.start()  # the service restarts meanwhile: the frozen VM stays held, not resumed
    assert host.held == {"ve:a": "running"} and await state(host, "ve:a") == "paused"

    covered = True
    assert await host.thaw(["ve:a"]) == ["ve:a"]
    assert await state(host, "ve:a") == "running" and host.held == {}
    assert await state(host, "ve:b") == "paused"  # what the VE layer left paused stays paused


async def test_a_fenced_vm_is_forced_off_and_held_with_the_state_it_should_have(host: HostService) -> None:
    await define(host, "ve:a")
    await define(host, "ve:b", state="paused")
    host.may_run = lambda name: False
    assert await host.fence(["ve:a", "ve:b", "ve:gone"]) == ["ve:a", "ve:b"]
    assert (await state(host, "ve:a"), await state(host, "ve:b")) == ("shutoff", "shutoff")
    assert host.held == {"ve:a": "running", "ve:b": "paused"}  # what a release brings back, if ever
    await host.start()  # nor does a restart of the service run them
    assert await state(host, "ve:a") == "shutoff" and host.held == {"ve:a": "running", "ve:b": "paused"}


async def test_the_ha_layer_is_told_at_once_of_a_vm_removed(host: HostService) -> None:
    await define(host, "ve:a")
    removed: list[str] = []
    host.forgotten = removed.append
    await ask(host, HOST_VM_UNDEFINE, VmName("ve:a"))
    assert removed == ["ve:a"]  # a VM of that name defined later is another one
    await ask(host, HOST_VM_UNDEFINE, VmName("ve:a"))  # already gone: nothing more to tell
    assert removed == ["ve:a"]
