"""VE management from any node: the `ve.*` RPCs that the CLI calls on whichever agent it reaches.

The agent that receives a request coordinates it: it reads the VE record from the directory (the
agent's records, on the overlay the cluster is bound to: Chord's DHT or Kademlia), talks to the
hosts of the VMs, and writes the record back. Placement tries this node, then the nearest nodes with
room found by the spiral search (`agents.spiral`), then every other member by RTT; each VM is
reserved with a two-phase handshake (reserve on the target, then confirm), so a coordinator that
dies half-way leaves only reservations that lapse by themselves.

Relocation (`ve relocate`) moves VMs between nodes on drivers that cannot migrate (the embedded
`test:///`): the domain XML, its state and its snapshots are carried to the target; `VEService._move`
describes the protocol and why an interrupted relocation never leaves a VM at two places or at none.
Snapshots (`ve snapshot`, `ve snapshots`, `ve restore`) are consistent across the VE's VMs and are
kept by each VM's host (`VEService._on_snapshot`). Every operation that changes a VE first finishes
or undoes what an interrupted one left in its record (`VEService._settle`), and holds a per-VE lock
on the agent, so operations on one VE through one agent never interleave.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import trio

from agents.hypervisor import SETTLED
from agents.node import NodeAgent
from agents.runtime import Actor
from discovery import placement as planner
from discovery.spec import NO_CONSTRAINTS, SpecError, VESpec
from overlay.dht import Record
from overlay.membership import Member
from overlay.rpc import Caller, Conflict, Forbidden, NotFound, RemoteError, RequestError, RpcError

log = logging.getLogger(__name__)
PREFIX = "ve/"
HOST_TIMEOUT = 40.0
MAX_REPLANS = 3  # a graceful stop may take the hypervisor's shutdown timeout
PREPARE_LIMIT = 60.0
"""A coordinator gives up (and rolls back) a VM move whose preparation (reserve, export, import) takes longer."""
MOVE_LEASE = 2 * PREPARE_LIMIT
"""An intent this old whose coordinator cannot be asked may be finished or undone by any agent."""
RECOVERY_WINDOW = 120.0
"""How long after its start an agent keeps trying to settle the operations it left interrupted."""
PAUSE_ENV = "DISCOVERY_TEST_PAUSE"
"""Test-only fault hook, `<point>:<seconds>[,...]`: the coordinator sleeps at those points (`_test_pause`)."""
SHOWN_REASONS = 3  # nodes whose refusal a relocation's error names
TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
TAG_RULE = "1-63 characters of A-Z, a-z, 0-9, '.', '_' or '-', starting with a letter or digit"


def domain_name(ve: str, vm: str) -> str:
    """The libvirt domain of a VM; ':' cannot appear in VE or VM names, so names never collide."""
    return f"{ve}:{vm}"


@dataclass
class Candidate:
    """A node placement may use: how near, how it was found, and its free room (None: unknown)."""

    member: Member
    rtt_ms: float | None
    found_by: str = ""
    free: dict[str, int] | None = None

    def offer(self, rank: int) -> planner.Candidate:
        free = self.free or {}
        return planner.Candidate(self.member.name, self.member.site, int(free.get("vcpus", 0)),
                                   int(free.get("memory_mb", 0)), int(free.get("disk_gb", 0)), rank)

    def describe(self, coordinator: str) -> str:
        if self.member.name == coordinator:
            return "this node"
        by = f", found by {self.found_by}" if self.found_by else ""
        return ("rtt unknown" if self.rtt_ms is None else f"{self.rtt_ms:.1f} ms") + by


class VEService:
    def __init__(self, agent: NodeAgent) -> None:
        self.agent = agent
        self._locks: dict[str, trio.Lock] = {}
        for verb in ("create", "list", "show", "locate", "start", "stop", "suspend", "resume", "destroy",
                     "relocate", "snapshot", "snapshots", "restore", "busy"):
            agent.transport.route(f"ve.{verb}", getattr(self, f"_on_{verb}"))

    def _lock(self, name: str) -> trio.Lock:
        """The VE's lock on this agent: every operation that changes the VE holds it."""
        return self._locks.setdefault(name, trio.Lock())

    @contextlib.asynccontextmanager
    async def _locked(self, caller: Caller, args: dict[str, Any], settle: bool = True) -> AsyncIterator[Record]:
        """The VE's record for an operation that changes it: read again under the VE's lock (once the
        caller may act on it), and with what interrupted operations left in it settled (`_settle`)."""
        async with self._lock((await self._record(caller, args)).value["name"]):
            record = await self._record(caller, args)
            if settle:
                record = await self._settle(record)
            yield record

    # -- create ------------------------------------------------------------------------------------

    async def _on_create(self, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        try:
            spec = VESpec.from_dict(args.get("spec"))
        except SpecError as err:
            raise RequestError(str(err)) from None
        key = PREFIX + spec.name
        current = await self.agent.records.get_record(key)
        if current is not None and not current.deleted:
            raise Conflict(f"a VE named {spec.name!r} already exists")
        placement, tokens = await self._place(spec)
        record = {"name": spec.name, "spec": spec.to_dict(), "owner": caller.cn, "state": "creating",
                  "placement": placement, "coordinator": self.agent.config.name, "created": time.time()}
        try:
            stored = await self.agent.records.put(key, record, after=current.version if current else 0)
            for vm_name, slot in placement.items():
                await self.agent.transport.call(slot["addr"], "host.confirm", {"token": tokens.pop(vm_name)},
                                                timeout=HOST_TIMEOUT)
        except (RequestError, RpcError) as err:
            await self._undo(spec, placement, tokens)
            raise RequestError(f"creating {spec.name} failed and was rolled back: {err}") from None
        record["state"] = "running"
        await self.agent.records.put(key, record, after=stored.version)
        return record

    async def _place(self, spec: VESpec) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
        """Plan where each VM goes (`discovery.placement`: capacity and constraints, nearest first), then
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
                            ranked: list[Candidate]) -> tuple[dict[str, dict[str, Any]], dict[str, str], str | None]:
        """Reserve each VM on its planned node; on a refusal release them all and name the node."""
        vms = {vm.name: vm for vm in spec.vms}
        order = [c.member.name for c in ranked]
        placement: dict[str, dict[str, Any]] = {}
        tokens: dict[str, str] = {}
        for vm_name, node in plan.assignment.items():
            candidate, vm = by_name[node], vms[vm_name]
            try:
                answer = await self.agent.transport.call(candidate.member.addr, "host.reserve", {
                    "name": domain_name(spec.name, vm.name), "vcpus": vm.vcpus, "memory_mb": vm.memory_mb,
                    "disk_gb": vm.disk_gb})
            except RpcError as err:
                log.info("reservation of %s on %s refused: %s; planning again without it", vm_name, node, err)
                await self._release(placement, tokens)
                return {}, {}, node
            nearer = order.index(node)
            why = f"nearest with room ({candidate.describe(self.agent.config.name)}"
            if nearer:
                constrained = spec.constraints != NO_CONSTRAINTS
                why += f"; {nearer} nearer full" + (" or ruled out by constraints" if constrained else "")
            why += ")"
            if spec.site:
                why = f"in site {spec.site}, {why}"
            placement[vm_name] = {"node": node, "addr": candidate.member.addr, "site": candidate.member.site,
                                   "rtt_ms": candidate.rtt_ms, "why": why}
            tokens[vm_name] = answer["token"]
        return placement, tokens, None

    async def _candidates(self, spec: VESpec, everyone: bool) -> list[Candidate]:
        """Where VMs may go, nearest first: this node, then the nodes with room for the smallest VM that
        the spiral search found; with `everyone`, then every other live member by measured (else
        estimated) RTT, each asked for its free room, so a short spiral never refuses what some node
        could host."""
        me = self.agent.membership.me
        site = spec.site
        members = {m.name: m for m in self.agent.membership.alive() if site is None or m.site == site}
        if not members:
            sites = sorted({m.site for m in self.agent.membership.alive()})
            raise RequestError(f"no live node in site {site!r} (sites: {', '.join(sites)})")
        vcpus, memory = min(v.vcpus for v in spec.vms), min(v.memory_mb for v in spec.vms)

        def has_room(entry: Any, reply: dict[str, Any]) -> bool:
            free = reply.get("free") or {}
            return ((site is None or reply.get("site") == site) and free.get("vcpus", 0) >= vcpus
                    and free.get("memory_mb", 0) >= memory)

        found = await self.agent.spiral.search(len(spec.vms) + 1, has_room)
        keys = found.keys()
        ranked = [Candidate(members[e.name], keys[e.name] * 1000 if e.name in keys else None, "spiral",
                            found.replies[e.name].get("free")) for e in found.nodes if e.name in members]
        if me.name in members:
            ranked.insert(0, Candidate(me, 0.0, free=self.agent.host.ledger.free(trio.current_time()).to_wire()))
        if not everyone:
            return ranked

        def rtt_ms(m: Member) -> float | None:
            """Measured RTT if we have one, else the coordinates' estimate."""
            rtt = m.rtt if m.rtt is not None else self.agent.coordinates.estimate_to(m)
            return rtt * 1000 if rtt is not None else None

        tried = {c.member.name for c in ranked}
        rest = [Candidate(m, rtt_ms(m)) for m in members.values() if m.name not in tried]
        rest.sort(key=lambda c: (c.rtt_ms is None, c.rtt_ms or 0.0, c.member.name))
        infos = await self.agent.transport.call_many([c.member.addr for c in rest], "host.info", {}, 5.0)
        for c in rest:
            info = infos.get(c.member.addr)
            c.free = info.get("free") if isinstance(info, dict) else None  # unreachable: left out
        return ranked + rest

    async def _release(self, placement: dict[str, dict[str, Any]], tokens: dict[str, str]) -> None:
        for vm_name, token in tokens.items():
            await self.agent.transport.call_many([placement[vm_name]["addr"]], "host.release", {"token": token})

    async def _undo(self, spec: VESpec, placement: dict[str, dict[str, Any]], tokens: dict[str, str]) -> None:
        """Roll a failed create back: drop unconfirmed reservations, remove started VMs, delete the record."""
        await self._release(placement, tokens)
        for vm_name, slot in placement.items():
            await self.agent.transport.call_many([slot["addr"]], "host.vm",
                                                 {"name": domain_name(spec.name, vm_name), "action": "undefine"})
        try:
            await self.agent.records.delete(PREFIX + spec.name)
        except (RequestError, RpcError) as err:
            log.warning("could not delete the record of failed VE %s: %s", spec.name, err)

    # -- read --------------------------------------------------------------------------------------

    async def _on_list(self, caller: Caller, args: dict[str, Any]) -> list[dict[str, Any]]:
        """The caller's VEs; every VE for an operator (like `openstack server list --all-projects`)."""
        return [r.value for r in await self.agent.records.scan(PREFIX) if _may_act(caller, r.value)]

    async def _on_show(self, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        record = await self._record(caller, args)
        ve = {**copy.deepcopy(record.value), "version": record.version}  # never mutate the shard's copy
        for vm_name, slot in ve["placement"].items():
            try:
                info = await self.agent.transport.call(slot["addr"], "host.vm", {
                    "name": domain_name(ve["name"], vm_name), "action": "info"}, timeout=5)
                slot["domain_state"] = info["state"]
            except RpcError as err:
                slot["domain_state"] = f"unknown ({err})"
        return ve

    async def _on_locate(self, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        """Where each VM runs, from the directory alone (no host is asked): `ve show` asks the hosts."""
        record = await self._record(caller, args)
        vms = {}
        for vm, slot in sorted(record.value["placement"].items()):
            vms[vm] = {k: slot[k] for k in ("node", "site", "addr")}
            if slot.get("moving_to"):
                vms[vm]["moving_to"] = {k: slot["moving_to"][k] for k in ("node", "site", "phase")}
        return {"name": record.value["name"], "state": record.value["state"], "vms": vms}

    async def _record(self, caller: Caller, args: dict[str, Any]) -> Record:
        name = args.get("name")
        if not isinstance(name, str) or not name:
            raise RequestError("a VE name is required")
        record = await self.agent.records.get(PREFIX + name)
        if record is None:
            raise NotFound(f"no VE named {name!r}")
        if not _may_act(caller, record.value):
            raise Forbidden(f"VE {name!r} belongs to {record.value.get('owner')!r}; {caller.cn!r} may not act on it")
        return record

    # -- lifecycle ---------------------------------------------------------------------------------

    async def _on_start(self, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        return await self._apply(caller, args, "start", "running")

    async def _on_stop(self, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        return await self._apply(caller, args, "stop", "stopped")

    async def _on_suspend(self, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        return await self._apply(caller, args, "suspend", "suspended")

    async def _on_resume(self, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        return await self._apply(caller, args, "resume", "running")

    async def _on_destroy(self, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        """Undefine every VM (and the copy an interrupted move may have left at its target), then delete
        the record. Refused while another agent is relocating or snapshotting the VE."""
        async with self._locked(caller, args, settle=False) as record:
            for intent in _interrupted(record.value):
                await self._check_abandoned(record.value["name"], intent)
            await self._on_every_vm(record.value, "undefine")
            await self.agent.records.delete(record.key, after=record.version)
        return {**record.value, "state": "destroyed"}

    async def _apply(self, caller: Caller, args: dict[str, Any], action: str, state: str) -> dict[str, Any]:
        async with self._locked(caller, args) as record:
            await self._on_every_vm(record.value, action)
            value = {**record.value, "state": state}
            await self.agent.records.put(record.key, value, after=record.version)
        return value

    async def _on_every_vm(self, ve: dict[str, Any], action: str) -> None:
        """Run `action` on each VM's host; all hosts are tried, and any failure is reported. `undefine` also
        reaches the target of an interrupted move."""
        failures = []
        places = list(ve["placement"].items())
        if action == "undefine":
            places += [(vm, slot["moving_to"]) for vm, slot in ve["placement"].items() if slot.get("moving_to")]
        for vm_name, slot in places:
            try:
                await self.agent.transport.call(slot["addr"], "host.vm", {
                    "name": domain_name(ve["name"], vm_name), "action": action}, timeout=HOST_TIMEOUT)
            except RpcError as err:
                failures.append(f"{vm_name} on {slot['node']}: {err}")
        if failures:
            raise RequestError(f"{action} failed for " + "; ".join(failures))

    # -- relocation --------------------------------------------------------------------------------

    async def _on_relocate(self, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        """Move one VM (`vm`) or every VM of a VE to node `to`, or into site `site` (the node chosen by
        placement), provided the whole VE keeps its constraints afterwards; VMs already there stay.
        Safe to retry: a retry first finishes or undoes an interrupted move, then moves what is left."""
        vm, to, site = args.get("vm"), args.get("to"), args.get("site")
        if (to is None) == (site is None):
            raise RequestError("relocate needs either a target node (to) or a target site (site)")
        for field, value in (("vm", vm), ("to", to), ("site", site)):
            if value is not None and not (isinstance(value, str) and value):
                raise RequestError(f"{field} must be a non-empty string")
        async with self._locked(caller, args) as record:
            name = record.value["name"]
            spec = VESpec.from_dict(record.value["spec"])
            placement = record.value["placement"]
            if vm is not None and vm not in placement:
                raise NotFound(f"VE {name!r} has no VM {vm!r} (VMs: {', '.join(sorted(placement))})")
            moving = [vm] if vm is not None else sorted(placement)
            if to is not None:
                targets = self._to_node(to, moving)
            else:
                targets = await self._to_site(spec, record.value, moving, site)
            after = {v: targets[v][0].name if v in targets else slot["node"] for v, slot in placement.items()}
            sites = {slot["node"]: slot["site"] for slot in placement.values()}
            sites.update({member.name: member.site for member, _ in targets.values()})
            reason = check_placement(spec, after, sites)
            if reason:
                raise RequestError(f"cannot relocate {name}: {reason}")
            moved = []
            for v in moving:
                member, why = targets[v]
                if record.value["placement"][v]["node"] != member.name:
                    record = await self._move(record, v, member, why)
                    moved.append(v)
        return {**record.value, "moved": moved}

    def _to_node(self, to: str, moving: list[str]) -> dict[str, tuple[Member, str]]:
        member = next((m for m in self.agent.membership.alive() if m.name == to), None)
        if member is None:
            raise RequestError(f"no live node named {to!r}")
        return {vm: (member, f"relocated to {to} on request") for vm in moving}

    async def _to_site(self, spec: VESpec, ve: dict[str, Any], moving: list[str],
                       site: str) -> dict[str, tuple[Member, str]]:
        """Where the moving VMs go in `site`. The whole VE: planned again inside the site, as create
        plans it (the room its own VMs hold counts as free). One VM: the nearest node of the site with
        room where the whole VE, the other VMs staying put, keeps its constraints."""
        name, placement, me = ve["name"], ve["placement"], self.agent.config.name
        if spec.site is not None and site != spec.site:
            raise RequestError(f"cannot relocate {name} to site {site}: the VE is pinned to site {spec.site}")
        if all(placement[vm]["site"] == site for vm in moving):  # already there: nothing moves
            return {vm: (Member(placement[vm]["node"], placement[vm]["addr"], site), placement[vm]["why"])
                    for vm in moving}
        needs = {v.name: v for v in spec.vms}
        if len(moving) == len(placement):
            pinned = dataclasses.replace(spec, site=site)
            candidates = await self._candidates(pinned, everyone=True)
            for c in candidates:
                own = [needs[v] for v, slot in placement.items() if slot["node"] == c.member.name]
                if c.free is not None and own:
                    c.free = {f: c.free.get(f, 0) + sum(getattr(v, f) for v in own)
                              for f in ("vcpus", "memory_mb", "disk_gb")}
            result = planner.plan(pinned, [c.offer(rank) for rank, c in enumerate(candidates) if c.free])
            if isinstance(result, planner.Refusal):
                raise RequestError(f"cannot relocate {name} to site {site}: {result}")
            by_name = {c.member.name: c for c in candidates}
            return {vm: (by_name[node].member, f"relocated to site {site}, nearest with room "
                                               f"({by_name[node].describe(me)})")
                    for vm, node in result.assignment.items()}
        vm = moving[0]
        alone = VESpec(name, (needs[vm],), site)
        candidates = await self._candidates(alone, everyone=True)
        fixed = {v: slot["node"] for v, slot in placement.items() if v != vm}
        sites = {slot["node"]: slot["site"] for slot in placement.values()}
        allowed, ruled_out = [], []
        for rank, c in enumerate(candidates):
            if not c.free:
                continue
            why = check_placement(spec, {**fixed, vm: c.member.name}, {**sites, c.member.name: c.member.site})
            if why:
                ruled_out.append(f"{c.member.name}: {why}")
            else:
                allowed.append(c.offer(rank))
        result = planner.plan(alone, allowed)
        if isinstance(result, planner.Refusal):
            reasons = [str(result)] if allowed else []
            hidden = len(ruled_out) - SHOWN_REASONS
            reasons[:0] = ruled_out[:SHOWN_REASONS] + ([f"{hidden} more nodes ruled out"] if hidden > 0 else [])
            raise RequestError(f"cannot relocate {name}/{vm} to site {site}: {'; '.join(reasons)}")
        chosen = next(c for c in candidates if c.member.name == result.assignment[vm])
        return {vm: (chosen.member, f"relocated to site {site}, nearest with room ({chosen.describe(me)})")}

    async def _move(self, record: Record, vm: str, target: Member, why: str) -> Record:
        """Move one VM to `target`; returns the record after the move.

        The move is a small transaction whose log is the VE record itself, so that whoever reads the
        record next can finish it:

        1. intent: the VM's slot gets `moving_to` = {target, phase "prepare", the VM's state (running,
           paused or shutoff), the coordinator, a time}, written before any host is touched;
        2. prepare: the target reserves the VM's room (two-phase, as for create); the source exports the
           domain XML and the VM's snapshots and freezes the VM (a running VM is paused, so that it never
           runs at two places); the target confirms the reservation with that XML: it defines the domain,
           persists it with its snapshots, and brings it to the recorded state. A coordinator that takes
           longer than PREPARE_LIMIT gives up and undoes the move;
        3. phase "started" is written: the target runs the VM;
        4. the source undefines its frozen copy, which frees its room and drops its copy of the snapshots;
        5. the slot is rewritten to name the target, without `moving_to`.

        Recovery (`_recover_move`) decides from the hosts, not from the phase: if the target holds the
        domain (persisted there before `host.confirm` answers), the move goes forward (target brought to
        the recorded state, source copy undefined, slot rewritten); otherwise it is undone (a late copy at
        the target undefined, the source brought back to the recorded state, `moving_to` dropped). The
        source's copy is removed only once the target holds the domain, and the target's only while the
        source holds it, so after recovery the VM is at exactly one place, and meanwhile at most one copy
        runs. A host that cannot be reached stops recovery before it changes anything that matters: the
        intent stays, and the next attempt finishes the job.

        Who recovers: the coordinator itself when a step fails, and at its start after a crash (the
        `Recovery` actor); any agent at the next command that changes the VE (`_settle`) once the
        coordinator is abandoned (`_check_abandoned`). Two agents recovering one move at once decide the
        same way (no coordinator imports the VM any more, so whether the target holds it cannot change)
        and take the same idempotent steps.
        """
        ve = record.value
        name, slot = ve["name"], ve["placement"][vm]
        domain = domain_name(name, vm)
        need = next(v for v in VESpec.from_dict(ve["spec"]).vms if v.name == vm)
        state = (await self._host(slot, "host.vm", {"name": domain, "action": "info"}))["state"]
        if state not in SETTLED:
            raise RequestError(f"cannot relocate {name}/{vm}: it is {state} on {slot['node']}")
        rtt = target.rtt * 1000 if target.rtt is not None else None
        intent = {"node": target.name, "addr": target.addr, "site": target.site, "rtt_ms": rtt, "why": why,
                  "phase": "prepare", "state": state, "coordinator": self.agent.config.name, "since": time.time()}
        record = await self._put_slot(record, vm, {**slot, "moving_to": intent})
        token = None
        try:
            with trio.fail_after(PREPARE_LIMIT):
                reserved = await self._host(intent, "host.reserve", {
                    "name": domain, "vcpus": need.vcpus, "memory_mb": need.memory_mb, "disk_gb": need.disk_gb})
                token = reserved["token"]
                carried = await self._host(slot, "host.export", {"name": domain, "freeze": True})
                await _test_pause("prepared")
                await self._host(intent, "host.confirm", {"token": token, "xml": carried["xml"], "state": state,
                                                          "snapshots": carried["snapshots"]})
        except (RequestError, trio.TooSlowError) as err:
            cause = f"not done within {PREPARE_LIMIT:g} s" if isinstance(err, trio.TooSlowError) else str(err)
            if token is not None:
                await self.agent.transport.call_many([target.addr], "host.release", {"token": token})
            try:
                record, forward = await self._recover_move(record, vm)
            except RequestError as again:
                raise RequestError(f"relocating {name}/{vm} to {target.name} failed ({cause}) and is left "
                                   f"unfinished ({again}); retry to finish or undo it") from None
            if not forward:
                raise RequestError(f"cannot relocate {name}/{vm} to {target.name}: {cause}; rolled back, "
                                   f"it stays on {slot['node']}") from None
            return record  # the target had taken it after all
        record = await self._put_slot(record, vm, {**slot, "moving_to": {**intent, "phase": "started",
                                                                         "since": time.time()}})
        await _test_pause("started")
        try:
            await self._host(slot, "host.vm", {"name": domain, "action": "undefine"})
        except RequestError as err:
            raise RequestError(f"{name}/{vm} runs on {target.name}, but its old copy could not be removed yet "
                               f"({err}); retry to finish") from None
        return await self._put_slot(record, vm, _arrived(intent))

    async def _recover_move(self, record: Record, vm: str) -> tuple[Record, bool]:
        """Finish or undo the interrupted move of `vm` (see `_move`); returns the record and whether the
        move went forward. Raises RequestError, leaving the intent in place, if a host cannot be reached."""
        name, slot = record.value["name"], record.value["placement"][vm]
        intent, domain = slot["moving_to"], domain_name(record.value["name"], vm)
        if await self._holds(intent, domain):
            await self._host(intent, "host.vm", {"name": domain, "action": "settle", "state": intent["state"]})
            await self._host(slot, "host.vm", {"name": domain, "action": "undefine"})
            after, forward = _arrived(intent), True
        else:
            if not await self._holds(slot, domain):
                raise RequestError(f"{name}/{vm} is held by neither {slot['node']} nor {intent['node']}")
            await self._host(intent, "host.vm", {"name": domain, "action": "undefine"})
            await self._host(slot, "host.vm", {"name": domain, "action": "settle", "state": intent["state"]})
            after, forward = {k: v for k, v in slot.items() if k != "moving_to"}, False
        log.info("move of %s/%s to %s %s", name, vm, intent["node"], "finished" if forward else "undone")
        fresh = await self.agent.records.get(record.key)
        if fresh is None:
            raise NotFound(f"VE {name!r} was destroyed meanwhile")
        if fresh.value["placement"].get(vm, {}).get("moving_to") != intent:
            return fresh, forward  # another agent settled it meanwhile
        return await self._put_slot(fresh, vm, after), forward

    async def _settle(self, record: Record) -> Record:
        """Finish or undo what interrupted relocations or a snapshot left in the record, before an operation
        changes the VE; Conflict if the agent that started them is still at work."""
        name = record.value["name"]
        for intent in _interrupted(record.value):
            await self._check_abandoned(name, intent)
        for vm in sorted(record.value["placement"]):
            intent = record.value["placement"][vm].get("moving_to")
            if intent:
                try:
                    record, _ = await self._recover_move(record, vm)
                except RequestError as err:
                    raise RequestError(f"VE {name!r} has an interrupted move of {vm} to {intent['node']} that "
                                       f"cannot be settled yet: {err}") from None
        if record.value.get("snapshotting"):
            record = await self._finish_snapshot(record)
        return record

    async def _check_abandoned(self, name: str, intent: dict[str, Any]) -> None:
        """Conflict unless the operation that wrote `intent` is abandoned: its coordinator is this agent
        (which holds the VE's lock, so runs nothing else on it), is not a live member, answers that it is
        not working on the VE, or cannot be asked and wrote the intent more than MOVE_LEASE ago."""
        coordinator = intent.get("coordinator")
        if coordinator == self.agent.config.name:
            return
        member = next((m for m in self.agent.membership.alive() if m.name == coordinator), None)
        if member is None:
            return
        age = time.time() - float(intent.get("since", 0))
        try:
            busy = await self.agent.transport.call(member.addr, "ve.busy", {"name": name}, timeout=5)
        except RpcError:
            busy = age < MOVE_LEASE
        if busy:
            what = f"moving a VM to {intent['node']}" if "node" in intent else f"taking snapshot {intent.get('tag')}"
            raise Conflict(f"{coordinator} is {what} for VE {name!r} (for {age:.0f} s); try again shortly")

    async def _on_busy(self, caller: Caller, args: dict[str, Any]) -> bool:
        """Whether this agent is running an operation on VE `name` (agents ask before settling an intent)."""
        if caller.role not in ("node", "operator"):
            raise Forbidden("only agents and operators may ask")
        name = args.get("name")
        lock = self._locks.get(name) if isinstance(name, str) else None
        return lock is not None and lock.locked()

    async def recover_abandoned(self) -> int:
        """Settle every VE whose record holds an abandoned operation; returns how many are left unsettled."""
        left = 0
        for found in await self.agent.records.scan(PREFIX):
            if not _interrupted(found.value):
                continue
            async with self._lock(found.value["name"]):
                try:
                    record = await self.agent.records.get(found.key)
                    if record is not None:
                        await self._settle(record)
                except Conflict:
                    pass  # its coordinator is at work
                except (RequestError, RpcError) as err:
                    left += 1
                    log.warning("interrupted operation on VE %s not settled yet: %s", found.value["name"], err)
        return left

    async def _host(self, where: Mapping[str, Any], method: str, args: dict[str, Any]) -> Any:
        """Call a host (a slot or an intent: its `addr`); a failure becomes one RequestError naming the node."""
        try:
            return await self.agent.transport.call(where["addr"], method, args, timeout=HOST_TIMEOUT)
        except RpcError as err:
            raise RequestError(f"{where['node']}: {err}") from None

    async def _vm(self, ve: dict[str, Any], vm: str, action: str, **extra: Any) -> Any:
        """`host.vm` `action` on the VM's current host."""
        return await self._host(ve["placement"][vm], "host.vm",
                                {"name": domain_name(ve["name"], vm), "action": action, **extra})

    async def _holds(self, where: Mapping[str, Any], domain: str) -> bool:
        """Whether the host holds `domain` (defined and persisted; a mere reservation does not count)."""
        try:
            await self.agent.transport.call(where["addr"], "host.vm", {"name": domain, "action": "info"}, timeout=10)
        except RemoteError as err:
            if err.kind == "not_found":
                return False
            raise RequestError(f"cannot tell whether {where['node']} holds {domain}: {err}") from None
        except RpcError as err:
            raise RequestError(f"{where['node']} cannot be reached: {err}") from None
        return True

    async def _put_slot(self, record: Record, vm: str, slot: dict[str, Any]) -> Record:
        value = copy.deepcopy(record.value)
        value["placement"][vm] = slot
        return await self.agent.records.put(record.key, value, after=record.version)

    # -- snapshots ---------------------------------------------------------------------------------

    async def _on_snapshot(self, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        """A snapshot of every VM of the VE under `tag`, consistent across them: the running VMs are paused,
        each VM's host stores its domain XML and the state to restore (`host.snapshot`), then the paused
        VMs run again. The record lists the snapshot (tag, time, VE state, each VM's node and state).

        The data stays with each VM's host and travels with the VM when it is relocated (`host.export`
        carries it), so a restore finds it where the VM is now; records stay small (they are DHT values,
        and Kademlia carries them in UDP datagrams). The node listed per VM is where it was when the
        snapshot was taken. A `snapshotting` marker written before the pause lets recovery (`_settle`)
        resume the VMs if the coordinator dies while they are paused."""
        tag = args.get("tag") or time.strftime("snap-%Y%m%d-%H%M%S", time.gmtime())
        if not (isinstance(tag, str) and TAG_RE.fullmatch(tag)):
            raise RequestError(f"a snapshot tag is {TAG_RULE}")
        async with self._locked(caller, args) as record:
            ve = record.value
            name = ve["name"]
            if any(s["tag"] == tag for s in ve.get("snapshots", [])):
                raise Conflict(f"VE {name!r} already has a snapshot {tag!r}")
            states = {vm: (await self._vm(ve, vm, "info"))["state"] for vm in sorted(ve["placement"])}
            marker = {"tag": tag, "paused": [vm for vm, state in states.items() if state == "running"],
                      "coordinator": self.agent.config.name, "since": time.time()}
            record = await self.agent.records.put(record.key, {**ve, "snapshotting": marker}, after=record.version)
            failure = None
            try:
                for vm in marker["paused"]:
                    await self._vm(ve, vm, "suspend")
                await _test_pause("snapshot")
                for vm, slot in sorted(ve["placement"].items()):
                    await self._host(slot, "host.snapshot", {"name": domain_name(name, vm), "tag": tag,
                                                             "state": states[vm]})
            except RequestError as err:
                failure = err
            entry = {"tag": tag, "time": time.time(), "state": ve["state"],
                     "vms": {vm: {"node": ve["placement"][vm]["node"], "state": states[vm]} for vm in states}}
            await self._finish_snapshot(record, None if failure else entry)
            if failure:
                raise RequestError(f"snapshot {tag} of {name} failed: {failure}")
        return {"name": name, **entry}

    async def _finish_snapshot(self, record: Record, entry: dict[str, Any] | None = None) -> Record:
        """Run again the VMs a snapshot paused and drop its marker, listing `entry` if the snapshot succeeded."""
        name, marker = record.value["name"], record.value["snapshotting"]
        for vm in marker["paused"]:
            await self._vm(record.value, vm, "settle", state="running")
        fresh = await self.agent.records.get(record.key)
        if fresh is None:
            raise NotFound(f"VE {name!r} was destroyed meanwhile")
        if fresh.value.get("snapshotting") != marker:
            return fresh
        value = {k: v for k, v in copy.deepcopy(fresh.value).items() if k != "snapshotting"}
        if entry is not None:
            value["snapshots"] = [*value.get("snapshots", []), entry]
        return await self.agent.records.put(record.key, value, after=fresh.version)

    async def _on_snapshots(self, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        record = await self._record(caller, args)
        return {"name": record.value["name"], "snapshots": record.value.get("snapshots", [])}

    async def _on_restore(self, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        """Bring every VM back to snapshot `tag` (each host re-creates the domain from what it stored, the VM
        relocated since or not) and the VE to the state it had then. Idempotent."""
        tag = args.get("tag")
        if not isinstance(tag, str) or not tag:
            raise RequestError("a snapshot tag is required")
        async with self._locked(caller, args) as record:
            ve = record.value
            name = ve["name"]
            entry = next((s for s in ve.get("snapshots", []) if s["tag"] == tag), None)
            if entry is None:
                tags = [s["tag"] for s in ve.get("snapshots", [])]
                known = f"snapshots: {', '.join(tags)}" if tags else "it has none"
                raise NotFound(f"VE {name!r} has no snapshot {tag!r} ({known})")
            failures = []
            for vm, slot in sorted(ve["placement"].items()):
                try:
                    await self._host(slot, "host.restore", {"name": domain_name(name, vm), "tag": tag})
                except RequestError as err:
                    failures.append(f"{vm}: {err}")
            if failures:
                raise RequestError(f"restoring {name} to {tag} failed for " + "; ".join(failures))
            value = {**ve, "state": entry["state"]}
            await self.agent.records.put(record.key, value, after=record.version)
        return value


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
        agent = self.service.agent
        if agent.config.join and len(agent.membership.alive()) < 2 and now < self.deadline:
            return  # not joined yet: the records are elsewhere
        try:
            left = await self.service.recover_abandoned()
        except Exception as err:  # a background pass must not take the agent down; it is tried again
            log.warning("recovery pass failed: %s", err)
            left = 1
        if left == 0 or now >= self.deadline:
            self.tick_interval = math.inf


def check_placement(spec: VESpec, node_of: Mapping[str, str], site_of: Mapping[str, str]) -> str | None:
    """Why VMs placed at `node_of` (VM -> node; `site_of`: node -> site) break the VE's site pin or
    constraints, in one line naming the constraint; None if they break nothing. Relocation checks the
    whole VE with it, as it would be after the move."""
    constraints = spec.constraints
    for vm, node in sorted(node_of.items()):
        if spec.site is not None and site_of[node] != spec.site:
            return f"the VE is pinned to site {spec.site}; {vm} would be in {site_of[node]}"
    for group in constraints.together():
        nodes = sorted({node_of[vm] for vm in group})
        if len(nodes) > 1:
            return f"affinity [{', '.join(group)}] keeps them on one node; they would be on {', '.join(nodes)}"
    for group in constraints.anti_affinity:
        first: dict[str, str] = {}
        for vm in group:
            other = first.setdefault(node_of[vm], vm)
            if other != vm:
                return f"anti-affinity [{', '.join(group)}]: {other} and {vm} would share {node_of[vm]}"
    sites = sorted({site_of[node] for node in node_of.values()})
    if constraints.same_site and len(sites) > 1:
        return f"same_site: the VMs would be in {len(sites)} sites ({', '.join(sites)})"
    if constraints.spread_sites is not None and len(sites) < constraints.spread_sites:
        return (f"spread over {constraints.spread_sites} sites: the VMs would cover only {len(sites)} "
                f"({', '.join(sites)})")
    if constraints.max_per_node is not None:
        node, count = max(sorted(Counter(node_of.values()).items()), key=lambda item: item[1])
        if count > constraints.max_per_node:
            return f"max_per_node {constraints.max_per_node}: {node} would hold {count} VMs of the VE"
    return None


def _interrupted(ve: dict[str, Any]) -> list[dict[str, Any]]:
    """The intents of the operations left unfinished in a VE record: moves, and a snapshot."""
    intents = [slot["moving_to"] for _, slot in sorted(ve["placement"].items()) if slot.get("moving_to")]
    return intents + ([ve["snapshotting"]] if ve.get("snapshotting") else [])


def _arrived(intent: dict[str, Any]) -> dict[str, Any]:
    """The slot of a VM whose move to the intent's node is complete."""
    return {k: intent[k] for k in ("node", "addr", "site", "rtt_ms", "why")}


async def _test_pause(point: str) -> None:
    """Test-only fault hook: with DISCOVERY_TEST_PAUSE=<point>:<seconds>[,<point>:<seconds>...] in its
    environment, a coordinator sleeps at each `point` named so that a test can kill it there. Points:
    `prepared` (target reserved, source exported and frozen, target not yet confirmed), `started` (the
    target runs the VM, the source still holds its frozen copy), `snapshot` (the VE's running VMs
    paused, no snapshot stored yet). Unset, it does nothing."""
    for item in os.environ.get(PAUSE_ENV, "").split(","):
        where, _, seconds = item.partition(":")
        if where == point:
            try:
                delay = float(seconds)
            except ValueError:
                return
            log.warning("%s: pausing %g s at %s", PAUSE_ENV, delay, point)
            await trio.sleep(delay)


def _may_act(caller: Caller, ve: dict[str, Any]) -> bool:
    """A VE's owner (the certificate that created it) and operators may act on it; nobody else."""
    return caller.role == "operator" or ve.get("owner") == caller.cn


async def install(agent: NodeAgent) -> None:
    """Agent extension hook: adds the VE service, and its recovery of interrupted operations, to a node agent."""
    agent.actors.append(Recovery(VEService(agent)))
