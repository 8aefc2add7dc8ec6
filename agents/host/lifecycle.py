"""The lifecycle of one VM on this node: `host.vm.*`, one registered method per verb.

Every verb receives its request checked (its type, `agents.messages`), holds the VM's lock
(`agents.host.locks.one_vm`), and then opens the same way: the store is made to agree with libvirt
(`_reconcile`), and a VM that is not here is not found (`_here`), except by `destroy` and `undefine`, for
which it is already done (idempotent). A verb that changes the VM's state ends its hold (a VM recovered off
at the node's start waits for the VE layer's word, `agents.host.service.HostService.start`; any such verb is
that word) and persists the state reached, so a restart brings the VM back as it was left (`_change`).
`info` and `release` change nothing but a hold.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict

import trio

from agents.host.base import HostBase
from agents.host.locks import one_vm
from agents.hypervisor.actor import DomainInfo, HypervisorError
from agents.hypervisor.qemu_xml import image_of
from agents.messages import (
    HOST_VM_DESTROY,
    HOST_VM_INFO,
    HOST_VM_RELEASE,
    HOST_VM_RESUME,
    HOST_VM_SETTLE,
    HOST_VM_START,
    HOST_VM_STOP,
    HOST_VM_SUSPEND,
    HOST_VM_UNDEFINE,
    VmInfo,
    VmName,
    VmSettle,
    VmStop,
)
from overlay.wire.rpc import Caller, Endpoint, NotFound, RequestError


class Lifecycle(HostBase):
    """`host.vm.start`, `stop`, `destroy`, `suspend`, `resume`, `settle`, `release`, `undefine` and `info`."""

    def _serve_lifecycle(self, transport: Endpoint) -> None:
        transport.route(HOST_VM_START, self._served(self._on_vm_start))
        transport.route(HOST_VM_STOP, self._served(self._on_vm_stop))
        transport.route(HOST_VM_DESTROY, self._served(self._on_vm_destroy))
        transport.route(HOST_VM_SUSPEND, self._served(self._on_vm_suspend))
        transport.route(HOST_VM_RESUME, self._served(self._on_vm_resume))
        transport.route(HOST_VM_SETTLE, self._served(self._on_vm_settle))
        transport.route(HOST_VM_RELEASE, self._served(self._on_vm_release))
        transport.route(HOST_VM_UNDEFINE, self._served(self._on_vm_undefine))
        transport.route(HOST_VM_INFO, self._served(self._on_vm_info))

    @one_vm
    async def _on_vm_start(self, caller: Caller, request: VmName) -> DomainInfo:
        """Run the VM: resumed if paused, booted if off."""
        self._check_may_run(request.name)
        return await self._change(await self._here(request.name), "start", self._start)

    @one_vm
    async def _on_vm_stop(self, caller: Caller, request: VmStop) -> DomainInfo:
        """Shut the VM down gracefully, forced off after `timeout` seconds."""
        return await self._change(await self._here(request.name), "stop",
                                  lambda name: self.hypervisor.shutdown(name, request.timeout))

    @one_vm
    async def _on_vm_destroy(self, caller: Caller, request: VmName) -> DomainInfo | None:
        """Force the VM off (persisted off); None if it is not here."""
        if not await self._present(request.name):
            return None  # already gone: idempotent
        return await self._change(request.name, "destroy", self.hypervisor.destroy)

    @one_vm
    async def _on_vm_suspend(self, caller: Caller, request: VmName) -> DomainInfo:
        return await self._change(await self._here(request.name), "suspend", self.hypervisor.suspend)

    @one_vm
    async def _on_vm_resume(self, caller: Caller, request: VmName) -> DomainInfo:
        self._check_may_run(request.name)
        return await self._change(await self._here(request.name), "resume", self.hypervisor.resume)

    @one_vm
    async def _on_vm_settle(self, caller: Caller, request: VmSettle) -> DomainInfo:
        """Bring the VM to `state` (running, paused or shutoff) from any state."""
        self._check_may_run(request.name, request.state)
        return await self._change(await self._here(request.name), "settle",
                                  lambda name: self.hypervisor.settle(name, request.state))

    @one_vm
    async def _on_vm_release(self, caller: Caller, request: VmName) -> DomainInfo:
        """Start a VM held since this node's start, in the state it should have; for any other VM, a no-op
        that answers its state."""
        name = await self._here(request.name)
        with _failing("release", name):
            return await (self._release(name) if name in self.held else self.hypervisor.info(name))

    @one_vm
    async def _on_vm_undefine(self, caller: Caller, request: VmName) -> None:
        """Remove the VM from this node: its domain, files, snapshots and room. One that is not here leaves
        nothing, but the files of a move that was undone (`_drop_leftovers`)."""
        name = request.name
        if not await self._present(name):
            await self._drop_leftovers(name)
            return  # already gone: idempotent
        self.held.pop(name, None)
        with _failing("undefine", name):
            await self._forget(name)

    @one_vm
    async def _on_vm_info(self, caller: Caller, request: VmName) -> VmInfo:
        """The domain, whether it is held, and how it may leave this node (`discovery.ve.relocation`): its
        backend, and whether it may migrate live (a daemon here, and no internal snapshots, which an NBD
        disk copy would not carry). Its state is "crashed" once this host gave up restarting it (`shown`)."""
        name = await self._here(request.name)
        with _failing("info", name):
            info = self.shown(await self.hypervisor.info(name))
            live = self.migration_uri is not None and not await self.hypervisor.snapshot_names(name)
            image = image_of(await self.hypervisor.xml(name)) if self.domains.bases is not None else None
        return VmInfo(**asdict(info), backend=self.domains.kind, live=live, held=name in self.held, image=image)

    async def _present(self, name: str) -> bool:
        """Whether VM `name` is on this node, once the store agrees with libvirt."""
        await self._reconcile(name)
        return name in self.ledger.allocated

    async def _here(self, name: str) -> str:
        """VM `name`, which must be on this node."""
        if not await self._present(name):
            raise NotFound(f"no VM {name} on this node")
        return name

    async def _change(self, name: str, verb: str, act: Callable[[str], Awaitable[DomainInfo]]) -> DomainInfo:
        """`act` on VM `name`: its hold ends (the VE layer has decided), and the state it reaches is persisted."""
        self.held.pop(name, None)
        with _failing(verb, name):
            info = await act(name)
        await self._set_desired(name, info.state)
        return info

    async def _start(self, name: str) -> DomainInfo:
        info = await self.hypervisor.info(name)
        return await (self.hypervisor.resume(name) if info.state == "paused" else self.hypervisor.start(name))

    async def _drop_leftovers(self, name: str) -> None:
        """Delete the files a VM not held here left (the empty overlay of a live migration that was undone),
        unless libvirt has a domain of that name: an incoming migration still writes into them."""
        if self.domains.disk(name) is None or name in [d.name for d in await self.hypervisor.list()]:
            return
        await trio.to_thread.run_sync(self.domains.remove, name)


@contextmanager
def _failing(verb: str, name: str) -> Iterator[None]:
    """A libvirt failure of `verb` on VM `name` as the caller's one-line error."""
    try:
        yield
    except HypervisorError as err:
        raise RequestError(f"{verb} {name}: {err}") from None
