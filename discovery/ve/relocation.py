"""Relocation (`ve relocate`): moving VMs between nodes. Real guests on per-node daemons migrate live;
otherwise a real guest is saved, shipped and restored, and a test-driver VM (its XML, state and
snapshots) is carried (`Relocation._transfer`). `Relocation._move` describes the protocol around the
transfer and why an interrupted relocation never leaves a VM at two places or at none.
After a move the whole VE must still keep its site pin and constraints (`check_placement`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

import trio

from agents.hypervisor.actor import SETTLED
from discovery.ve import placement as planner
from discovery.ve.base import PREPARE_LIMIT, VEBase, domain_name, pause_for_test
from discovery.ve.spec import VESpec
from overlay.dht import Record
from overlay.membership import Member
from overlay.wire.rpc import Caller, NotFound, RequestError

log = logging.getLogger(__name__)
SHOWN_REASONS = 3  # nodes whose refusal a relocation's error names
METHODS = ("auto", "live", "ship")


class Relocation(VEBase):
    """`ve.relocate`, and the recovery of a move its coordinator left unfinished."""

    async def _on_relocate(self, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        """Move one VM (`vm`) or every VM of a VE to node `to`, or into site `site` (the node chosen by
        placement), provided the whole VE keeps its constraints afterwards; VMs already there stay.
        Safe to retry: a retry first finishes or undoes an interrupted move, then moves what is left.

        A standby copy of the VM on its target (`ve replicate`) is dropped before the move: next to the
        VM it would protect nothing, and its held room is what the VM needs there. Refusing instead would
        make the user drop every copy of the VE to use that node; dropping one copy is safe (the VM never
        runs at two places: a standby is not a domain) and shows in `ve show` until `ve replicate` runs
        again."""
        vm, to, site, method = args.get("vm"), args.get("to"), args.get("site"), args.get("method") or "auto"
        if (to is None) == (site is None):
            raise RequestError("relocate needs either a target node (to) or a target site (site)")
        if method not in METHODS:
            raise RequestError(f"method must be one of {', '.join(METHODS)}")
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
                targets = self._to_node(to, moving, caller)
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
                    record = await self._drop_copy(record, v, member.name)
                    record = await self._move(record, v, member, why, method)
                    moved.append(v)
        return {**record.value, "moved": moved}

    def _to_node(self, to: str, moving: list[str], caller: Caller) -> dict[str, tuple[Member, str]]:
        member = next((m for m in self.agent.membership.alive() if m.name == to), None)
        if member is None:
            raise RequestError(f"no live node named {to!r}")
        return {vm: (member, f"relocated to {to} by {caller.cn}") for vm in moving}

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

    async def _move(self, record: Record, vm: str, target: Member, why: str, method: str) -> Record:
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
        `ve_service.Recovery` actor); any agent at the next command that changes the VE (`_settle`) once
        the coordinator is abandoned (`VEService._check_abandoned`). Two agents recovering one move at
        once decide the same way (no coordinator imports the VM any more, so whether the target holds it
        cannot change) and take the same idempotent steps.
        """
        ve = record.value
        name, slot = ve["name"], ve["placement"][vm]
        domain = domain_name(name, vm)
        need = next(v for v in VESpec.from_dict(ve["spec"]).vms if v.name == vm)
        source = await self._host(slot, "host.vm", {"name": domain, "action": "info"})
        state = source["state"]
        _check_method(method, source)
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
                transfer = await self._transfer(slot, intent, domain, token, state, source, reserved, method)
        except (RequestError, trio.TooSlowError) as err:
            cause = f"not done within {PREPARE_LIMIT:g} s" if isinstance(err, trio.TooSlowError) else str(err)
            if token is not None:
                await self.agent.transport.call_many([target.addr], "host.release", {"token": token})
            return await self._settle_failed(  # forward if the target had taken it after all
                self._recover_move, record, vm, f"relocating {name}/{vm} to {target.name}", cause,
                f"cannot relocate {name}/{vm} to {target.name}: {cause}; rolled back, it stays on {slot['node']}")
        record = await self._put_slot(record, vm, {**slot, "moving_to": {**intent, "phase": "started",
                                                                         "since": time.time()}})
        await pause_for_test("started")
        try:
            await self._host(slot, "host.vm", {"name": domain, "action": "undefine"})
        except RequestError as err:
            raise RequestError(f"{name}/{vm} runs on {target.name}, but its old copy could not be removed yet "
                               f"({err}); retry to finish") from None
        return await self._put_slot(record, vm, {**_arrived(intent), "transfer": transfer})

    async def _transfer(self, slot: dict[str, Any], intent: dict[str, Any], domain: str, token: str, state: str,
                        source: dict[str, Any], reserved: dict[str, Any], method: str) -> dict[str, Any]:
        """Step 2 of `_move` once the target has reserved: get the VM there, one of three ways.

        - live: both nodes run real guests on their own libvirtd, the VM is active and has no internal
          snapshots (an NBD disk copy would drop them): the target prepares an empty overlay, the source's
          daemon migrates the VM peer to peer, with the disk's own layer copied incrementally; the VM runs
          throughout but for the final switch-over, and libvirt guarantees it runs at one place only;
        - ship: real guests otherwise (stopped, with snapshots, or the embedded driver): the source stops
          the VM into a memory image, the target pulls the image and the qcow2 disk (snapshots inside)
          and restores it (save → ship → restore);
        - carry: the test driver, whose VM is its XML: the source freezes (pauses) it, the target defines
          it from the carried XML.
        `method` "auto" picks the first that works; "live" or "ship" insists (an operator measuring
        one, or avoiding a live migration's load), and is refused where it cannot work.
        Returns how, and how long it took (for a live migration, most of that time the VM ran)."""
        backend = source.get("backend", "test")
        if backend != reserved.get("backend", "test"):
            raise RequestError(f"cannot move a {backend} VM to a {reserved.get('backend')} node")
        live = bool(source.get("live") and reserved.get("migration_uri") and state != "shutoff")
        if method == "live" and not live:
            raise RequestError(f"cannot migrate it live: {intent['node']} has no libvirtd of its own")
        started = time.monotonic()
        if live and method in ("auto", "live"):
            how = "live"
            await self._host(intent, "host.incoming", {"name": domain})
            await pause_for_test("prepared")
            await self._host(slot, "host.migrate", {"name": domain, "uri": reserved["migration_uri"]})
            await self._host(intent, "host.vm", {"name": domain, "action": "settle", "state": state})
        else:
            how = "ship" if source.get("backend", "test") != "test" else "carry"
            carried = await self._host(slot, "host.export", {"name": domain, "freeze": True, "ship": how == "ship"})
            await pause_for_test("prepared")
            ship = {"ship": {"from": slot["addr"], "image": carried["ship"]["image"]}} if how == "ship" else {}
            await self._host(intent, "host.confirm", {"token": token, "xml": carried["xml"], "state": state,
                                                      "snapshots": carried["snapshots"], **ship})
        return {"how": how, "seconds": round(time.monotonic() - started, 3)}

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


def _check_method(method: str, source: dict[str, Any]) -> None:
    """Refuse, before anything changes, a `method` the VM's own host says cannot work (the target's
    side is known only once it has reserved: `_transfer` checks it)."""
    if method == "live" and not source.get("live"):
        raise RequestError("cannot migrate it live: that needs real guests on per-node daemons at both ends, "
                           "an active VM, and no internal snapshots")
    if method == "live" and source["state"] == "shutoff":
        raise RequestError("cannot migrate it live: it is shut off")
    if method == "ship" and source.get("backend", "test") == "test":
        raise RequestError("cannot ship it: a test-driver VM has no disk or memory; use --method auto")


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


def _arrived(intent: dict[str, Any]) -> dict[str, Any]:
    """The slot of a VM whose move to the intent's node is complete."""
    return {k: intent[k] for k in ("node", "addr", "site", "rtt_ms", "why")}


