"""Rebuilding a VM whose host is down on another node, from the image it boots, as a sans-IO transaction:
`Rebuild` (its coordinator's side) and `RebuildRecovery` (anyone finishing or undoing a rebuild left
unfinished). `discovery.ve.rebuilds` chooses which VMs are rebuilt and drives these (`discovery.ve.driver`).

A rebuild is the `restart` of the HA policy: the VM has no standby copy to promote (that is a failover,
`discovery.ve.failovers`), so a new domain is made from its spec on a node chosen as a create chooses
(`discovery.ve.placement`), booting `image`, in the state its VE is recorded in; what the old disk held since
`image` was taken is lost. `image` is only handed to `host.prefetch` and `host.confirm`: the shell passes the
VM's newest shipped snapshot (`discovery.ve.shipping`), else the image its spec names.

Why a state machine: as a failover, a rebuild interleaves RPCs with writes to the VE record and may stop after
any of them; here its logic is fed observations and returns actions (`discovery.ve.transaction`), so its whole
table and its interleavings are tested without processes (tests/unit/test_ve_rebuilding.py). It must never
touch a socket, a clock or trio.

**The log is the record.** The VM's slot gets `rebuilding`, a `discovery.ve.records.RebuildIntent` (the node,
addr, site, rtt_ms, `from`: the old host, why, the image, the state to bring the VM to, coordinator, since),
before any domain is defined or switched off. The node is reserved first, as a create reserves before it
writes its placement: the intent must name a node that has the room, and a reservation is no domain (it
lapses by itself, `agents.host.args.RESERVATION_TTL`; its token lives in the coordinator only).

States of a `Rebuild`::

    SEARCH this node and the nearest with room ───────────────────────────── fails ──► refused (nothing changed)
    PLAN one node: not the old host, nor a node keeping a standby of the VM; the VE's site pin and constraints
       with its other VMs (`pending` ones, rebuilt next, left out); the old host's site first, then the holders
       of the image, then nearest ── none, or none in the old host's site: SEARCH every member, once; none
       again ──► refused
    RESERVE it ── refused ──► PLAN without it; after 1 + MAX_REPLANS plans ──► refused
    PREFETCH the image if the node lacks it (the host keeps the reservation alive) ── fails ──► RELEASE ─► refused
    INTENT: write rebuilding ── fails ──► RELEASE ─► refused (if the write landed, recovery undoes it)
       ├─ forced (the old host alive): SWITCH_OFF its copy (host.vm.destroy: persisted off) ─┐
       └─ its host down ─────────────────────────────────────────────────────────────────────┤
    REBUILD (test pause) ◄───────────────────────────────────────────────────────────────────┘
       ─► CONFIRM (the node defines the VM booting `image`, brought to the state) ─► ENDING, forward
    SWITCH_OFF or CONFIRM fails ──► RELEASE (best effort: a late confirm then finds no reservation)
       ─► RECOVERING (a `RebuildRecovery`): went forward ─► done; undone ─► refused, "undone, it stays on
       <old host>"; stopped ─► refused, "left unfinished"

States of a `RebuildRecovery` (and of the ENDING of a `Rebuild`): those of a
`discovery.ve.takeover.TakeoverRecovery` (shared with a failover), asking the intent's node; it brings the VM
to its state by settling it there (idempotent), and writes the slot = that node (forward), or the slot without
the intent (undone).

**The rule** (tested over the table and interleavings): recovery decides from the node the intent names,
never from how far the coordinator got: forward iff that node holds the domain; the old copy is removed only
then; a node that cannot be asked stops recovery before it changes anything. Only `host.confirm` defines the
domain there, with a token only the coordinator held, so once the coordinator is gone (the driver's to ensure:
`VEService._check_abandoned`) two recoverers decide alike. The old host is down, or (forced) its copy was
switched off before the confirm, so the VM runs at one place while this happens; a host that was down comes
back holding its copy off and does not start it while an intent is under way (`Replicas.fence`; for at most
`agents.host.service.HOLD_LIMIT`). Known limit: a host taken for down that is only cut off keeps running its
copy until it reads the directory again (there is no STONITH), as for a failover.
"""

