"""VE management from any node: the `ve.*` RPCs that the CLI calls on whichever agent it reaches.

The agent that receives a request coordinates it: it reads the VE record from the directory
(`discovery.ve.directory`: the agent's records, on the overlay the cluster is bound to, Chord's DHT or
Kademlia; the record's shape is `discovery.ve.records`), talks to the hosts of the VMs, and writes the
record back. Placement tries this node, then the nearest nodes with
room found by the spiral search (`agents.spiral`), then every other member by RTT; each VM is
reserved with a two-phase handshake (reserve on the target, then confirm), so a coordinator that
dies half-way leaves only reservations that lapse by themselves.

This module holds creation, listing, the lifecycle verbs and the recovery of interrupted operations;
`VEService` gains relocation from `discovery.ve.relocation`, snapshots from `discovery.ve.snapshots`, and
standby copies and failover from `discovery.ve.replicas` (shared helpers in `discovery.ve.base`). Every
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
from agents.runtime import Actor
from discovery.ve import messages as m
from discovery.ve import placement as planner
from discovery.ve.base import HOST_TIMEOUT, MOVE_LEASE, Candidate, domain_name, may_act
from discovery.ve.directory import Stored, Unreadable
from discovery.ve.index import Cursor, Entry
from discovery.ve.messages import RecordView
from discovery.ve.records import FailoverIntent, Intent, MoveIntent, Slot, VERecord, VEState, view
from discovery.ve.relocation import Relocation
from discovery.ve.replicas import Replicas
from discovery.ve.snapshots import Snapshots
from discovery.ve.spec import NO_CONSTRAINTS, SpecError, VESpec
from overlay.dht import WriteConflict
from overlay.wire.rpc import Caller, Conflict, Endpoint, RequestError, RpcError

log = logging.getLogger(__name__)
MAX_REPLANS = 3
CLAIM_ATTEMPTS = 3
"""Reads and conditional writes of a new VE's name before giving up (each loss means someone wrote it)."""
RECOVERY_WINDOW = 120.0
"""How long after its start an agent keeps trying to settle the operations it left interrupted."""


