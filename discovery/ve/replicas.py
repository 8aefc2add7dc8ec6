"""Standby copies of a VE's VMs (`ve replicate`) and failover onto them (`ve failover`).

A standby of a VM is what relocation would carry (its domain XML and snapshots, exported without freezing
the VM), kept by another node that holds the VM's room for it (`agents.host.standby`), so a failover onto
it never lacks room. The record lists the copies, `replicas: {vm: (Standby(node, addr, site, taken),
...)}` (`discovery.ve.records`), and how many were asked per VM (`copies`). Copies go to distinct nodes
other than the VM's, in other sites first (a site outage is what they are for), then nearest to the VM;
inside the site a VE is pinned to, if it is. They are as fresh as their `taken`: running `ve replicate`
again exports again.

A failover promotes a standby into the VM where the VM's host is down. As for a move, the intent
(`failing_over` in the VM's slot) is written before any host is touched, and recovery decides from the
hosts: if the standby's node holds the domain the failover goes forward, otherwise it is undone (the copy
stays a standby). Its steps and that rule are the sans-IO transaction `discovery.ve.failovers`; this module
chooses what fails over where, and drives it. The old host is down, or (forced) its copy is switched off
first, so the VM runs at one place while this happens. A host that comes back still has its old copy:
`Fencing` removes it as soon as that host reads the record placing the VM on a node that holds it, and
drops the standbys it keeps that the record no longer lists (dropped while it could not be told).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from agents.host.capacity import Resources
from agents.runtime import Actor
from discovery.ve.base import VEBase, domain_name
from discovery.ve.directory import Stored, Unreadable
from discovery.ve.driver import drive
from discovery.ve.failovers import Failover, FailoverRecovery
from discovery.ve.messages import FailoverRequest, RecordView, Replicate
from discovery.ve.records import Shortfall, Slot, Standby, VERecord, view
from overlay.dht import Record
from overlay.membership import Member
from overlay.wire.rpc import Caller, Conflict, RequestError, RpcError
from vivaldi.coordinate import estimate

log = logging.getLogger(__name__)
FENCE_INTERVAL = 5.0


@dataclass(frozen=True)
class Kept:
    """What `Replicas._keep_copies` did: the record it wrote, the nodes of the copies it added and dropped
    (by VM), and the copies it could not make ("" if none: else one line, `vm on node: why; ...`)."""

    record: Stored
    added: dict[str, list[str]]
    dropped: dict[str, list[str]]
    failures: str

    def answer(self) -> RecordView:
        """The VE as `ve replicate` and `ve ha` answer: its record, and the copies added and dropped."""
        return {**view(self.record.ve), "added": self.added, "dropped": self.dropped}


class Replicas(VEBase):
    """`ve.replicate` and `ve.failover`, the recovery of a failover left unfinished, and fencing."""

    # -- replicate -------------------------------------------------------------------------------------

    async def _on_replicate(self, caller: Caller, request: Replicate) -> RecordView:
        """Keep `copies` standby copies of every VM of the VE (0 drops them all): `_keep_copies`. Refused if
        the VE's HA policy keeps another number (`ve ha` changes that); if some copies could not be made, the
        others are kept and the refusal names those."""
        async with self._locked(caller, request.name) as record:
            ha = record.ve.spec.ha
            if ha.mode == "standby" and request.copies != ha.copies:
                raise RequestError(f"VE {record.ve.name!r} keeps {ha.copies} standby copies of each VM by its HA "
                                   f"policy; change the policy instead (discovery ve ha {record.ve.name} --mode "
                                   "standby --copies K)")
            kept = await self._keep_copies(record, request.copies)
        if kept.failures:
            raise RequestError(f"some standby copies of {record.ve.name} could not be made ({kept.failures}); "
                               "the others are kept, run replicate again")
        return kept.answer()

    async def _keep_copies(self, record: Stored, copies: int) -> Kept:
        """Keep `copies` standby copies of every VM of `record.ve`, written as it is apart from its copies (a
        caller passes the changes to write with them, a new HA policy, against `record.version`). Copies
        already there are refreshed (exported again); those on nodes that are gone, or that lost them, are
        made again elsewhere; extra ones are dropped, least preferred first. If the copies cannot all be
        placed, RequestError naming the VM and why, before the record changes.

        Order: new copies are reserved, then listed in the record, then confirmed with the exported data,
        so a coordinator that dies leaves reservations that lapse or a listed copy that `ve show` reports
        missing, never room held that nothing lists. Dropped copies leave the record before their nodes
        free them, for the same reason. Copies that could not be confirmed leave the record again, and (HA
        policy `standby`) the record's `shortfall` says why; a full success clears it."""
        ve = record.ve
        alive = {m.name: m for m in self.membership.alive()}
        keep: dict[str, list[Standby]] = {}
        drop: dict[str, list[Standby]] = {}
        for vm, slot in sorted(ve.placement.items()):
            keep[vm] = self._usable(slot, ve.standbys_of(vm), alive)[:copies]
            drop[vm] = [e for e in ve.standbys_of(vm) if e not in keep[vm]]
        carried = {vm: await self._export(ve, vm) for vm in sorted(ve.placement)} if copies else {}
        taken = time.time()
        for vm, kept in keep.items():
            refreshed = [e for e in kept if await self._refresh(ve, vm, e, carried[vm], taken)]
            drop[vm] += [e for e in kept if e not in refreshed]
            keep[vm] = [replace(e, taken=taken) for e in refreshed]
        plan = await self._plan_copies(ve, keep, copies)
        tokens = await self._reserve_copies(ve, plan)
        added = {vm: [Standby(m.name, m.addr, m.site, taken) for m in members] for vm, members in plan.items()}
        listed = {vm: tuple(keep[vm] + added.get(vm, [])) for vm in ve.placement}
        wanted = replace(ve, copies=copies, standbys={vm: c for vm, c in listed.items() if c}, shortfall=None)
        record = await self.directory.put(wanted, after=record)
        failures = []
        for vm, entries in sorted(added.items()):
            for entry in list(entries):
                try:
                    spec = next(v for v in ve.spec.vms if v.name == vm)
                    await self._bring_image(spec, entry.node, entry.addr, tokens[vm, entry.node])
                    await self._host(entry, "host.standby", {
                        "name": domain_name(ve.name, vm), "token": tokens[vm, entry.node], "taken": taken,
                        **_standby_args(ve, vm, carried[vm])})
                except RequestError as err:
                    failures.append(f"{vm} on {entry.node}: {err}")
                    entries.remove(entry)
                    wanted = wanted.with_standbys(vm, (e for e in wanted.standbys_of(vm) if e != entry))
        if failures:
            short = Shortfall(f"standby copies not made: {'; '.join(failures)}", taken)
            wanted = replace(wanted, shortfall=short if ve.spec.ha.mode == "standby" else None)
            record = await self.directory.put(wanted, after=record)
        await self._unstandby(ve.name, drop)
        return Kept(record, {vm: [e.node for e in entries] for vm, entries in added.items() if entries},
                    {vm: [e.node for e in entries] for vm, entries in drop.items() if entries}, "; ".join(failures))

    def _usable(self, slot: Slot, copies: Iterable[Standby], alive: Mapping[str, Member]) -> list[Standby]:
        """The copies of the VM at `slot` on live nodes other than its host, most preferred first."""
        usable = [e for e in copies if e.node in alive and e.node != slot.node]
        return sorted(usable, key=lambda e: self._preference(slot, alive[e.node]))

    def _preference(self, slot: Slot, member: Member) -> tuple[bool, float, str]:
        """Sort key of a node for a standby of the VM at `slot`: another site first, then nearest to the VM."""
        return member.site == slot.site, self._distance(slot.node, member), member.name

    def _distance(self, origin: str, member: Member) -> float:
        """Estimated RTT in seconds from node `origin` to `member`, by their coordinates; inf if unknown."""
        known = self.membership.members.get(origin)
        a = self.distances.coordinate_of(known) if known else None
        b = self.distances.coordinate_of(member)
        return estimate(a, b)[0] if a is not None and b is not None else math.inf

    async def _export(self, ve: VERecord, vm: str) -> dict[str, Any]:
        """The VM's XML and snapshots from its host, without freezing it (a real guest's host also copies
        its disk aside, consistent, for the standbys' nodes to fetch)."""
        try:
            carried: dict[str, Any] = await self._host(ve.placement[vm], "host.export",
                                                       {"name": domain_name(ve.name, vm), "copy": True})
        except RequestError as err:
            raise RequestError(f"cannot copy {ve.name}/{vm}: {err}") from None
        return carried

    async def _refresh(self, ve: VERecord, vm: str, entry: Standby, carried: dict[str, Any], taken: float) -> bool:
        """Give the node of a standby the VM's fresh export; False if it no longer holds it or cannot be reached."""
        try:
            await self._host(entry, "host.standby", {"name": domain_name(ve.name, vm), "taken": taken,
                                                     **_standby_args(ve, vm, carried)})
        except RequestError as err:
            log.info("standby of %s/%s on %s is lost (%s); it will be made again", ve.name, vm, entry.node, err)
            return False
        return True

    async def _plan_copies(self, ve: VERecord, keep: Mapping[str, Sequence[Standby]],
                           copies: int) -> dict[str, list[Member]]:
        """The nodes of the copies each VM lacks: live nodes with room that hold neither the VM nor one of
        its copies, by `_preference`; a RequestError naming the VM and why if there are not enough."""
        spec = ve.spec
        members = [m for m in self.membership.alive() if spec.site is None or m.site == spec.site]
        if any(copies > len(keep[vm]) for vm in keep):
            infos = await self.transport.call_many([m.addr for m in members], "host.info", {}, 5.0)
        else:
            infos = {}
        free = {m.name: Resources(**info["free"]) for m in members
                if isinstance(info := infos.get(m.addr), dict)}  # unreachable: left out
        plan: dict[str, list[Member]] = {}
        for vm_spec in spec.vms:
            vm, slot = vm_spec.name, ve.placement[vm_spec.name]
            missing = copies - len(keep[vm])
            if missing <= 0:
                continue
            need = Resources(vm_spec.vcpus, vm_spec.memory_mb, vm_spec.disk_gb)
            used = {slot.node} | {e.node for e in keep[vm]}
            others = [m for m in members if m.name != slot.node]
            fits = sorted((m for m in others if m.name not in used and m.name in free
                           and free[m.name].shortfall(need) is None), key=functools.partial(self._preference, slot))
            if len(fits) < missing:
                where = f" in site {spec.site}" if spec.site else ""
                if copies > len(others):
                    why = f"there are only {len(others)} live nodes{where} besides its host {slot.node}"
                else:
                    why = (f"only {len(keep[vm]) + len(fits)} of the {len(others)} other live nodes{where} have "
                           f"room for one ({need.vcpus} vCPUs, {need.memory_mb} MiB, {need.disk_gb} GiB)")
                raise RequestError(f"cannot keep {copies} standby copies of {ve.name}/{vm}: {why}")
            plan[vm] = fits[:missing]
            for m in plan[vm]:
                free[m.name] -= need
        return plan

    async def _reserve_copies(self, ve: VERecord, plan: Mapping[str, list[Member]]) -> dict[tuple[str, str], str]:
        """Reserve the room of each planned copy; all or none (a refusal releases the others)."""
        needs = {v.name: v for v in ve.spec.vms}
        tokens: dict[tuple[str, str], str] = {}
        addrs: dict[str, str] = {}
        for vm, members in sorted(plan.items()):
            for m in members:
                need = needs[vm]
                try:
                    answer = await self.transport.call(m.addr, "host.reserve_standby", {
                        "name": domain_name(ve.name, vm), "vcpus": need.vcpus, "memory_mb": need.memory_mb,
                        "disk_gb": need.disk_gb}, timeout=10)
                except RpcError as err:
                    for (_, node), token in tokens.items():
                        await self.transport.call_many([addrs[node]], "host.release", {"token": token})
                    raise Conflict(f"{m.name} refused a standby copy of {ve.name}/{vm} ({err}); try again") from None
                tokens[vm, m.name], addrs[m.name] = answer["token"], m.addr
        return tokens

    # -- failover --------------------------------------------------------------------------------------

    async def _on_failover(self, caller: Caller, request: FailoverRequest) -> RecordView:
        ve, failed_over = await self.failover(request.name, None if request.vm is None else [request.vm], None,
                                              force=request.force, caller=caller)
        return {**view(ve), "failed_over": failed_over}

    async def failover(self, name: str, vms: Sequence[str] | None, reason: str | None, *, host: str | None = None,
                       force: bool = False, caller: Caller | None = None) -> tuple[VERecord, dict[str, str]]:
        """Bring up on a standby copy each VM of `vms` (None: every VM) whose host is down: not a live member,
        not answering, or answering that it does not hold the VM. The nearest live copy is promoted, in the
        state the VE is in, and no longer counts as a copy. A VM whose host is alive and answers is left
        alone (refused if named) unless `force`: then its copy there is switched off first. Refused as a
        whole, before anything changes, if a VM to fail over has no copy on a live node. `reason`, `host` and
        `caller` as for `Rebuilds.rebuild` (what the HA watchers call too); returns the VE as it is after and
        where each VM failed over runs now."""
        caller = caller or Caller(f"ha@{self.node}", "operator", self.node, self.membership.me.site)
        async with self._locked(caller, name) as record:
            down = await self._asked_down(record.ve, vms, host, force, "fail over", "fails over")
            chosen: dict[str, Standby] = {}
            for v, why in sorted(down.items()):
                nearest = self._nearest_copy(record.ve, v)
                if nearest is None:
                    raise RequestError(f"cannot fail over {name}/{v} ({why or 'forced'}): it has no standby copy "
                                       f"on a live node (ve replicate {name} --copies K keeps some)")
                chosen[v] = nearest
            for v, why in sorted(down.items()):
                cause = "; ".join(w for w in (reason, why) if w) or None
                record = await self._failover(record, v, chosen[v], cause)
        return record.ve, {v: record.ve.placement[v].node for v in sorted(down)}

    def _nearest_copy(self, ve: VERecord, vm: str) -> Standby | None:
        """The VM's standby copy on a live node to promote, if any: for a `standby` VE that replicates, the first
        listed (the one its host mirrors the disk to, `discovery.ha.service.HaService._mirror_wants`), else the
        nearest to where the VM was."""
        alive = {m.name: m for m in self.membership.alive()}
        host = ve.placement[vm].node
        live = [e for e in ve.standbys_of(vm) if e.node in alive and e.node != host]
        if ve.spec.ha.mode == "standby" and ve.spec.ha.replication != "off":
            return live[0] if live else None
        return min(live, key=lambda e: (self._distance(host, alive[e.node]), e.node), default=None)

    async def _failover(self, record: Stored, vm: str, standby: Standby, why: str | None) -> Stored:
        """Promote `standby` into `vm` (its host down for reason `why`; None: alive, and forced). The steps, and
        why an interrupted failover is finished or undone without the VM running at two places, are the
        transaction `discovery.ve.failovers.Failover`; this only drives it (`discovery.ve.driver`)."""
        failover = Failover(record.ve, vm, domain_name(record.ve.name, vm), standby, why, self.node,
                            self._rtt_ms(standby.node))
        record, _ = await drive(failover, record, self.transport, self.directory)
        log.info("failover of %s/%s to %s finished", record.ve.name, vm, standby.node)
        self.events.note("vm_failed_over", f"{record.ve.name}/{vm}",
                         f"-> {standby.node}" + (f" ({why})" if why else ""))
        await self._moved(record.ve)
        return record

    async def _recover_failover(self, record: Stored, vm: str) -> tuple[Stored, bool]:
        """Finish or undo the interrupted failover of `vm` (`discovery.ve.failovers.FailoverRecovery`); returns
        the record and whether it went forward. Raises RequestError, leaving the intent, if the standby's node
        cannot be asked."""
        intent = record.ve.placement[vm].failing_over
        assert intent is not None, "settled where the record holds one"
        recovery = FailoverRecovery(record.ve, vm, domain_name(record.ve.name, vm), self._rtt_ms(intent.node))
        record, forward = await drive(recovery, record, self.transport, self.directory)
        log.info("failover of %s/%s to %s %s", recovery.name, vm, intent.node, "finished" if forward else "undone")
        return record, forward

    # -- fencing ---------------------------------------------------------------------------------------

    async def fence(self) -> None:
        """Undefine this node's copy of each VM that the directory places on another node holding it (failed
        over, or rebuilt: `discovery.ve.rebuilds`), and drop each standby this node keeps that the directory no
        longer lists; start the VMs the host holds off since its start (`agents.host.service.HostService.start`)
        that the directory places here, unless an operation on the VM is under way (a failover or a rebuild
        of it elsewhere may be defining it there: its recovery settles this copy). Only on positive evidence:
        a record that cannot be read, or a node that cannot be asked, changes nothing (the host starts a held
        VM by itself after `HOLD_LIMIT`)."""
        me = self.node
        found: dict[str, tuple[Record | None, Stored | None]] = {}
        for key in list(self.host.ledger.allocated):
            domain, standby, _ = key.partition("/")  # a key with '/' holds a standby's room
            ve_name, colon, vm = domain.partition(":")
            if not colon:
                continue
            if ve_name not in found:
                found[ve_name] = await self._newest(ve_name)
            record, live = found[ve_name]
            if record is None:
                continue
            if standby:
                if all(e.node != me for e in (live.ve.standbys_of(vm) if live is not None else ())):
                    log.warning("fencing: the directory lists no standby of %s here; dropping it", domain)
                    await self._local("host.unstandby", {"name": domain})
                continue
            slot = live.ve.placement.get(vm) if live is not None else None
            if slot is not None and me in slot.named():
                held = domain in self.host.held and self.host.may_run(domain)  # off since start or frozen, and
                if held and not slot.intents():  # the lease allows it: the directory says it is ours, nothing moves it
                    await self._local("host.vm.release", {"name": domain})
                continue
            if slot is None:
                if record.deleted and domain in self.host.held:  # destroyed while this node was down
                    log.warning("fencing: %s belongs to a destroyed VE; removing it", domain)
                    await self._local("host.vm.undefine", {"name": domain})
                continue
            try:
                elsewhere = await self._holds(slot, domain)
            except RequestError:
                continue
            if elsewhere:
                log.warning("fencing: %s runs on %s per the directory; removing the copy here", domain, slot.node)
                await self._local("host.vm.undefine", {"name": domain})

    async def _newest(self, name: str) -> tuple[Record | None, Stored | None]:
        """The VE's newest record for fencing; (None, None) if this agent cannot read it: nothing changes."""
        try:
            return await self.directory.newest(name)
        except Unreadable as err:
            log.info("fencing: %s", err)
            return None, None

    async def _local(self, method: str, args: dict[str, Any]) -> None:
        """A `host.*` call to this node's own host service (as a peer's would be served); failures are logged."""
        addr = self.transport.addr
        answer = (await self.transport.call_many([addr], method, args))[addr]
        if isinstance(answer, Exception):
            log.warning("fencing: %s %s failed: %s", method, args.get("name"), answer)


class Fencing(Actor):
    """Every FENCE_INTERVAL seconds, `Replicas.fence`: a host that was down or cut off while its VM failed
    over stops running its old copy once it can read the directory again."""

    name = "ve-fencing"
    tick_interval = FENCE_INTERVAL

    def __init__(self, service: Replicas) -> None:
        super().__init__()
        self.service = service

    async def tick(self) -> None:
        if not self.service.joined():
            return  # not joined yet: the records are elsewhere
        try:
            await self.service.fence()
        except Exception as err:  # a background pass must not take the agent down; it runs again
            log.warning("fencing pass failed: %s", err)


def _standby_args(ve: VERecord, vm: str, carried: dict[str, Any]) -> dict[str, Any]:
    """What `host.standby` keeps of the VM's export; a real guest's disk copy is fetched from its host."""
    ship = {"ship": {"from": ve.placement[vm].addr}} if carried.get("copy") else {}
    return {"xml": carried["xml"], "snapshots": carried["snapshots"], **ship}
