"""VE management from any node: the `ve.*` RPCs that the CLI calls on whichever agent it reaches.

The agent that receives a request coordinates it: it reads the VE record from the directory
(`discovery.ve.directory`: the agent's records, on the overlay the cluster is bound to, Chord's DHT or
Kademlia; the record's shape is `discovery.ve.records`), talks to the hosts of the VMs, and writes the
record back. Placement tries this node, then the nearest nodes with
room found by the spiral search (`agents.spiral`), then every other member by RTT; each VM is
reserved with a two-phase handshake (reserve on the target, then confirm). Creation is the sans-IO
transaction `discovery.ve.creating.Create`: a coordinator that dies half-way leaves reservations that
lapse by themselves and a `creating` record that the next command on the VE, a retried `ve create`, or
an agent's start-up recovery finishes or undoes (`CreateRecovery`), once that coordinator is abandoned.

This module holds creation, listing, the lifecycle verbs and the recovery of interrupted operations;
`VEService` gains relocation from `discovery.ve.relocation`, snapshots from `discovery.ve.snapshots`,
standby copies and failover from `discovery.ve.replicas`, the HA policy from `discovery.ve.policy`, and the
rebuild of VMs whose host is down from `discovery.ve.rebuilds`
(shared helpers in `discovery.ve.base`). Every
operation that changes a VE first finishes or undoes what an interrupted one left in its record
(`VEService._settle`), and holds a per-VE lock on the agent, so operations on one VE through one agent
never interleave.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from dataclasses import replace
from typing import Any

import trio

from agents.host.args import SHUTDOWN_TIMEOUT
from agents.messages import HOST_MIRRORS
from agents.runtime import Actor
from discovery.ve import addressing, creating
from discovery.ve import messages as m
from discovery.ve.base import HOST_TIMEOUT, MOVE_LEASE, domain_name, may_act
from discovery.ve.directory import Stored, Unreadable
from discovery.ve.driver import drive
from discovery.ve.index import Cursor, Entry
from discovery.ve.messages import RecordView
from discovery.ve.policy import Policies
from discovery.ve.protection import Mirror, assess, copy_state
from discovery.ve.rebuilds import Rebuilds
from discovery.ve.records import FailoverIntent, MoveIntent, NetState, RebuildIntent, Slot, VERecord, VEState, view
from discovery.ve.relocation import Relocation
from discovery.ve.snapshots import Snapshots
from discovery.ve.spec import SpecError, VESpec
from overlay.messages import NoArgs
from overlay.wire import codec
from overlay.wire.rpc import Caller, Conflict, Endpoint, NotFound, RequestError, RpcError

log = logging.getLogger(__name__)
RECOVERY_WINDOW = 120.0
"""How long after its start an agent keeps trying to settle the operations it left interrupted."""


class VEService(Relocation, Snapshots, Policies, Rebuilds):
    """The `ve.*` methods (the interfaces it is given: `VEBase`)."""

    def serve(self, endpoint: Endpoint) -> None:
        """Route the methods this service serves; the composition place calls it (`discovery.agent`)."""
        endpoint.route(m.VE_CREATE, self._on_create)
        endpoint.route(m.VE_LIST, self._on_list)
        endpoint.route(m.VE_SHOW, self._on_show)
        endpoint.route(m.VE_LOCATE, self._on_locate)
        endpoint.route(m.VE_START, self._on_start)
        endpoint.route(m.VE_STOP, self._on_stop)
        endpoint.route(m.VE_SUSPEND, self._on_suspend)
        endpoint.route(m.VE_RESUME, self._on_resume)
        endpoint.route(m.VE_DESTROY, self._on_destroy)
        endpoint.route(m.VE_RELOCATE, self._on_relocate)
        endpoint.route(m.VE_SNAPSHOT, self._on_snapshot)
        endpoint.route(m.VE_SNAPSHOTS, self._on_snapshots)
        endpoint.route(m.VE_RESTORE, self._on_restore)
        endpoint.route(m.VE_SNAPSHOT_DELETE, self._on_snapshot_delete)
        endpoint.route(m.VE_SHIP, self._on_ship)
        endpoint.route(m.VE_RESTORE_POINT, self._on_restore_point)
        endpoint.route(m.VE_REPLICATE, self._on_replicate)
        endpoint.route(m.VE_HA, self._on_ha)
        endpoint.route(m.VE_FAILOVER, self._on_failover)
        endpoint.route(m.VE_REBUILD, self._on_rebuild)
        endpoint.route(m.VE_BUSY, self._on_busy)
        endpoint.route(m.VE_FORWARD, self._on_forward)

    # -- create ------------------------------------------------------------------------------------

    async def _on_create(self, caller: Caller, request: m.Create) -> RecordView:
        """Create the VE `spec` describes; its steps are the transaction `discovery.ve.creating.Create`. The
        VE's lock is held throughout, so this agent answers busy to agents that meet its `creating` record.
        Then the standby copies its HA policy asks for, if any: a shortfall degrades the VE, it does not undo
        it (`discovery.ve.policy`)."""
        try:
            spec = VESpec.from_dict(request.spec)
        except SpecError as err:
            raise RequestError(str(err)) from None
        await self.image_holders(spec)  # an image the catalogue lacks: refused before anything is claimed
        uid = uuid.uuid4().hex
        try:
            subnets = addressing.subnets(spec)
            nics = addressing.nics(spec, uid, subnets)
        except addressing.AddressingError as err:
            raise RequestError(str(err)) from None
        async with self._lock(spec.name):
            vnis = await self.vnis.claim(spec.name, uid, subnets)
            networks = {name: NetState(vnis[name], subnet) for name, subnet in subnets.items()}
            ve = VERecord(spec.name, spec, caller.cn, "creating", {}, self.node, time.time(), uid,
                          networks=networks, nics=nics)
            try:
                try:
                    record, _ = await self._drive(creating.Create(ve), Stored(ve, 0))
                except Conflict:
                    if not await self._undid_left_create(spec.name):
                        raise
                    record, _ = await self._drive(creating.Create(ve), Stored(ve, 0))
            except (RequestError, RpcError):
                if await self.directory.get(spec.name) is None:  # rolled back: nothing uses them
                    await self.vnis.release(spec.name, uid, vnis)
                raise
            record = await self._protect(record)
        self.events.note("ve_created", spec.name, f"{len(spec.vms)} VMs by {caller.cn}")
        return view(record.ve)

    async def _undid_left_create(self, name: str) -> bool:
        """Whether VE `name` was only a create left unfinished by a coordinator that is gone, now undone: a
        `ve create` retried after its coordinator died may then go on. False if the name is taken otherwise,
        or that create is still at work or cannot be settled now."""
        try:
            record = await self.directory.get(name)
            if record is None or record.ve.state != "creating":
                return False
            await self._check_unattended(record.ve)
            await self._recover_create(record)
        except NotFound:
            return True
        except (RequestError, RpcError) as err:
            log.info("VE %s: a create left unfinished is not settled yet: %s", name, err)
        return False

    async def _drive(self, core: creating.Create | creating.CreateRecovery, record: Stored) -> tuple[Stored, Any]:
        """Drive a create or its recovery, then log what went wrong on the way without stopping it."""
        try:
            return await drive(core, record, self.transport, self.directory, self._candidates)
        finally:
            for note in core.notes:
                log.info("VE %s: %s", record.ve.name, note)

    # -- read --------------------------------------------------------------------------------------

    async def _on_list(self, caller: Caller, request: m.ListPage) -> m.Page:
        """One page of the caller's VEs (every VE for an operator, like `openstack server list
        --all-projects`), from the index in the DHT (`discovery.ve.index`): `limit` VEs at most, after
        `cursor` (a previous page's `next_cursor`); `next_cursor` is None on the last page. A record this
        agent cannot read (a newer format) is left out, and logged."""
        cursor = Cursor.parse(request.cursor)

        def wanted(entry: Entry) -> bool:
            return caller.role == "operator" or entry.owner == caller.cn

        records, cursor = await self.directory.index.listing(request.limit, cursor, wanted)
        ves = []
        for record in records:
            try:
                ve = self.directory.decode(record).ve
            except Unreadable as err:
                log.warning("ve list: %s", err)
                continue
            if may_act(caller, ve):
                ves.append(view(ve))
        return m.Page(ves, cursor.encode() if cursor else None)

    async def _on_show(self, caller: Caller, request: m.Named) -> RecordView:
        """The VE as its record has it (and its version in the directory), with the state of each VM's domain
        and whether each standby copy is held, as their hosts answer, and each VM's protection
        (`discovery.ve.protection`)."""
        record = await self._record(caller, request.name)
        ve = record.ve
        shown = {**view(ve), "version": record.version}
        for vm_name, slot in ve.placement.items():
            try:
                info = await self.transport.call(slot.addr, "host.vm.info", {
                    "name": domain_name(ve.name, vm_name)}, timeout=5)
                state = info["state"]
            except RpcError as err:
                state = f"unknown ({err})"
            shown["placement"][vm_name]["domain_state"] = state
        addrs = sorted({e.addr for copies in ve.standbys.values() for e in copies})
        held = await self.transport.call_many(addrs, "host.standbys", {}, 5.0) if addrs else {}
        states = {vm: [copy_state(held.get(e.addr), domain_name(ve.name, vm)) for e in copies]
                  for vm, copies in ve.standbys.items()}
        for vm_name, answered in states.items():
            for shown_entry, state in zip(shown["replicas"][vm_name], answered, strict=True):
                shown_entry["standby"] = state
        shipped = await self.shipped.get(ve)
        last = {vm: s for vm in ve.placement if (s := shipped.last(vm)) is not None}
        shown["protection"] = codec.encode(assess(ve, states, time.time(), last, await self._mirrors(ve)))
        return shown

    async def _mirrors(self, ve: VERecord) -> dict[str, Mirror]:
        """The mirror of each VM's disk its host keeps (`host.mirrors`), for a VE that replicates; a host that
        does not answer shows none."""
        if ve.spec.ha.mode != "standby" or ve.spec.ha.replication == "off" or not ve.standbys:
            return {}
        addrs = sorted({slot.addr for slot in ve.placement.values()})
        answers = await self.transport.ask_many(addrs, HOST_MIRRORS, NoArgs(), 5.0)
        kept = {s.name: s for answer in answers.values() if isinstance(answer, list) for s in answer}
        return {vm: Mirror(s.node, s.state, s.lag, s.held) for vm in ve.placement
                if (s := kept.get(domain_name(ve.name, vm))) is not None}

    async def _on_locate(self, caller: Caller, request: m.Named) -> m.Located:
        """Where each VM runs, from the directory alone (no host is asked): `ve show` asks the hosts."""
        ve = (await self._record(caller, request.name)).ve
        vms = {}
        for vm, slot in sorted(ve.placement.items()):
            moving, failing, rebuilding = slot.moving_to, slot.failing_over, slot.rebuilding
            vms[vm] = m.Location(
                slot.node, slot.site, slot.addr, m.MovingTo(moving.node, moving.site, moving.phase) if moving else None,
                m.FailingOverTo(failing.node, failing.site, failing.source) if failing else None,
                m.RebuildingOn(rebuilding.node, rebuilding.site, rebuilding.source) if rebuilding else None,
                [m.CopyAt(e.node, e.site, e.taken) for e in ve.standbys_of(vm)] or None)
        return m.Located(ve.name, ve.state, vms)

    # -- lifecycle ---------------------------------------------------------------------------------

    async def _on_start(self, caller: Caller, request: m.Named) -> RecordView:
        return await self._apply(caller, request.name, "host.vm.start", "running")

    async def _on_stop(self, caller: Caller, request: m.Stop) -> RecordView:
        """Shut every VM down gracefully, each forced off after `timeout` seconds (default and bounds:
        `agents.host.args`), or force them off at once with `force`. Either way the VE is recorded stopped and
        each host persists its VM off, so a restart of a host does not bring it back."""
        if request.force:
            return await self._apply(caller, request.name, "host.vm.destroy", "stopped")
        timeout = request.timeout if request.timeout is not None else SHUTDOWN_TIMEOUT
        return await self._apply(caller, request.name, "host.vm.stop", "stopped", timeout=timeout)

    async def _on_suspend(self, caller: Caller, request: m.Named) -> RecordView:
        return await self._apply(caller, request.name, "host.vm.suspend", "suspended")

    async def _on_resume(self, caller: Caller, request: m.Named) -> RecordView:
        return await self._apply(caller, request.name, "host.vm.resume", "running")

    async def _on_destroy(self, caller: Caller, request: m.Named) -> RecordView:
        """Undefine every VM (and the copy an interrupted move, failover or rebuild may have left at its target),
        delete the record, then free the VMs' standby copies; its index entry is removed after the answer
        (`Unindexing`). Refused while another agent is relocating, failing over or snapshotting the VE."""
        async with self._locked(caller, request.name, settle=False) as record:
            ve = record.ve
            await self._check_unattended(ve)
            await self._on_every_vm(ve, "host.vm.undefine")
            await self.directory.delete(ve.name, after=record)
            self.unindexing.tell_nowait(Entry(ve.name, ve.owner, ve.uid))
            await self.vnis.release(ve.name, ve.uid, {name: net.vni for name, net in ve.networks.items()})
            await self._unstandby(ve.name, ve.standbys)
        self.events.note("ve_destroyed", ve.name, f"by {caller.cn}")
        return {**view(ve), "state": "destroyed"}

    async def _apply(self, caller: Caller, name: str, method: str, state: VEState, **extra: Any) -> RecordView:
        async with self._locked(caller, name) as record:
            await self._on_every_vm(record.ve, method, **extra)
            ve = replace(record.ve, state=state)
            await self.directory.put(ve, after=record)
        return view(ve)

    async def _on_every_vm(self, ve: VERecord, method: str, **extra: Any) -> None:
        """Run `method` (a `host.vm.*` verb, with `extra` arguments) on every VM's host at once; each is tried,
        and any failure is reported. `undefine` also reaches the target of an interrupted move or failover. Hosts run
        operations on different VMs side by side (a lock per VM), so each call is given HOST_TIMEOUT plus
        the graceful stop's own `timeout`, whatever else its host is doing."""
        places: list[tuple[str, Slot | MoveIntent | FailoverIntent | RebuildIntent]] = list(ve.placement.items())
        if method == "host.vm.undefine":
            places += [(vm, i) for vm, slot in ve.placement.items() for i in slot.intents()]
        wait = float(extra.get("timeout", 0.0))
        failures = []

        async def one(vm_name: str, where: Slot | MoveIntent | FailoverIntent | RebuildIntent) -> None:
            try:
                await self.transport.call(where.addr, method, {
                    "name": domain_name(ve.name, vm_name), **extra},
                    timeout=HOST_TIMEOUT + wait)
            except RpcError as err:
                failures.append(f"{vm_name} on {where.node}: {err}")

        async with trio.open_nursery() as nursery:
            for vm_name, where in places:
                nursery.start_soon(one, vm_name, where)
        if failures:
            raise RequestError(f"{method.removeprefix('host.vm.')} failed for " + "; ".join(sorted(failures)))

    # -- recovery of interrupted operations ------------------------------------------------------------

    async def _settle(self, record: Stored) -> Stored:
        """Finish or undo what an interrupted create, relocations, failovers, rebuilds or a snapshot left in the record,
        before an operation changes the VE; Conflict if the agent that started them is still at work, NotFound
        if the VE's create was undone."""
        name = record.ve.name
        await self._check_unattended(record.ve)
        if record.ve.state == "creating":
            record = await self._recover_create(record)
        for vm in sorted(record.ve.placement):
            slot = record.ve.placement[vm]
            for what, left, finish_or_undo in (("move", slot.moving_to, self._recover_move),
                                               ("failover", slot.failing_over, self._recover_failover),
                                               ("rebuild", slot.rebuilding, self._recover_rebuild)):
                if left is None:
                    continue
                try:
                    record, _ = await finish_or_undo(record, vm)
                except RequestError as err:
                    raise RequestError(f"VE {name!r} has an interrupted {what} of {vm} to {left.node} that "
                                       f"cannot be settled yet: {err}") from None
        if record.ve.snapshotting is not None:
            record = await self._finish_snapshot(record)
        return record

    async def _recover_create(self, record: Stored) -> Stored:
        """Finish or undo the create that left the record `creating` (`discovery.ve.creating.CreateRecovery`);
        NotFound if it was undone, RequestError (the record left) if a host cannot be asked or undefine."""
        ve = record.ve
        try:
            record, finished = await self._drive(creating.CreateRecovery(ve), record)
        except RequestError as err:
            raise RequestError(f"VE {ve.name!r} was left half-created by {ve.coordinator}, and that cannot be "
                               f"settled yet: {err}") from None
        log.info("create of %s left by %s %s", ve.name, ve.coordinator, "finished" if finished else "undone")
        if not finished:
            raise NotFound(f"no VE named {ve.name!r}: its create, left unfinished by {ve.coordinator}, was rolled back")
        return record

    async def _check_unattended(self, ve: VERecord) -> None:
        """Conflict unless every operation the record shows under way (its create, moves, failovers, a
        snapshot) is abandoned (`_check_abandoned`)."""
        for coordinator, since, what in under_way(ve):
            await self._check_abandoned(ve.name, coordinator, since, what)

    async def _check_abandoned(self, name: str, coordinator: str, since: float, what: str) -> None:
        """Conflict unless the operation `what` that `coordinator` started at `since` is abandoned: its
        coordinator is this agent (which holds the VE's lock, so runs nothing else on it), is not a live
        member, answers that it is not working on the VE, or cannot be asked and started it more than
        MOVE_LEASE ago."""
        if coordinator == self.node:
            return
        member = next((m for m in self.membership.alive() if m.name == coordinator), None)
        if member is None:
            return
        age = time.time() - since
        try:
            busy = await self.transport.call(member.addr, "ve.busy", {"name": name}, timeout=5)
        except RpcError:
            busy = age < MOVE_LEASE
        if busy:
            raise Conflict(f"{coordinator} is {what} (for {age:.0f} s); try again shortly")

    async def _on_busy(self, caller: Caller, request: m.Named) -> bool:
        """Whether this agent is running an operation on VE `name` (agents ask before settling an intent)."""
        lock = self._locks.get(request.name)
        return lock is not None and lock.locked()

    async def _on_forward(self, caller: Caller, request: m.Named) -> bool:
        """VE `name`'s VMs moved: this host's forwarding entries follow now, not at their next pass (an agent that
        carries no VE networks has none)."""
        if self.forwarding is not None:
            self.forwarding.tell_nowait(request.name)
        return True

    async def recover_abandoned(self) -> int:
        """Settle every VE whose record holds an abandoned operation, and index the VEs the index lacks (a
        creator died between the record and its entry); returns how many are left unsettled."""
        left = 0
        ves = [r.ve for r in await self.directory.scan()]
        try:
            await self.directory.index.ensure(Entry(ve.name, ve.owner, ve.uid) for ve in ves)
        except (RequestError, RpcError) as err:
            left += 1
            log.warning("could not check the VE index yet: %s", err)
        for found in ves:
            if not under_way(found):
                continue
            async with self._lock(found.name):
                try:
                    record = await self.directory.get(found.name)
                    if record is not None:
                        await self._settle(record)
                    else:  # listed, but not read: just after a start, the ring may not hold it yet for us
                        left += 1
                except (Conflict, NotFound):
                    pass  # its coordinator is at work; or its create was undone, or it was destroyed meanwhile
                except (RequestError, RpcError) as err:
                    left += 1
                    log.warning("interrupted operation on VE %s not settled yet: %s", found.name, err)
        return left


def under_way(ve: VERecord) -> list[tuple[str, float, str]]:
    """The operations the record shows under way: (coordinator, since when, what it is doing)."""
    found = [(ve.coordinator, ve.created, f"creating VE {ve.name!r}")] if ve.state == "creating" else []
    for intent in ve.intents():
        if isinstance(intent, MoveIntent):
            what = f"moving a VM to {intent.node}"
        elif isinstance(intent, FailoverIntent):
            what = f"failing a VM over to {intent.node}"
        elif isinstance(intent, RebuildIntent):
            what = f"rebuilding a VM on {intent.node}"
        else:
            what = f"taking snapshot {intent.tag}"
        found.append((intent.coordinator, intent.since, f"{what} for VE {ve.name!r}"))
    return found


class Recovery(Actor):
    """After the agent starts, settle the operations left interrupted in VE records (by this agent before
    a crash, or by an agent that is gone), without waiting for the next command on each VE: a VM must not
    stay frozen, or defined at two places, because its coordinator died. Retries every few seconds while
    some are left (a host still unreachable), for RECOVERY_WINDOW seconds."""

    name = "ve-recovery"
    tick_interval = 2.0

    def __init__(self, service: VEService) -> None:
        super().__init__()
        self.service = service
        self.deadline: float | None = None

    async def tick(self) -> None:
        now = trio.current_time()
        if self.deadline is None:
            self.deadline = now + RECOVERY_WINDOW
        if not self.service.joined() and now < self.deadline:
            return  # not joined yet: the records are elsewhere
        try:
            left = await self.service.recover_abandoned()
        except Exception as err:  # a background pass must not take the agent down; it is tried again
            log.warning("recovery pass failed: %s", err)
            left = 1
        if left == 0 or now >= self.deadline:
            self.tick_interval = math.inf
