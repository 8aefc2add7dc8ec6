"""Relocation (`ve relocate`): moving VMs between nodes. Real guests on per-node daemons migrate live;
otherwise a real guest is saved, shipped and restored, and a test-driver VM (its XML, state and
snapshots) is carried. This module chooses where VMs go and checks that the whole VE keeps its site pin
and constraints afterwards (`placement.check_placement`); each VM's move is the sans-IO transaction
`discovery.ve.moves.Move` (its protocol, and why an interrupted relocation never leaves a VM running at two
places or lost), which `_move` and `_recover_move` only drive (`discovery.ve.driver`).
"""

from __future__ import annotations

import dataclasses
import logging

from discovery.ve import placement as planner
from discovery.ve.base import PREPARE_LIMIT, VEBase, domain_name
from discovery.ve.directory import Stored
from discovery.ve.driver import drive
from discovery.ve.messages import EITHER, RecordView, Relocate
from discovery.ve.moves import Move, MoveRecovery
from discovery.ve.records import Slot, VERecord, view
from discovery.ve.spec import VESpec, VMSpec
from discovery.ve.transaction import Candidate
from overlay.membership import Member
from overlay.wire.rpc import Caller, NotFound, RequestError

log = logging.getLogger(__name__)
SHOWN_REASONS = 3  # nodes whose refusal a relocation's error names


