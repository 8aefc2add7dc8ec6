"""What every part of the host service shares: the node's VM state and the few steps all handlers use.

`agents.host.service.HostService` is assembled from one class per concern (the lifecycle of one VM in
`agents.host.lifecycle`, moves in `agents.host.moves`, standby copies in `agents.host.standby`); each
extends `HostBase`, so each reads on its own and a type checker sees the state it relies on. Nothing
here serves a request: it holds the ledger, the store, the hypervisor and the locks, routes handlers
through the gate (`_served`), and keeps the store in step with libvirt (`_reconcile`, `_forget`).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Protocol, TypeVar

import trio

from agents.host.capacity import Ledger, Resources
from agents.host.locks import Gate, VmLocks
from agents.host.shipping import copy_file, fetch_file
from agents.host.store import Store
from agents.hypervisor.actor import DomainInfo, Hypervisor
from agents.hypervisor.guests import Domains, TestDomains
from agents.hypervisor.qemu_xml import image_of
from agents.messages import MirrorStatus
from agents.runtime import Actor
from images.boot import BootImage
from images.importing import Imported
from overlay.wire.rpc import Caller, Endpoint, RequestError

log = logging.getLogger(__name__)
CRASHED = "crashed"
"""The desired state of a VM left down after its guest crashed too often, and the state it is shown in."""
R = TypeVar("R")
A = TypeVar("A")


class NodeImages(Protocol):
    """This node's images, as its VMs need them (`images.service.ImageService`, wired in `discovery.agent`)."""

    async def bring(self, image: str) -> str:
        """Make this node hold image NAME[:TAG] (pulling only the chunks it lacks); its manifest digest."""

    async def boot(self, digest: str, bases: Path) -> BootImage:
        """Image `digest` ready to boot, its base under `bases` (made from this node's store the first time)."""

    async def publish(self, path: Path, name: str, owner: str, copies: int) -> Imported:
        """Import the raw or qcow2 file at `path` as image `name` held by this node (only the chunks the store
        lacks are written); Conflict if the name is taken."""


