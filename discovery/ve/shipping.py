"""Shipped snapshots, run (the rules: `discovery.ve.shipped`): each VM of a VE whose policy is `restart` with
`snapshot_every` has its disk shipped as an image to other nodes that often, the last `keep` kept; `ve ship`
ships every VM of a VE at once, `ve snapshots` lists them, `ve.restore_point` names what to boot.

One shipment of VM `vm` (`Shipping.ship`), from whichever agent:
1. its host makes image `snap/<ve>/<vm>:<tag>` of its disk in its own store (`host.snapshot_image`: the VM
   paused for a local copy of its overlay only);
2. the nodes `ship_targets` chooses pull it (`image.pull`: only the chunks they lack, so the nodes that hold the
   VM's previous snapshot fetch what changed since), and the image is kept on that many live holders from then
   on (`image replicate`'s upkeep);
3. the log lists it (`discovery.ve.shipped_log`), once it has a holder besides the host;
4. the snapshots beyond `keep` are pruned: image removed (its chunks reclaimed by `image gc`), then unlisted.
A shipment cut short leaves an image no log lists (1-2), or an image more than `keep` (4, finished by the
next shipment); never a listed snapshot that no node besides its host holds. Shipped snapshots outlive
`ve destroy` (backups outlive the machine, as in Proxmox Backup Server): `image rm` removes them.

The periodic shipments are each agent's `Shipper`, for the VMs its host runs: a VM is shipped only where it
runs, while its VE is running, and not while a move, failover or rebuild of it is under way.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterable, MutableMapping

from agents.runtime import Actor
from discovery.ve.base import VEBase, domain_name
from discovery.ve.messages import Named, Shipment, ShippedImage, ShippedOf, ShippedVM
from discovery.ve.records import VERecord
from discovery.ve.shipped import (
    REMOTE_HOLDERS,
    ShippedLog,
    ShippedSnapshot,
    due,
    image_name,
    restore_point,
    ship_targets,
)
from discovery.ve.spec import DEFAULT_KEEP
from overlay.wire.rpc import Caller, Conflict, NotFound, RequestError, RpcError

log = logging.getLogger(__name__)
SHIP_INTERVAL = 5.0
"""Seconds between two looks at which of this node's VMs are due (`snapshot_every` is at least 10 s)."""
IMAGE_TIMEOUT = 600.0
"""A host reads the whole disk to make its image; a holder pulls what it lacks."""