class Relocation(VEBase):
    """`ve.relocate`, and the recovery of a move its coordinator left unfinished."""

    async def _on_relocate(self, caller: Caller, request: Relocate) -> RecordView:
        """`relocate` one VM (`vm`) or every VM of a VE to node `to`, or into site `site`, by `method`."""
        ve, moved = await self.relocate(caller, request.name, request.vm, request.to, request.site,
                                        request.method or "auto")
        return {**view(ve), "moved": moved}

    async def relocate(self, caller: Caller, name: str, vm: str | None, to: str | None, site: str | None = None,
                       method: str = "auto") -> tuple[VERecord, list[str]]:
        """Move one VM (`vm`) or every VM of VE `name` to node `to`, or into site `site` (the node chosen by
        placement), provided the whole VE keeps its constraints afterwards; VMs already there stay. Returns
        the VE as it is after, and the VMs moved. Safe to retry: a retry first finishes or undoes an
        interrupted move, then moves what is left.

        A standby copy of the VM on its target (`ve replicate`) is dropped before the move: next to the
        VM it would protect nothing, and its held room is what the VM needs there. Refusing instead would
        make the user drop every copy of the VE to use that node; dropping one copy is safe (the VM never
        runs at two places: a standby is not a domain) and shows in `ve show` until `ve replicate` runs
        again."""
        async with self._locked(caller, name) as record:
            ve = record.ve
            placement = ve.placement
            if vm is not None and vm not in placement:
                raise NotFound(f"VE {name!r} has no VM {vm!r} (VMs: {', '.join(sorted(placement))})")
            moving = [vm] if vm is not None else sorted(placement)
            if to is not None:
                targets = self._to_node(to, moving, caller)
            elif site is not None:
                targets = await self._to_site(ve, moving, site)
            else:
                raise RequestError(EITHER)
            after = {v: targets[v][0].name if v in targets else slot.node for v, slot in placement.items()}
            sites = {slot.node: slot.site for slot in placement.values()}
            sites.update({member.name: member.site for member, _ in targets.values()})
            reason = planner.check_placement(ve.spec, after, sites)
            if reason:
                raise RequestError(f"cannot relocate {name}: {reason}")
            moved = []
            for v in moving:
                member, why = targets[v]
                if record.ve.placement[v].node != member.name:
                    record = await self._drop_copy(record, v, member.name)
                    record = await self._move(record, v, member, why, method)
                    moved.append(v)
        return record.ve, moved

    def _to_node(self, to: str, moving: list[str], caller: Caller) -> dict[str, tuple[Member, str]]:
        member = next((m for m in self.membership.alive() if m.name == to), None)
        if member is None:
            raise RequestError(f"no live node named {to!r}")
        return {vm: (member, f"relocated to {to} by {caller.cn}") for vm in moving}

    async def _to_site(self, ve: VERecord, moving: list[str], site: str) -> dict[str, tuple[Member, str]]:
        """Where the moving VMs go in `site`. The whole VE: planned again inside the site, as create
        plans it (the room its own VMs hold counts as free). One VM: the nearest node of the site with
        room where the whole VE, the other VMs staying put, keeps its constraints."""
        name, spec, placement, me = ve.name, ve.spec, ve.placement, self.node
        if spec.site is not None and site != spec.site:
            raise RequestError(f"cannot relocate {name} to site {site}: the VE is pinned to site {spec.site}")
        if all(placement[vm].site == site for vm in moving):  # already there: nothing moves
            return {vm: (Member(placement[vm].node, placement[vm].addr, site), placement[vm].why) for vm in moving}
        needs = {v.name: v for v in spec.vms}
        if len(moving) == len(placement):
            pinned = dataclasses.replace(spec, site=site)
            candidates = [with_own_room(c, [needs[v] for v, slot in placement.items() if slot.node == c.node])
                          for c in await self._candidates(pinned, everyone=True)]
            result = planner.plan(pinned, [c.offer(rank) for rank, c in enumerate(candidates) if c.free])
            if isinstance(result, planner.Refusal):
                raise RequestError(f"cannot relocate {name} to site {site}: {result}")
            by_name = {c.node: c for c in candidates}
            return {vm: (self._member(by_name[node]), f"relocated to site {site}, nearest with room "
                                                f"({by_name[node].describe(me)})")
                    for vm, node in result.assignment.items()}
        vm = moving[0]
        alone = VESpec(name, (needs[vm],), site)
        candidates = await self._candidates(alone, everyone=True)
        fixed = {v: slot.node for v, slot in placement.items() if v != vm}
        sites = {slot.node: slot.site for slot in placement.values()}
        allowed, ruled_out = [], []
        for rank, c in enumerate(candidates):
            if not c.free:
                continue
            why = planner.check_placement(spec, {**fixed, vm: c.node}, {**sites, c.node: c.site})
            if why:
                ruled_out.append(f"{c.node}: {why}")
            else:
                allowed.append(c.offer(rank))
        result = planner.plan(alone, allowed)
        if isinstance(result, planner.Refusal):
            reasons = [str(result)] if allowed else []
            hidden = len(ruled_out) - SHOWN_REASONS
            reasons[:0] = ruled_out[:SHOWN_REASONS] + ([f"{hidden} more nodes ruled out"] if hidden > 0 else [])
            raise RequestError(f"cannot relocate {name}/{vm} to site {site}: {'; '.join(reasons)}")
        chosen = next(c for c in candidates if c.node == result.assignment[vm])
        return {vm: (self._member(chosen), f"relocated to site {site}, nearest with room ({chosen.describe(me)})")}

    def _member(self, candidate: Candidate) -> Member:
        """The member a candidate is (its RTT measured, for the slot)."""
        return self.membership.members.get(candidate.node) or Member(candidate.node, candidate.addr, candidate.site)

    async def _move(self, record: Stored, vm: str, target: Member, why: str, method: str) -> Stored:
        """Move one VM to `target`; returns the record after the move.

        The move is a small transaction whose log is the VE record itself, so that whoever reads the
        record next can finish it: its steps, how the VM gets there (live, shipped or carried), and why
        an interrupted move never leaves the VM running at two places or lost, are the state machine
        `discovery.ve.moves.Move`; this method only performs what it asks (`discovery.ve.driver`).

        Who recovers: the coordinator itself when a step fails (inside `Move`), and at its start after a
        crash (the `discovery.ve.service.Recovery` actor); any agent at the next command that changes the VE
        (`_settle`) once the coordinator is abandoned (`VEService._check_abandoned`): `_recover_move`.
        """
        ve = record.ve
        need = next(v for v in ve.spec.vms if v.name == vm)
        await self._bring_image(need, target.name, target.addr)  # before any intent: a failure changes nothing
        rtt = target.rtt * 1000 if target.rtt is not None else None
        move = Move(ve, vm, domain_name(ve.name, vm), Slot(target.name, target.addr, target.site, rtt, why), method,
                    {"vcpus": need.vcpus, "memory_mb": need.memory_mb, "disk_gb": need.disk_gb}, self.node,
                    PREPARE_LIMIT)
        source = ve.placement[vm].node
        record, _ = await drive(move, record, self.transport, self.directory)
        self.events.note("vm_relocated", f"{ve.name}/{vm}", f"{source} -> {target.name}")
        await self._moved(record.ve)
        return record

    async def _recover_move(self, record: Stored, vm: str) -> tuple[Stored, bool]:
        """Finish or undo the interrupted move of `vm` (`discovery.ve.moves.MoveRecovery`); returns the record
        and whether the move went forward. Raises RequestError, leaving the intent in place, if a host cannot
        be reached."""
        recovery = MoveRecovery(record.ve, vm, domain_name(record.ve.name, vm))
        record, forward = await drive(recovery, record, self.transport, self.directory)
        log.info("move of %s/%s to %s %s", recovery.name, vm, recovery.intent.node,
                 "finished" if forward else "undone")
        return record, forward


def with_own_room(candidate: Candidate, own: list[VMSpec]) -> Candidate:
    """`candidate` with the room the VE's own VMs there hold counted as free (they are planned again)."""
    if candidate.free is None or not own:
        return candidate
    free = {f: candidate.free.get(f, 0) + sum(getattr(v, f) for v in own) for f in ("vcpus", "memory_mb", "disk_gb")}
    return dataclasses.replace(candidate, free=free)