class HostBase(Actor):
    """The state of this node's VMs, and the steps every `host.*` handler shares.

    Each request runs in the task that received it, inside the `gate` (`_served`) and, for a request about
    one VM, holding that VM's lock (`agents.host.locks.one_vm`). A handler that fails unexpectedly (a bug,
    not a `RequestError`) fails its request, closes the gate and crashes the service (`handle`): the
    supervisor restarts it, and `HostService.start` rebuilds the state from SQLite.
    """

    def __init__(self, transport: Endpoint, hypervisor: Hypervisor, total: Resources, db_path: Path,
                 domains: Domains | None = None, migration_uri: str | None = None) -> None:
        super().__init__(mailbox_size=8)  # the mailbox only carries crash reports (`_served`)
        self.transport = transport
        self.hypervisor = hypervisor
        self.total = total
        self.ledger = Ledger(total)
        self.domains = domains or TestDomains()
        self.migration_uri = migration_uri
        """Where peers migrate VMs to this node (its libvirtd); None where live migration cannot work."""
        self.held: dict[str, str] = {}
        """VMs recovered off at start, or frozen (`agents.host.freezing`), held off until released, with the state
        to release them to."""
        self.may_run: Callable[[str], bool] = lambda name: True
        """Whether VM `name` may run on this node now: always, unless the HA layer says otherwise (a protected VM
        runs only while this host's lease covers it, `discovery.ha.lease`)."""
        self.forgotten: Callable[[str], None] = lambda name: None
        """Told each VM removed from this node, at once: a VM of that name defined here later is another one (the
        HA layer's fence applied to the one removed)."""
        self.mirror_status: Callable[[], list[MirrorStatus]] = list
        """The mirrors of this node's VMs' disks (`host.mirrors`): the replication shell's, where one runs."""
        self.vm_locks = VmLocks()
        self.gate = Gate()
        self.db_path = db_path
        self.store: Store | None = None
        """Opened by the first `start` (off the event loop); requests wait at the gate until then."""
        self.images: NodeImages | None = None
        """Brings and boots the images of this node's VMs; None: an agent without an image store."""
        self.shipped: Counter[str] = Counter()
        """Bytes of VM files shipped ("sent", "received"; `_fetch`, `host.fetch`): what the metrics show."""
        self.crashed: set[str] = set()
        """VMs left down after their guest crashed too often (`agents.host.crashes`): persisted as the desired
        state CRASHED, shown as the state "crashed" (`shown`) until a verb sets another desired state."""
        self.guest_restarts = 0
        """Crashed guests started again on this node (`agents.host.crashes`): what the metrics show."""
        self._hold_until = math.inf

    @property
    def db(self) -> Store:
        assert self.store is not None, "the host service has not started"
        return self.store

    def _served(self, handler: Callable[[Caller, R], Awaitable[A]]) -> Callable[[Caller, R], Awaitable[A]]:
        """`handler` inside the gate, as every `host.*` handler is routed: `transport.route(M, self._served(h))`."""
        async def call(caller: Caller, request: R) -> A:
            async with self.gate.enter():
                try:
                    return await handler(caller, request)
                except RequestError:
                    raise
                except Exception as err:
                    self.gate.close()  # nothing new starts on a state that may be half-changed
                    self.tell_nowait(err)
                    raise
        return call

    async def handle(self, message: Exception) -> None:
        raise message  # a handler crashed: restart the service (see the class docstring)

    async def _reconcile(self, name: str) -> None:
        """Make this store agree with libvirt about VM `name` (real guests only, whose daemon keeps domains
        and whose migrations move them behind the agent's back): adopt a persistent domain the store
        lacks (it arrived by live migration; the reservation made for it, if still held, is what it
        takes), forget one that libvirt no longer has (it migrated away)."""
        if self.domains.kind == "test":
            return
        if name in self.ledger.allocated:
            if not await self.hypervisor.persistent(name):
                log.info("host: %s is no longer defined here (it migrated away); forgetting it", name)
                await self._forget(name)
            return
        if not await self.hypervisor.persistent(name):
            return
        info = await self.hypervisor.info(name)
        held = next((r for r in self.ledger.reserved.values() if r.key == name), None)
        need = held.need if held is not None else Resources(info.vcpus, info.memory_mb, 0)
        if held is not None:  # taken now, even if it lapsed (not yet swept) while a long migration ran
            self.ledger.release(held.token)
        self.ledger.allocate(name, need)
        xml = await self.hypervisor.xml(name)
        await self.db.write("INSERT OR REPLACE INTO domains VALUES (?, ?, ?, ?, ?, ?)",
                            (name, xml, need.vcpus, need.memory_mb, need.disk_gb, info.state))
        log.info("host: adopted %s, which arrived by live migration (%s)", name, info.state)
        await self.carry_segments()  # its address served here, its ports forwarded from here

    async def carry_segments(self) -> None:
        """Make the kernel hold what this host's VMs need of their networks (`agents.host.networking` does);
        called once a VM is defined here, before it starts."""

    async def _forget(self, name: str) -> None:
        """Undefine VM `name`, delete its files and rows, free its room (its lock held, or at start)."""
        self.crashed.discard(name)
        await self.hypervisor.undefine(name)
        await trio.to_thread.run_sync(self.domains.remove, name)
        await self.db.transaction(("DELETE FROM domains WHERE name = ?", (name,)),
                                  ("DELETE FROM snapshots WHERE name = ?", (name,)))
        self.ledger.deallocate(name)
        self.forgotten(name)

    async def _booted(self, image: str | None = None, carried: str | None = None,
                      digest: str | None = None) -> BootImage | None:
        """What a real guest boots here, its base made if need be: a new VM's `image` (NAME[:TAG], brought
        first), the image a `carried` domain names, or image `digest` (both already in this node's store:
        brought before the VM came). None on a backend without disks, and for a carried domain naming none."""
        bases = self.domains.bases
        if bases is None:
            return None
        if carried is not None:
            digest = image_of(carried)
            if digest is None:
                return None
        if self.images is None:
            raise RequestError("this agent has no image store")
        if digest is None:
            if image is None:
                raise RequestError(f"a real guest boots an image ({self.domains.kind} backend): give the VM one "
                                   "(`image:` in its spec; `discovery image list` shows them)")
            digest = await self.images.bring(image)
        return await self.images.boot(digest, bases)

    async def _copy_disk(self, name: str, disk: Path, state: str, dest: Path) -> float:
        """Copy VM `name`'s `disk` to `dest`, consistent: a running VM is paused for the copy's length only (QEMU
        flushes its disks when it stops), so the copy is the disk as a power cut would have left it. Returns the
        seconds it was paused (0 if it was not running). Its lock held."""
        if state != "running":
            await trio.to_thread.run_sync(copy_file, disk, dest)
            return 0.0
        await self.hypervisor.suspend(name)
        paused = time.perf_counter()
        try:
            await trio.to_thread.run_sync(copy_file, disk, dest)
        finally:
            if name not in self.held:  # frozen meanwhile: it stays paused
                await self.hypervisor.resume(name)
        return time.perf_counter() - paused

    async def _fetch(self, source: str, name: str, part: str, dest: Path) -> None:
        """Fetch `part` of VM `name` from the host at `source` into `dest` (`agents.host.shipping`), counted."""
        self.shipped["received"] += await fetch_file(self.transport, source, name, part, dest)

    async def _set_desired(self, name: str, state: str) -> None:
        """Persist the state VM `name` should be in (a SETTLED state, or CRASHED: left down after crashes)."""
        await self.db.write("UPDATE domains SET desired = ? WHERE name = ?", (state, name))
        if state == CRASHED:
            self.crashed.add(name)
        else:
            self.crashed.discard(name)

    async def _release(self, name: str) -> DomainInfo:
        """Bring a held VM to the state it should have, and end its hold (RequestError if `may_run` says no)."""
        self._check_may_run(name, self.held[name])
        info = await self.hypervisor.settle(name, self.held[name])
        del self.held[name]
        await self._set_desired(name, info.state)
        return info

    def _check_may_run(self, name: str, state: str = "running") -> None:
        """Refuse to bring VM `name` to `state` if that runs it and `may_run` says no."""
        if state == "running" and not self.may_run(name):
            raise RequestError(f"{name} may not run on this node now: its HA lease does not cover the VM "
                               "(lapsed, revoked, or not renewed yet)")

    def shown(self, info: DomainInfo) -> DomainInfo:
        """A domain as `host.*` answers show it: one left down after its guest crashed too often is "crashed"
        (libvirt says shut off), which the VE layer (`ve show`), the metrics and the HA layer read."""
        if info.name in self.crashed and info.state == "shutoff":
            return replace(info, state=CRASHED)
        return info