from __future__ import annotations

import enum
from collections.abc import Collection
from dataclasses import replace

from discovery.ve import placement as planner
from discovery.ve.creating import MAX_REPLANS, PREFETCH_TIMEOUT, RESERVE_TIMEOUT
from discovery.ve.failovers import VM_STATE
from discovery.ve.records import RebuildIntent, Slot, VERecord
from discovery.ve.spec import DEFAULT_IMAGE, VESpec
from discovery.ve.takeover import TakeoverRecovery, told
from discovery.ve.transaction import (
    Action,
    CallHost,
    Candidate,
    CandidatesFound,
    Continued,
    DirectoryFailed,
    Done,
    FindCandidates,
    HostAnswered,
    HostFailed,
    Observation,
    PauseForTest,
    RecordWritten,
    Refuse,
    SearchFailed,
    UnexpectedObservation,
    WriteRecord,
    vm_action,
)

SHOWN_REASONS = 3
"""Nodes whose ruling-out a refusal names."""


class Step(enum.Enum):
    SEARCH = "search"
    RESERVE = "reserve"
    PREFETCH = "prefetch"
    INTENT = "intent"
    RELEASE = "release"
    SWITCH_OFF = "switch off"
    PAUSE = "pause"
    CONFIRM = "confirm"
    RECOVERING = "recovering"
    ENDING = "ending"
    OVER = "over"


