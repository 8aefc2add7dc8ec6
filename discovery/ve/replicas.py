"""Standby copies of a VE's VMs (`ve replicate`) and failover onto them (`ve failover`).

A standby of a VM is what relocation would carry (its domain XML and snapshots, exported without freezing
the VM), kept by another node that holds the VM's room for it (`agents.host.standby`), so a failover onto
it never lacks room. The record lists the copies, `replicas: {vm: [{node, addr, site, taken}]}`, and how
many were asked per VM (`copies`). Copies go to distinct nodes other than the VM's, in other sites first
(a site outage is what they are for), then nearest to the VM; inside the site a VE is pinned to, if it
is. They are as fresh as their `taken`: running `ve replicate` again exports again.

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

import copy
import logging
import math
import time
from collections.abc import Mapping
from typing import Any

from agents.host.capacity import Resources
from agents.runtime import Actor
from discovery.ve.base import PREFIX, VEBase, domain_name
from discovery.ve.driver import drive
from discovery.ve.failovers import Failover, FailoverRecovery
from discovery.ve.spec import VESpec
from overlay.dht import Record
from overlay.membership import ALIVE, SUSPECT, Member
from overlay.wire.rpc import Caller, Conflict, NotFound, RemoteError, RequestError, RpcError
from vivaldi.coordinate import estimate

log = logging.getLogger(__name__)
MAX_COPIES = 16
DOWN_PROBE_TIMEOUT = 5.0
"""How long a failover waits for a VM's host to answer before taking it for down."""
FENCE_INTERVAL = 5.0