class VEService(Relocation, Snapshots, Replicas):
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
        endpoint.route(m.VE_REPLICATE, self._on_replicate)
        endpoint.route(m.VE_FAILOVER, self._on_failover)
        endpoint.route(m.VE_BUSY, self._on_busy)

    # -- create ------------------------------------------------------------------------------------

    async def _on_create(self, caller: Caller, request: m.Create) -> RecordView:
        """Claim the name first (a conditional write of the record, `creating` with no VM placed, that a
        majority of its replicas decides: of concurrent creates of one name exactly one wins, and the
        others reserve nothing), index it, then place, reserve, write the placement, confirm each host."""
        try:
            spec = VESpec.from_dict(request.spec)
        except SpecError as err:
            raise RequestError(str(err)) from None
        entry = Entry(spec.name, caller.cn, uuid.uuid4().hex)
        ve = VERecord(spec.name, spec, caller.cn, "creating", {}, self.node, time.time(), entry.uid)
        claimed = await self._claim(ve)
        try:
            await self.directory.index.add(entry)
            placement, tokens = await self._place(spec)
        except (RequestError, RpcError):
            await self._undo(spec, {}, {}, entry)
            raise
        ve = replace(ve, placement=placement)
        try:
            stored = await self.directory.put(ve, after=claimed.version)
            await self._confirm_all(placement, tokens)
        except (RequestError, RpcError) as err:
            await self._undo(spec, placement, tokens, entry)
            raise RequestError(f"creating {spec.name} failed and was rolled back: {err}") from None
        ve = replace(ve, state="running")
        await self.directory.put(ve, after=stored.version)
        return view(ve)

    async def _confirm_all(self, placement: dict[str, Slot], tokens: dict[str, str]) -> None:
        """Confirm every VM's reservation (its host starts it), all at once: one after the other, the last
        would wait for every earlier VM to start, and a reservation lapses after RESERVATION_TTL (a real
        guest can take that long to start on a loaded host). Each token leaves `tokens` as it is sent;
        RequestError naming every VM that failed."""
        failures = []

        async def confirm(vm_name: str, slot: Slot, token: str) -> None:
            try:
                await self.transport.call(slot.addr, "host.confirm", {"token": token}, timeout=HOST_TIMEOUT)
            except RpcError as err:
                failures.append(f"{vm_name} on {slot.node}: {err}")

        async with trio.open_nursery() as nursery:
            for vm_name, slot in placement.items():
                nursery.start_soon(confirm, vm_name, slot, tokens.pop(vm_name))
        if failures:
            raise RequestError("; ".join(sorted(failures)))

    async def _claim(self, ve: VERecord) -> Stored:
        """Write the new VE's first record if its name is free: compare-and-set against the newest record
        read (none, or a tombstone), read again after a lost race; Conflict if the name is taken."""
        for _ in range(CLAIM_ATTEMPTS):
            current, live = await self.directory.newest(ve.name)
            if live is not None:
                raise Conflict(f"a VE named {ve.name!r} already exists")
            try:
                return await self.directory.put_if(ve, current)
            except WriteConflict:
                continue
        raise Conflict(f"VE {ve.name!r} kept changing while being created (or a replica is still checking "
                       "copies it held before a long absence); try again in a few seconds")

    async def _place(self, spec: VESpec) -> tuple[dict[str, Slot], dict[str, str]]:
        """Plan where each VM goes (`discovery.ve.placement`: capacity and constraints, nearest first), then
        reserve every VM on its node; all or nothing. The plan first uses this node and the nodes the
        spiral found; if that cannot work, every live member (asked for its free room). A node that
        refuses a reservation (someone else took the room meanwhile) is left out and the plan made again.
        Returns placement and tokens."""
        candidates = await self._candidates(spec, everyone=False)
        widened = False
        excluded: set[str] = set()
        for _ in range(1 + MAX_REPLANS):
            result = planner.plan(spec, [c.offer(rank) for rank, c in enumerate(candidates) if c.free],
                                    exclude=excluded)
            if isinstance(result, planner.Refusal):
                if widened:
                    raise RequestError(f"cannot place {spec.name}: {result}")
                candidates, widened = await self._candidates(spec, everyone=True), True
                continue
            by_name = {c.member.name: c for c in candidates}
            placement, tokens, refused = await self._reserve_plan(spec, result, by_name, candidates)
            if refused is None:
                return placement, tokens
            excluded.add(refused)
        raise RequestError(f"cannot place {spec.name}: nodes kept refusing reservations ({', '.join(excluded)})")

    async def _reserve_plan(self, spec: VESpec, plan: planner.Plan, by_name: dict[str, Candidate],
                            ranked: list[Candidate]) -> tuple[dict[str, Slot], dict[str, str], str | None]:
        """Reserve each VM on its planned node; on a refusal release them all and name the node."""
        vms = {vm.name: vm for vm in spec.vms}
        order = [c.member.name for c in ranked]
        placement: dict[str, Slot] = {}
        tokens: dict[str, str] = {}
        for vm_name, node in plan.assignment.items():
            candidate, vm = by_name[node], vms[vm_name]
            try:
                answer = await self.transport.call(candidate.member.addr, "host.reserve", {
                    "name": domain_name(spec.name, vm.name), "vcpus": vm.vcpus, "memory_mb": vm.memory_mb,
                    "disk_gb": vm.disk_gb})
            except RpcError as err:
                log.info("reservation of %s on %s refused: %s; planning again without it", vm_name, node, err)
                await self._release(placement, tokens)
                return {}, {}, node
            nearer = order.index(node)
            why = f"nearest with room ({candidate.describe(self.node)}"
            if nearer:
                constrained = spec.constraints != NO_CONSTRAINTS
                why += f"; {nearer} nearer full" + (" or ruled out by constraints" if constrained else "")
            why += ")"
            if spec.site:
                why = f"in site {spec.site}, {why}"
            placement[vm_name] = Slot(node, candidate.member.addr, candidate.member.site, candidate.rtt_ms, why)
            tokens[vm_name] = answer["token"]
        return placement, tokens, None

    async def _release(self, placement: dict[str, Slot], tokens: dict[str, str]) -> None:
        for vm_name, token in tokens.items():
            await self.transport.call_many([placement[vm_name].addr], "host.release", {"token": token})

    async def _undo(self, spec: VESpec, placement: dict[str, Slot], tokens: dict[str, str], entry: Entry) -> None:
        """Roll a failed create back: drop unconfirmed reservations, remove started VMs, delete the record,
        then its index entry."""
        await self._release(placement, tokens)
        for vm_name, slot in placement.items():
            await self.transport.call_many([slot.addr], "host.vm.undefine", {"name": domain_name(spec.name, vm_name)})
        try:
            await self.directory.delete(spec.name)
        except (RequestError, RpcError) as err:
            log.warning("could not delete the record of failed VE %s: %s", spec.name, err)
            return  # the entry stays with the record it lists
        await self._unindex(entry.name, entry.uid)

    async def _unindex(self, name: str, uid: str) -> None:
        """Remove a deleted VE's index entry; if that fails, the next `ve list` that meets it does."""
        try:
            await self.directory.index.remove(name, uid)
        except (RequestError, RpcError) as err:
            log.warning("could not remove VE %s from the index yet: %s", name, err)

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
        and whether each standby copy is held, as their hosts answer."""
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
        for vm_name, copies in ve.standbys.items():
            domain = domain_name(ve.name, vm_name)
            for entry, shown_entry in zip(copies, shown["replicas"][vm_name], strict=True):
                answer = held.get(entry.addr)
                if isinstance(answer, list):
                    shown_entry["standby"] = "held" if any(s["name"] == domain for s in answer) else "missing"
                else:
                    shown_entry["standby"] = f"unknown ({answer})"
        return shown

    async def _on_locate(self, caller: Caller, request: m.Named) -> m.Located:
        """Where each VM runs, from the directory alone (no host is asked): `ve show` asks the hosts."""
        ve = (await self._record(caller, request.name)).ve
        vms = {}
        for vm, slot in sorted(ve.placement.items()):
            moving, failing = slot.moving_to, slot.failing_over
            vms[vm] = m.Location(
                slot.node, slot.site, slot.addr, m.MovingTo(moving.node, moving.site, moving.phase) if moving else None,
                m.FailingOverTo(failing.node, failing.site, failing.source) if failing else None,
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
        """Undefine every VM (and the copy an interrupted move or failover may have left at its target),
        delete the record, then free the VMs' standby copies. Refused while another agent is relocating,
        failing over or snapshotting the VE."""
        async with self._locked(caller, request.name, settle=False) as record:
            ve = record.ve
            for intent in ve.intents():
                await self._check_abandoned(ve.name, intent)
            await self._on_every_vm(ve, "host.vm.undefine")
            await self.directory.delete(ve.name, after=record.version)
            await self._unindex(ve.name, ve.uid)
            await self._unstandby(ve.name, ve.standbys)
        return {**view(ve), "state": "destroyed"}

    async def _apply(self, caller: Caller, name: str, method: str, state: VEState, **extra: Any) -> RecordView:
        async with self._locked(caller, name) as record:
            await self._on_every_vm(record.ve, method, **extra)
            ve = replace(record.ve, state=state)
            await self.directory.put(ve, after=record.version)
        return view(ve)

    async def _on_every_vm(self, ve: VERecord, method: str, **extra: Any) -> None:
        """Run `method` (a `host.vm.*` verb, with `extra` arguments) on every VM's host at once; each is tried,
        and any failure is reported. `undefine` also reaches the target of an interrupted move or failover. Hosts run
        operations on different VMs side by side (a lock per VM), so each call is given HOST_TIMEOUT plus
        the graceful stop's own `timeout`, whatever else its host is doing."""
        places: list[tuple[str, Slot | MoveIntent | FailoverIntent]] = list(ve.placement.items())
        if method == "host.vm.undefine":
            places += [(vm, i) for vm, slot in ve.placement.items() for i in (slot.moving_to, slot.failing_over)
                       if i is not None]
        wait = float(extra.get("timeout", 0.0))
        failures = []

        async def one(vm_name: str, where: Slot | MoveIntent | FailoverIntent) -> None:
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
        """Finish or undo what interrupted relocations, failovers or a snapshot left in the record, before an
        operation changes the VE; Conflict if the agent that started them is still at work."""
        name = record.ve.name
        for intent in record.ve.intents():
            await self._check_abandoned(name, intent)
        for vm in sorted(record.ve.placement):
            slot = record.ve.placement[vm]
            for what, left, finish_or_undo in (("move", slot.moving_to, self._recover_move),
                                               ("failover", slot.failing_over, self._recover_failover)):
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

    async def _check_abandoned(self, name: str, intent: Intent) -> None:
        """Conflict unless the operation that wrote `intent` is abandoned: its coordinator is this agent
        (which holds the VE's lock, so runs nothing else on it), is not a live member, answers that it is
        not working on the VE, or cannot be asked and wrote the intent more than MOVE_LEASE ago."""
        coordinator = intent.coordinator
        if coordinator == self.node:
            return
        member = next((m for m in self.membership.alive() if m.name == coordinator), None)
        if member is None:
            return
        age = time.time() - intent.since
        try:
            busy = await self.transport.call(member.addr, "ve.busy", {"name": name}, timeout=5)
        except RpcError:
            busy = age < MOVE_LEASE
        if busy:
            if isinstance(intent, MoveIntent):
                what = f"moving a VM to {intent.node}"
            elif isinstance(intent, FailoverIntent):
                what = f"failing a VM over to {intent.node}"
            else:
                what = f"taking snapshot {intent.tag}"
            raise Conflict(f"{coordinator} is {what} for VE {name!r} (for {age:.0f} s); try again shortly")

    async def _on_busy(self, caller: Caller, request: m.Named) -> bool:
        """Whether this agent is running an operation on VE `name` (agents ask before settling an intent)."""
        lock = self._locks.get(request.name)
        return lock is not None and lock.locked()

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
            if not found.intents():
                continue
            async with self._lock(found.name):
                try:
                    record = await self.directory.get(found.name)
                    if record is not None:
                        await self._settle(record)
                    else:  # listed, but not read: just after a start, the ring may not hold it yet for us
                        left += 1
                except Conflict:
                    pass  # its coordinator is at work
                except (RequestError, RpcError) as err:
                    left += 1
                    log.warning("interrupted operation on VE %s not settled yet: %s", found.name, err)
        return left


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