class Rebuild:
    """Make `vm` of the record `value` again on another node, booting `image` (None: none), its host down for
    `why` (None: alive, and the rebuild forced). `pending`: the VE's other VMs to be rebuilt after this one
    (their slots do not bind the placement). Ends with `Done(True)` or `Refuse`; `value` is the record as last
    read or written; `notes`: nodes that refused a reservation, for the driver's caller to log."""

    def __init__(self, value: VERecord, vm: str, domain: str, image: str | None, why: str | None,
                 coordinator: str, pending: Collection[str] = ()) -> None:
        self.value, self.vm, self.domain, self.image, self.why = value, vm, domain, image, why
        self.name = value.name
        self.slot = value.placement[vm]
        self.coordinator = coordinator
        self.pending = frozenset(pending)
        spec = next(v for v in value.spec.vms if v.name == vm)
        self.need = replace(spec, image=image or DEFAULT_IMAGE)
        """The VM as placement sees it: its room, and the image it boots (the nodes holding it come first)."""
        self.step = Step.SEARCH
        self.widened = False
        self.plans = 0
        self.candidates: tuple[Candidate, ...] = ()
        self.excluded: list[str] = []
        self.target: Candidate | None = None
        self.token = ""
        self.intent: RebuildIntent | None = None
        self.cause = Refuse("")
        self.inner: RebuildRecovery | None = None
        self.notes: list[str] = []
        self._pending = value

    def start(self, now: float) -> Action:
        return self._search(everyone=False)

    def on(self, observation: Observation, now: float) -> Action:
        if self.step in (Step.RECOVERING, Step.ENDING):
            assert self.inner is not None
            return self._from_inner(self.inner.on(observation, now))
        match self.step, observation:
            case Step.SEARCH, CandidatesFound(candidates=found):
                self.candidates = found
                return self._plan()
            case Step.SEARCH, SearchFailed(reason=reason, kind=kind):
                return self._over(Refuse(f"cannot rebuild {self.name}/{self.vm}: {reason}", kind))
            case Step.RESERVE, HostAnswered(answer=reserved):
                self.token = reserved["token"]
                return self._prefetch(now)
            case Step.RESERVE, HostFailed(node=node, reason=reason):
                self.notes.append(f"reservation of {self.vm} on {node} refused: {reason}; planning again without it")
                self.excluded.append(node)
                return self._plan()
            case Step.PREFETCH, HostAnswered():
                return self._write_intent(now)
            case Step.PREFETCH, HostFailed(reason=reason):
                return self._release(Refuse(f"cannot rebuild {self.name}/{self.vm}: cannot bring the image: {reason}"))
            case Step.INTENT, RecordWritten():
                self.value = self._pending
                if self.why is None:
                    self.step = Step.SWITCH_OFF
                    return vm_action(self.slot, self.domain, "host.vm.destroy")
                return self._pause()
            case Step.INTENT, DirectoryFailed(reason=reason, kind=kind):
                return self._release(Refuse(reason, kind))
            case Step.SWITCH_OFF, HostAnswered():
                return self._pause()
            case Step.PAUSE, Continued():
                self.step = Step.CONFIRM
                assert self.intent is not None, "written before the pause"
                return CallHost(self.intent.node, self.intent.addr, "host.confirm", {
                    "token": self.token, "state": self.intent.state, **self.value.nic_args(self.vm),
                    **({"image": self.image} if self.image else {})})
            case Step.CONFIRM, HostAnswered():
                self.step = Step.ENDING
                self.inner = RebuildRecovery(self.value, self.vm, self.domain, forward=True)
                return self._from_inner(self.inner.start(now))
            case Step.SWITCH_OFF | Step.CONFIRM, HostFailed(reason=reason):
                return self._release(Refuse(reason))
            case Step.RELEASE, HostAnswered() | HostFailed():
                if self.intent is None or self.value.placement[self.vm].rebuilding != self.intent:
                    return self._over(self.cause)  # nothing of it in the record: nothing to undo
                self.step = Step.RECOVERING
                self.inner = RebuildRecovery(self.value, self.vm, self.domain)
                return self._from_inner(self.inner.start(now))
        raise UnexpectedObservation(self, self.step, observation)

    def _search(self, everyone: bool) -> Action:
        self.step = Step.SEARCH
        return FindCandidates(VESpec(self.name, (self.need,), self.value.spec.site), everyone)

    def _plan(self) -> Action:
        """The node: the first candidate by (not in the old host's site, nearness) with room where the VE keeps
        its constraints; with none (or none in the old host's site), every member is asked once."""
        if self.plans > MAX_REPLANS:
            return self._over(Refuse(f"cannot rebuild {self.name}/{self.vm}: nodes kept refusing reservations "
                                     f"({', '.join(self.excluded)})"))
        self.plans += 1
        spec, here = self.value.spec, self.slot.site
        fixed = {v: s.node for v, s in self.value.placement.items() if v != self.vm and v not in self.pending}
        sites = {s.node: s.site for s in self.value.placement.values()}
        copies = {e.node for e in self.value.standbys_of(self.vm)}
        ranked = [c for _, c in sorted(enumerate(self.candidates), key=lambda found: (found[1].site != here, found[0]))]
        allowed, ruled_out = [], []
        for rank, c in enumerate(ranked):
            if c.node == self.slot.node or c.node in copies or c.node in self.excluded or not c.free:
                continue
            why = planner.check_placement(spec, {**fixed, self.vm: c.node}, {**sites, c.node: c.site})
            if why:
                ruled_out.append(f"{c.node}: {why}")
            else:
                allowed.append(c.offer(rank))
        result = planner.plan(VESpec(self.name, (self.need,), spec.site), allowed)
        chosen = None if isinstance(result, planner.Refusal) else \
            next(c for c in self.candidates if c.node == result.assignment[self.vm])
        if not self.widened and (chosen is None or chosen.site != here):
            self.widened = True
            return self._search(everyone=True)
        if chosen is None:
            assert isinstance(result, planner.Refusal)
            hidden = len(ruled_out) - SHOWN_REASONS
            reasons = ruled_out[:SHOWN_REASONS] + ([f"{hidden} more nodes ruled out"] if hidden > 0 else [])
            reasons += [str(result)] if allowed or not ruled_out else []
            reasons += [f"{', '.join(self.excluded)} refused a reservation"] if self.excluded else []
            return self._over(Refuse(f"cannot rebuild {self.name}/{self.vm}: {'; '.join(reasons)}"))
        self.target, self.step = chosen, Step.RESERVE
        return CallHost(chosen.node, chosen.addr, "host.reserve", {
            "name": self.domain, "vcpus": self.need.vcpus, "memory_mb": self.need.memory_mb,
            "disk_gb": self.need.disk_gb}, timeout=RESERVE_TIMEOUT)

    def _prefetch(self, now: float) -> Action:
        assert self.target is not None
        if self.image is None or self.target.holds_image:
            return self._write_intent(now)
        self.step = Step.PREFETCH
        return CallHost(self.target.node, self.target.addr, "host.prefetch", {"token": self.token, "image": self.image},
                        timeout=PREFETCH_TIMEOUT)

    def _write_intent(self, now: float) -> Action:
        t = self.target
        assert t is not None
        self.intent = RebuildIntent(t.node, t.addr, t.site, t.rtt_ms, self.slot.node,
                                    self.why or f"forced while {self.slot.node} was alive", self.image,
                                    VM_STATE.get(self.value.state, "running"), self.coordinator, now)
        self.step = Step.INTENT
        self._pending = self.value.with_slot(self.vm, replace(self.slot, rebuilding=self.intent))
        return WriteRecord(self._pending)

    def _pause(self) -> Action:
        self.step = Step.PAUSE
        return PauseForTest("rebuild")

    def _release(self, cause: Refuse) -> Action:
        """Give the reservation back (best effort: it lapses anyway), then stop, or recover what the intent
        in the record may have led to."""
        assert self.target is not None
        self.cause, self.step = cause, Step.RELEASE
        return CallHost(self.target.node, self.target.addr, "host.release", {"token": self.token}, best_effort=True)

    def _from_inner(self, action: Action) -> Action:
        assert self.inner is not None
        self.value = self.inner.value
        if not isinstance(action, (Done, Refuse)):
            return action
        if self.step is Step.ENDING:
            return self._over(action)
        assert self.target is not None
        where = f"{self.name}/{self.vm} on {self.target.node}"
        return self._over(told(action, f"rebuild of {where}", f"rebuild {where}", self.cause.reason, self.slot.node))

    def _over(self, action: Done | Refuse) -> Action:
        self.step = Step.OVER
        return action