class Shipping(VEBase):
    """`ve.ship`, `ve.restore_point`, the shipped part of `ve.snapshots`, and the periodic pass (`ship_due`)."""

    async def _on_ship(self, caller: Caller, request: Named) -> Shipment:
        """Ship a snapshot of every VM of the VE now, whatever its policy (keeping its `keep`, or DEFAULT_KEEP)."""
        ve = (await self._record(caller, request.name)).ve
        keep = ve.spec.ha.keep or DEFAULT_KEEP
        return Shipment(ve.name, {vm: await self.ship(ve, vm, keep) for vm in sorted(ve.placement)})

    async def _on_restore_point(self, caller: Caller, request: ShippedOf) -> ShippedImage:
        """The shipped snapshot to boot VM `vm` from (tag `tag`, or the newest) and who holds it: what a rebuild
        of the VM on another node boots when its host is gone (`discovery.ve.shipped.restore_point`)."""
        ve = (await self._record(caller, request.name)).ve
        if request.vm not in ve.placement:
            raise NotFound(f"VE {ve.name!r} has no VM {request.vm!r}")
        try:
            found = restore_point(await self.shipped.get(ve), ve.name, request.vm, request.tag)
        except LookupError as err:
            raise NotFound(str(err)) from None
        return await self._shown(found)

    async def _shipped_list(self, ve: VERecord) -> dict[str, list[ShippedImage]]:
        """Each VM's shipped snapshots, oldest first, with their holders (`ve.snapshots`)."""
        found = await self.shipped.get(ve)
        return {vm: [await self._shown(s) for s in found.of(vm)] for vm in sorted(found.vms)}

    async def _shown(self, snapshot: ShippedSnapshot) -> ShippedImage:
        entry = await self.images.get(snapshot.image)
        return ShippedImage(snapshot.image, snapshot.digest, snapshot.time, dict(entry.holders) if entry else {})

    async def ship_due(self, attempted: MutableMapping[tuple[str, str], float]) -> None:
        """Ship each VM this node runs whose VE's policy says a snapshot is due (`attempted`: when each (VE
        incarnation, VM) last tried, so a failing one waits `snapshot_every` too). A failure is logged."""
        for name, vms in sorted(_local_vms(self.host.ledger.allocated).items()):
            stored = await self.directory.get(name)
            if stored is None:
                continue
            ve, policy = stored.ve, stored.ve.spec.ha
            if policy.mode != "restart" or policy.snapshot_every is None or ve.state != "running":
                continue
            shipped = await self.shipped.get(ve)
            for vm in sorted(vms):
                slot = ve.placement.get(vm)
                if slot is None or slot.node != self.node or slot.intents():  # a move, failover or rebuild
                    continue
                now = time.time()
                if not due(policy.snapshot_every, shipped.last(vm), attempted.get((ve.uid, vm)), now):
                    continue
                attempted[(ve.uid, vm)] = now
                try:
                    await self.ship(ve, vm, policy.keep or DEFAULT_KEEP)
                except (RequestError, RpcError) as err:
                    log.warning("shipped snapshot of %s/%s failed: %s", ve.name, vm, err)

    async def ship(self, ve: VERecord, vm: str, keep: int) -> ShippedVM:
        """One shipment of VM `vm` (the module docstring's steps); RequestError if no node besides its host
        could take it."""
        async with self._lock(f"{ve.name}/{vm}/shipping"):  # no VE is named so: one shipment of a VM at a time
            started, taken = time.perf_counter(), time.time()
            slot = ve.placement[vm]
            live = {m.name: m for m in self.membership.alive()}
            previous = (await self.shipped.get(ve)).last(vm)
            held = await self.images.get(previous.image) if previous is not None else None
            targets = ship_targets(slot.node, {n: m.site for n, m in live.items()}, held.holders if held else (),
                                   f"{ve.name}/{vm}")
            if not targets:
                raise RequestError(f"{ve.name}/{vm}: no live node besides its host {slot.node} to ship a snapshot to")
            name = image_name(ve.name, vm, taken)
            if previous is not None and previous.image == name:
                raise Conflict(f"{ve.name}/{vm} was shipped this second already ({name}); ship again in a second")
            made = await self._host(slot, "host.snapshot_image", {"name": domain_name(ve.name, vm), "image": name,
                                                                  "owner": ve.owner}, IMAGE_TIMEOUT)
            answers = await self.transport.call_many([live[n].addr for n in targets], "image.pull", {"name": name},
                                                     IMAGE_TIMEOUT)
            pulled = {n: a for n in targets if isinstance(a := answers[live[n].addr], dict)}
            if not pulled:
                failures = "; ".join(f"{n}: {answers[live[n].addr]}" for n in targets)
                raise RequestError(f"{ve.name}/{vm}: no node took snapshot {name} ({failures})")
            await self._keep_holders(name)
            snapshot = ShippedSnapshot(name, made["digest"], taken)
            shipped = await self.shipped.change(ve, lambda found: found.with_shipped(vm, snapshot))
            pruned = await self._prune(ve, vm, shipped, keep)
            sent = {n: a["fetched_bytes"] + made["manifest_bytes"] for n, a in pulled.items()}
            log.info("shipped %s (%d bytes to %s, paused %.3f s)", name, sum(sent.values()), ", ".join(sent),
                     made["paused"])
            return ShippedVM(await self._shown(snapshot), slot.node, sent, made["paused"],
                             round(time.perf_counter() - started, 3), pruned)

    async def _keep_holders(self, name: str) -> None:
        """From now on, upkeep keeps the snapshot on its host and REMOTE_HOLDERS more (or as many as it can)."""
        try:
            await self.images.replicate(name, 1 + REMOTE_HOLDERS)
        except (RequestError, RpcError) as err:  # fewer holders than asked: upkeep tries again
            log.info("snapshot %s: %s", name, err)

    async def _prune(self, ve: VERecord, vm: str, shipped: ShippedLog, keep: int) -> list[str]:
        """Remove `vm`'s snapshots beyond the newest `keep`, then unlist them; the images removed. One used as
        a VE's image stays (that VE's now) but is unlisted; one that cannot be removed now stays listed."""
        gone = []
        for old in shipped.beyond(vm, keep):
            try:
                await self.images.remove(old.image)
            except NotFound:
                pass
            except Conflict as err:
                log.info("shipped snapshot %s kept as an image: %s", old.image, err)
            except (RequestError, RpcError) as err:
                log.warning("shipped snapshot %s not pruned yet: %s", old.image, err)
                break
            gone.append(old.image)
        if gone:
            await self.shipped.change(ve, lambda found: found.without(vm, gone))
        return gone


def _local_vms(allocated: Iterable[str]) -> dict[str, list[str]]:
    """The VMs (VE -> VM names) whose room this node holds; a standby's key (with '/') is no VM here."""
    found: dict[str, list[str]] = defaultdict(list)
    for key in allocated:
        ve, colon, vm = key.partition(":")
        if colon and "/" not in key:
            found[ve].append(vm)
    return found


class Shipper(Actor):
    """Every SHIP_INTERVAL seconds, `Shipping.ship_due` for the VMs this node runs."""

    name = "ve-shipping"
    tick_interval = SHIP_INTERVAL

    def __init__(self, service: Shipping) -> None:
        super().__init__()
        self.service = service
        self.attempted: dict[tuple[str, str], float] = {}

    async def tick(self) -> None:
        if not self.service.joined():
            return  # not joined yet: the records are elsewhere
        try:
            await self.service.ship_due(self.attempted)
        except Exception as err:  # a background pass must not take the agent down; it runs again
            log.warning("shipping pass failed: %s", err)
