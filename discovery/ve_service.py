"""VE management from any node: the `ve.*` RPCs that the CLI calls on whichever agent it reaches.

The agent that receives a request coordinates it: it reads the VE record from the directory (the
agent's records, on the overlay the cluster is bound to: Chord's DHT or Kademlia), talks to the
hosts of the VMs, and writes the record back. Placement tries this node, then the nearest nodes with
room found by the spiral search (`agents.spiral`), then every other member by RTT; each VM is
reserved with a two-phase handshake (reserve on the target, then confirm), so a coordinator that
dies half-way leaves only reservations that lapse by themselves.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import Any

import trio

from agents.node import NodeAgent
from discovery import placement as planner
from discovery.spec import NO_CONSTRAINTS, SpecError, VESpec
from overlay.dht import Record
from overlay.membership import Member
from overlay.rpc import Caller, Conflict, Forbidden, NotFound, RequestError, RpcError

log = logging.getLogger(__name__)
PREFIX = "ve/"
HOST_TIMEOUT = 40.0
MAX_REPLANS = 3  # a graceful stop may take the hypervisor's shutdown timeout


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
        for verb in ("create", "list", "show", "locate", "start", "stop", "suspend", "resume", "destroy"):
            agent.transport.route(f"ve.{verb}", getattr(self, f"_on_{verb}"))

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
        return {"name": record.value["name"], "state": record.value["state"],
                "vms": {vm: {k: slot[k] for k in ("node", "site", "addr")}
                        for vm, slot in sorted(record.value["placement"].items())}}

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
        record = await self._record(caller, args)
        await self._on_every_vm(record.value, "undefine")
        await self.agent.records.delete(record.key, after=record.version)
        return {**record.value, "state": "destroyed"}

    async def _apply(self, caller: Caller, args: dict[str, Any], action: str, state: str) -> dict[str, Any]:
        record = await self._record(caller, args)
        await self._on_every_vm(record.value, action)
        value = {**record.value, "state": state}
        await self.agent.records.put(record.key, value, after=record.version)
        return value

    async def _on_every_vm(self, ve: dict[str, Any], action: str) -> None:
        """Run `action` on each VM's host; all hosts are tried, and any failure is reported."""
        failures = []
        for vm_name, slot in ve["placement"].items():
            try:
                await self.agent.transport.call(slot["addr"], "host.vm", {
                    "name": domain_name(ve["name"], vm_name), "action": action}, timeout=HOST_TIMEOUT)
            except RpcError as err:
                failures.append(f"{vm_name} on {slot['node']}: {err}")
        if failures:
            raise RequestError(f"{action} failed for " + "; ".join(failures))


def _may_act(caller: Caller, ve: dict[str, Any]) -> bool:
    """A VE's owner (the certificate that created it) and operators may act on it; nobody else."""
    return caller.role == "operator" or ve.get("owner") == caller.cn


async def install(agent: NodeAgent) -> None:
    """Agent extension hook: adds the VE service to a node agent."""
    VEService(agent)