class RebuildRecovery(TakeoverRecovery):
    """Finish or undo the rebuild of `vm` that the record `value` holds the intent of (the module's rule, a
    `discovery.ve.takeover.TakeoverRecovery`'s); with `forward` given, the VM is known to be defined there and
    this only ends it (from TIDY). Ends with `Done(forward)`, or `Refuse` with the intent left in place."""

    def __init__(self, value: VERecord, vm: str, domain: str, forward: bool | None = None) -> None:
        intent = value.placement[vm].rebuilding
        assert intent is not None, "a recovery is made for a rebuild left in the record"
        super().__init__(value, vm, domain, intent, forward)
        self.rebuilding = intent

    def _bring(self) -> CallHost:
        return vm_action(self.intent, self.domain, "host.vm.settle", state=self.intent.state)

    def _outcome(self, fresh: VERecord) -> VERecord:
        """The record once the rebuild is over: the VM on the intent's node (forward), or where it was, without
        the intent (undone)."""
        slot = fresh.placement[self.vm]
        if not self.forward:
            return fresh.with_slot(self.vm, replace(slot, rebuilding=None))
        i = self.rebuilding
        booted = f" from image {i.image}" if i.image else ""
        return fresh.with_slot(self.vm, Slot(i.node, i.addr, i.site, i.rtt_ms,
                                             f"rebuilt{booted}, its host {i.source} lost ({i.why})"))