class Replicas(VEBase):
    """`ve.replicate` and `ve.failover`, the recovery of a failover left unfinished, and fencing."""

    # -- replicate -------------------------------------------------------------------------------------

    async def _on_replicate(self, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        """Keep `copies` standby copies of every VM of the VE (0 drops them all). Copies already there are
        refreshed (exported again); those on nodes that are gone, or that lost them, are made again
        elsewhere; extra ones are dropped, least preferred first. If the copies cannot all be placed,
        nothing is added and the refusal names the VM and why.

        Order: new copies are reserved, then listed in the record, then confirmed with the exported data,
        so a coordinator that dies leaves reservations that lapse or a listed copy that `ve show` reports
        missing, never room held that nothing lists. Dropped copies leave the record before their nodes
        free them, for the same reason."""
        copies = args.get("copies")
        if not isinstance(copies, int) or isinstance(copies, bool) or not 0 <= copies <= MAX_COPIES:
            raise RequestError(f"copies must be a whole number from 0 to {MAX_COPIES}")
        async with self._locked(caller, args) as record:
            ve = copy.deepcopy(record.value)  # never mutate the shard's copy
            name, placement = ve["name"], ve["placement"]
            alive = {m.name: m for m in self.agent.membership.alive()}
            keep: dict[str, list[dict[str, Any]]] = {}
            drop: dict[str, list[dict[str, Any]]] = {}
            for vm, slot in sorted(placement.items()):
                entries = ve.get("replicas", {}).get(vm, [])
                usable = sorted((e for e in entries if e["node"] in alive and e["node"] != slot["node"]),
                                key=lambda e, slot=slot: self._preference(slot, alive[e["node"]]))
                keep[vm] = usable[:copies]
                drop[vm] = [e for e in entries if e not in keep[vm]]
            carried = {vm: await self._export(ve, vm) for vm in sorted(placement)} if copies else {}
            taken = time.time()
            for vm, entries in keep.items():
                for entry in list(entries):
                    if await self._refresh(ve, vm, entry, carried[vm], taken):
                        entry["taken"] = taken
                    else:
                        entries.remove(entry)
                        drop[vm].append(entry)
            plan = await self._plan_copies(ve, keep, copies)
            tokens = await self._reserve_copies(ve, plan)
            added = {vm: [{"node": m.name, "addr": m.addr, "site": m.site, "taken": taken} for m in members]
                     for vm, members in plan.items()}
            value = copy.deepcopy(ve)
            value["copies"] = copies
            value["replicas"] = _nonempty({vm: keep[vm] + added.get(vm, []) for vm in placement})
            record = await self.agent.records.put(record.key, value, after=record.version)
            failures = []
            for vm, entries in sorted(added.items()):
                for entry in list(entries):
                    try:
                        await self._host(entry, "host.standby", {
                            "name": domain_name(name, vm), "token": tokens[vm, entry["node"]], "taken": taken,
                            **_standby_args(ve, vm, carried[vm])})
                    except RequestError as err:
                        failures.append(f"{vm} on {entry['node']}: {err}")
                        entries.remove(entry)
                        value["replicas"][vm].remove(entry)
            if failures:
                value["replicas"] = _nonempty(value["replicas"])
                record = await self.agent.records.put(record.key, value, after=record.version)
            await self._unstandby(name, drop)
            if failures:
                raise RequestError(f"some standby copies of {name} could not be made ({'; '.join(failures)}); "
                                   "the others are kept, run replicate again")
        return {**record.value, "added": {vm: [e["node"] for e in entries] for vm, entries in added.items() if entries},
                "dropped": {vm: [e["node"] for e in entries] for vm, entries in drop.items() if entries}}

    def _preference(self, slot: Mapping[str, Any], member: Member) -> tuple[bool, float, str]:
        """Sort key of a node for a standby of the VM at `slot`: another site first, then nearest to the VM."""
        return member.site == slot["site"], self._distance(slot["node"], member), member.name

    def _distance(self, origin: str, member: Member) -> float:
        """Estimated RTT in seconds from node `origin` to `member`, by their coordinates; inf if unknown."""
        known = self.agent.membership.members.get(origin)
        a = self.agent.coordinates.coordinate_of(known) if known else None
        b = self.agent.coordinates.coordinate_of(member)
        return estimate(a, b)[0] if a is not None and b is not None else math.inf

    async def _export(self, ve: dict[str, Any], vm: str) -> dict[str, Any]:
        """The VM's XML and snapshots from its host, without freezing it (a real guest's host also copies
        its disk aside, consistent, for the standbys' nodes to fetch)."""
        try:
            return await self._host(ve["placement"][vm], "host.export", {"name": domain_name(ve["name"], vm),
                                                                         "copy": True})
        except RequestError as err:
            raise RequestError(f"cannot copy {ve['name']}/{vm}: {err}") from None

    async def _refresh(self, ve: dict[str, Any], vm: str, entry: dict[str, Any], carried: dict[str, Any],
                       taken: float) -> bool:
        """Give the node of a standby the VM's fresh export; False if it no longer holds it or cannot be reached."""
        try:
            await self._host(entry, "host.standby", {"name": domain_name(ve["name"], vm), "taken": taken,
                                                     **_standby_args(ve, vm, carried)})
        except RequestError as err:
            log.info("standby of %s/%s on %s is lost (%s); it will be made again", ve["name"], vm, entry["node"], err)
            return False
        return True

    async def _plan_copies(self, ve: dict[str, Any], keep: Mapping[str, list[dict[str, Any]]],
                           copies: int) -> dict[str, list[Member]]:
        """The nodes of the copies each VM lacks: live nodes with room that hold neither the VM nor one of
        its copies, by `_preference`; a RequestError naming the VM and why if there are not enough."""
        spec = VESpec.from_dict(ve["spec"])
        members = [m for m in self.agent.membership.alive() if spec.site is None or m.site == spec.site]
        if any(copies > len(keep[vm]) for vm in keep):
            infos = await self.agent.transport.call_many([m.addr for m in members], "host.info", {}, 5.0)
        else:
            infos = {}
        free = {m.name: Resources(**info["free"]) for m in members
                if isinstance(info := infos.get(m.addr), dict)}  # unreachable: left out
        plan: dict[str, list[Member]] = {}
        for vm_spec in spec.vms:
            vm, slot = vm_spec.name, ve["placement"][vm_spec.name]
            missing = copies - len(keep[vm])
            if missing <= 0:
                continue
            need = Resources(vm_spec.vcpus, vm_spec.memory_mb, vm_spec.disk_gb)
            used = {slot["node"]} | {e["node"] for e in keep[vm]}
            others = [m for m in members if m.name != slot["node"]]
            fits = sorted((m for m in others if m.name not in used and m.name in free
                           and free[m.name].shortfall(need) is None), key=lambda m, s=slot: self._preference(s, m))
            if len(fits) < missing:
                where = f" in site {spec.site}" if spec.site else ""
                if copies > len(others):
                    why = f"there are only {len(others)} live nodes{where} besides its host {slot['node']}"
                else:
                    why = (f"only {len(keep[vm]) + len(fits)} of the {len(others)} other live nodes{where} have "
                           f"room for one ({need.vcpus} vCPUs, {need.memory_mb} MiB, {need.disk_gb} GiB)")
                raise RequestError(f"cannot keep {copies} standby copies of {ve['name']}/{vm}: {why}")
            plan[vm] = fits[:missing]
            for m in plan[vm]:
                free[m.name] -= need
        return plan

    async def _reserve_copies(self, ve: dict[str, Any], plan: Mapping[str, list[Member]]) -> dict[tuple[str, str], str]:
        """Reserve the room of each planned copy; all or none (a refusal releases the others)."""
        needs = {v.name: v for v in VESpec.from_dict(ve["spec"]).vms}
        tokens: dict[tuple[str, str], str] = {}
        addrs: dict[str, str] = {}
        for vm, members in sorted(plan.items()):
            for m in members:
                need = needs[vm]
                try:
                    answer = await self.agent.transport.call(m.addr, "host.reserve_standby", {
                        "name": domain_name(ve["name"], vm), "vcpus": need.vcpus, "memory_mb": need.memory_mb,
                        "disk_gb": need.disk_gb}, timeout=10)
                except RpcError as err:
                    for (_, node), token in tokens.items():
                        await self.agent.transport.call_many([addrs[node]], "host.release", {"token": token})
                    raise Conflict(f"{m.name} refused a standby copy of {ve['name']}/{vm} ({err}); try again") from None
                tokens[vm, m.name], addrs[m.name] = answer["token"], m.addr
        return tokens

    # -- failover --------------------------------------------------------------------------------------

    async def _on_failover(self, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        """Bring up on a standby copy each VM (or only `vm`) whose host is down: not a live member, not
        answering, or answering that it does not hold the VM. The nearest live copy is promoted, in the
        state the VE is in, and no longer counts as a copy. A VM whose host is alive and answers is left
        alone (refused if named) unless `force`: then its copy there is switched off first. Refused as a
        whole, before anything changes, if a VM to fail over has no copy on a live node."""
        vm, force = args.get("vm"), args.get("force", False)
        if vm is not None and not (isinstance(vm, str) and vm):
            raise RequestError("vm must be a non-empty string")
        if not isinstance(force, bool):
            raise RequestError("force must be true or false")
        async with self._locked(caller, args) as record:
            name, placement = record.value["name"], record.value["placement"]
            if vm is not None and vm not in placement:
                raise NotFound(f"VE {name!r} has no VM {vm!r} (VMs: {', '.join(sorted(placement))})")
            down: dict[str, str | None] = {}
            for v in [vm] if vm is not None else sorted(placement):
                why = await self._down(record.value, v)
                if why is not None or force:
                    down[v] = why
            if not down:
                hosts = sorted({placement[v]["node"] for v in ([vm] if vm is not None else placement)})
                whose = "its host" if vm is not None or len(placement) == 1 else \
                    f"the host{'s' if len(hosts) > 1 else ''} of its VMs"
                raise Conflict(f"cannot fail over {name}{'/' + vm if vm else ''}: {whose} {', '.join(hosts)} "
                               f"{'is' if len(hosts) == 1 else 'are'} alive and answering (--force fails over "
                               "anyway, switching the running copy off first)")
            chosen = {}
            for v, why in sorted(down.items()):
                chosen[v] = self._nearest_copy(record.value, v)
                if chosen[v] is None:
                    raise RequestError(f"cannot fail over {name}/{v} ({why or 'forced'}): it has no standby copy "
                                       f"on a live node (ve replicate {name} --copies K keeps some)")
            for v, why in sorted(down.items()):
                record = await self._failover(record, v, chosen[v], why)
        return {**record.value, "failed_over": {v: record.value["placement"][v]["node"] for v in sorted(down)}}

    async def _down(self, ve: dict[str, Any], vm: str) -> str | None:
        """Why the VM's host counts as down, or None if it is a live member that answers holding the VM."""
        slot = ve["placement"][vm]
        member = self.agent.membership.members.get(slot["node"])
        if member is None or member.status not in (ALIVE, SUSPECT):
            return f"{slot['node']} is {member.status if member else 'not a member'}"
        try:
            await self.agent.transport.call(slot["addr"], "host.vm.info", {"name": domain_name(ve["name"], vm)},
                                            timeout=DOWN_PROBE_TIMEOUT)
        except RemoteError as err:
            return f"{slot['node']} does not hold it" if err.kind == "not_found" else None
        except RpcError as err:
            log.info("failover: %s does not answer: %s", slot["node"], err)
            return f"{slot['node']} does not answer"
        return None

    def _nearest_copy(self, ve: dict[str, Any], vm: str) -> dict[str, Any] | None:
        """The VM's standby copy on a live node nearest to where the VM was, if any."""
        alive = {m.name: m for m in self.agent.membership.alive()}
        host = ve["placement"][vm]["node"]
        live = [e for e in ve.get("replicas", {}).get(vm, []) if e["node"] in alive and e["node"] != host]
        return min(live, key=lambda e: (self._distance(host, alive[e["node"]]), e["node"]), default=None)

    async def _failover(self, record: Record, vm: str, standby: dict[str, Any], why: str | None) -> Record:
        """Promote `standby` into `vm` (its host down for reason `why`; None: alive, and forced). The steps, and
        why an interrupted failover is finished or undone without the VM running at two places, are the
        transaction `discovery.ve.failovers.Failover`; this only drives it (`discovery.ve.driver`)."""
        failover = Failover(record.value, vm, domain_name(record.value["name"], vm), standby, why,
                            self.agent.config.name, self._rtt_ms(standby["node"]))
        record, _ = await drive(failover, record, self.agent.transport, self.agent.records)
        log.info("failover of %s/%s to %s finished", record.value["name"], vm, standby["node"])
        return record

    async def _recover_failover(self, record: Record, vm: str) -> tuple[Record, bool]:
        """Finish or undo the interrupted failover of `vm` (`discovery.ve.failovers.FailoverRecovery`); returns
        the record and whether it went forward. Raises RequestError, leaving the intent, if the standby's node
        cannot be asked."""
        name, intent = record.value["name"], record.value["placement"][vm]["failing_over"]
        recovery = FailoverRecovery(record.value, vm, domain_name(name, vm), self._rtt_ms(intent["node"]))
        record, forward = await drive(recovery, record, self.agent.transport, self.agent.records)
        log.info("failover of %s/%s to %s %s", name, vm, intent["node"], "finished" if forward else "undone")
        return record, forward

    def _rtt_ms(self, node: str) -> float | None:
        member = self.agent.membership.members.get(node)
        return member.rtt * 1000 if member is not None and member.rtt is not None else None

    # -- fencing ---------------------------------------------------------------------------------------

    async def fence(self) -> None:
        """Undefine this node's copy of each VM that the directory places on another node holding it, and
        drop each standby this node keeps that the directory no longer lists; start the VMs the host holds
        off since its start (`agents.host.service.HostService.start`) that the directory places here. Only on
        positive evidence: a record that cannot be read, or a node that cannot be asked, changes nothing
        (the host starts a held VM by itself after `HOLD_LIMIT`)."""
        me = self.agent.config.name
        records: dict[str, Record | None] = {}
        for key in list(self.agent.host.ledger.allocated):
            domain, standby, _ = key.partition("/")  # a key with '/' holds a standby's room
            ve_name, colon, vm = domain.partition(":")
            if not colon:
                continue
            if ve_name not in records:
                records[ve_name] = await self.agent.records.get_record(PREFIX + ve_name)
            record = records[ve_name]
            if record is None:
                continue
            if standby:
                copies = [] if record.deleted else record.value.get("replicas", {}).get(vm, [])
                if all(e["node"] != me for e in copies):
                    log.warning("fencing: the directory lists no standby of %s here; dropping it", domain)
                    await self._local("host.unstandby", {"name": domain})
                continue
            slot = None if record.deleted else record.value["placement"].get(vm)
            if slot is not None and me in _named(slot):
                if domain in self.agent.host.held:  # recovered off at start: the directory says it is ours
                    await self._local("host.vm.release", {"name": domain})
                continue
            if slot is None:
                if record.deleted and domain in self.agent.host.held:  # destroyed while this node was down
                    log.warning("fencing: %s belongs to a destroyed VE; removing it", domain)
                    await self._local("host.vm.undefine", {"name": domain})
                continue
            try:
                elsewhere = await self._holds(slot, domain)
            except RequestError:
                continue
            if elsewhere:
                log.warning("fencing: %s runs on %s per the directory; removing the copy here", domain, slot["node"])
                await self._local("host.vm.undefine", {"name": domain})

    async def _local(self, method: str, args: dict[str, Any]) -> None:
        """A `host.*` call to this node's own host service (as a peer's would be served); failures are logged."""
        addr = self.agent.transport.addr
        answer = (await self.agent.transport.call_many([addr], method, args))[addr]
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
        agent = self.service.agent
        if agent.config.join and len(agent.membership.alive()) < 2:
            return  # not joined yet: the records are elsewhere
        try:
            await self.service.fence()
        except Exception as err:  # a background pass must not take the agent down; it runs again
            log.warning("fencing pass failed: %s", err)


def _named(slot: Mapping[str, Any]) -> list[str]:
    """The nodes a VM's slot names: its host, and the target of a move or failover under way."""
    return [slot["node"]] + [slot[k]["node"] for k in ("moving_to", "failing_over") if k in slot]


def _nonempty(replicas: Mapping[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    return {vm: entries for vm, entries in replicas.items() if entries}


def _standby_args(ve: dict[str, Any], vm: str, carried: dict[str, Any]) -> dict[str, Any]:
    """What `host.standby` keeps of the VM's export; a real guest's disk copy is fetched from its host."""
    ship = {"ship": {"from": ve["placement"][vm]["addr"]}} if carried.get("copy") else {}
    return {"xml": carried["xml"], "snapshots": carried["snapshots"], **ship}
