"""DVMS inside each agent: the `IspNode` core of `dvms.partition` driven over the agents' RPC.

`DvmsService` is an actor that owns one `IspNode` and carries out its outputs, as `dvms.sim` does on
a virtual clock, but on the agent's clock and network. Its settings are the `[dvms]` table of agent.toml
(`discovery.scheduler.settings.DvmsSettings`):

* `Send` becomes a `dvms.msg` call (the message tagged with its type, `overlay.wire.codec.encode_tagged`; a
  malformed one is refused by the dispatcher before it reaches the core). A message lost to a failed call
  costs the core a reply timeout; a peer that gossip declares dead or gone is reported with `on_peer_failed`.
* The route is `spiral_then_ring`: the agent's spiral view (nearest first), then its ring successors.
* Monitoring, every second: each VM's CPU demand (percent of one vCPU) is what `dvms.load` pinned, else, for
  real guests (hypervisor "qemu"), what two samples of libvirt's cpu time give, else what an `Injector` gives
  (test driver, `injector_rate` > 0), else 0; memory is what a real guest uses (balloon stats), else what the
  VM reserved. On the test driver, a node whose host holds no VM and awaits none (`holds_vms`) lists nothing:
  a VM enters the host's ledger before its domain is defined, so the next sample sees it (not so with real
  guests, whose daemon may hold a domain that arrived by live migration before the host adopts it). By
  default nothing demands CPU on the test driver, so nothing ever moves. Each agent's injector starts at the
  agent's start, so a VM that moves carries on with its stream replayed on the new host's clock, not with the
  same trajectory (the agents share no clock origin).
* A pin is kept in the domain's own metadata (`PIN_NS`), so it travels with the VM's definition whichever way
  the VM is relocated (by DVMS or `ve relocate`: carried, shipped or migrated live) and leaves with it; the
  new host reads it when the domain appears.
* A `Monitor` turns the node's total into events. An overloaded node starts a partition (`on_problem`); so does
  an underloaded one holding VMs when `underload` > 0 (consolidation). A node still in trouble and in no
  partition asks again after `retry` seconds (an underload after `underload_dwell` at least).
* `Solve`: the leader asks every member for its VMs and the capacity a plan may use (`dvms.report`: the
  monitor's `plan_node`, below `overload_clear` in the dimensions of an overload, so a plan clears it rather
  than leave the node at 100 %), reads the VEs' records for their rules and the VMs outside the partition,
  and runs `dvms.solver.solve` in a worker thread. An underloaded leader is evacuated (`evacuate`), and
  members without VMs are kept empty.
* `Apply`: the plan's migrations through this agent's own VE service (`ve.relocate` with `vm` and `to`, so
  constraints are checked, room is reserved on the target and an interrupted move is recovered). A node
  takes part in one migration at a time and a VE moves one VM at a time, in plan order
  (`dvms.solver.predecessors`); migrations between disjoint nodes run side by side. None starts at or after
  the Apply deadline.
* `dvms.status` shows the load, the partition, the partitions led with their problem (overload or underload)
  and how they ended, and recent events (problem, created, plan, migrated, ended...).

Authorization (`discovery.scheduler.messages`): `dvms.msg` and `dvms.report` are for agents (node role),
`dvms.status` for agents and operators, `dvms.load` (pins, `dvms capacity`) for operators. A relocation is
the agent's own act: it calls its VE service in process with an internal operator-role caller
(`dvms@<node>`), which no remote peer can present.

Wiring (`discovery.agent`): the service is given the few things it uses (`DvmsService.__init__`), never
the agent; the composition place routes its methods (`routes`) and subscribes it to membership news.
"""

from __future__ import annotations

import logging
import math
import time
import xml.etree.ElementTree as ET
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, Protocol

import trio

from agents.hypervisor.actor import DomainInfo, DomainStats, HypervisorError
from agents.runtime import Actor, Event, on_grid
from discovery.scheduler.messages import (
    DVMS_LOAD,
    DVMS_MSG,
    DVMS_REPORT,
    DVMS_STATUS,
    DvmsStatus,
    Loaded,
    MigrationView,
    NodeLoad,
    PartitionView,
    Report,
    ReportedVM,
    SetLoad,
)
from discovery.scheduler.settings import DvmsSettings
from discovery.ve.base import domain_name
from discovery.ve.directory import Directory, Unreadable
from discovery.ve.placement import check_placement
from discovery.ve.spec import VESpec
from dvms.model import VM, Migration, Node, Plan, Rules
from dvms.monitor import Load, Monitor, cpu_demand, memory_demand_mb
from dvms.partition import (
    Apply,
    Ended,
    IspConfig,
    IspNode,
    Output,
    PartitionId,
    Send,
    Solve,
    Wire,
    spiral_then_ring,
)
from dvms.solver import predecessors, solve
from dvms.workload import Injector
from overlay.membership import Membership
from overlay.messages import NoArgs
from overlay.wire import codec
from overlay.wire.rpc import Caller, Endpoint, Forbidden, RequestError, RpcError

log = logging.getLogger(__name__)
TICK = 0.1
MONITOR_PERIOD = 1.0  # seconds between two samples of the node's demand
MSG_TIMEOUT = 1.0
REPORT_TIMEOUT = 5.0
SOLVE_TIME_LIMIT = 1.0
MAX_EVENTS = 100
FINISHED = {"migrated": "migrated", "migration-failed": "failed", "migration-skipped": "skipped"}
"""The events that end a migration, and what they make of it (`DvmsService.migrations`)."""
PIN_NS = "urn:discovery:dvms"  # namespace of the domain metadata that holds a VM's pinned demand

# -- VE rules ----------------------------------------------------------------------------------------------


def rules_of(spec: VESpec) -> Rules:
    """A VE's placement rules for the solver, by domain name (`ve:vm`)."""
    c = spec.constraints

    def groups(gs: Any) -> tuple[frozenset[str], ...]:
        return tuple(frozenset(domain_name(spec.name, vm) for vm in g) for g in gs if len(g) > 1)

    return Rules(spec.name, affinity=groups(c.together()), anti_affinity=groups(c.anti_affinity), site=spec.site,
                 same_site=c.same_site, spread_sites=c.spread_sites, max_per_node=c.max_per_node)


# -- the service ----------------------------------------------------------------------------------------


class Domains(Protocol):
    """This node's hypervisor as DVMS reads it (`agents.hypervisor.actor.Hypervisor`)."""

    async def list(self) -> list[DomainInfo]: ...

    async def stats(self) -> dict[str, DomainStats]: ...

    async def metadata(self, name: str, uri: str) -> str | None: ...


SetMetadata = Callable[[str, str, str, str | None], Awaitable[None]]
"""Set (None: remove) a metadata element of a VM here (`agents.host.service.HostService.set_metadata`)."""
Relocate = Callable[[Caller, str, str, str], Awaitable[object]]
"""Move VM `vm` of VE `ve` to node `to`, as `caller` (`discovery.ve.relocation.Relocation.relocate`)."""


class DvmsService(Actor):
    """One agent's DVMS: the ISP core, the monitor, and the shell that solves and applies (module doc).

    Given: `node`, this node as the scheduler sees it (name, site, CPU and memory capacity); its `settings`;
    `measured`, whether demand is measured from real guests; the `transport`; the `membership` view; the
    names of the nearest nodes (`nearest`: the spiral view) and of the ring successors (`successors`); the
    `hypervisor`'s domains, whether the host `holds_vms` (or awaits one), and `set_metadata` on this node's
    VMs; the VE `directory` (the VEs' rules and placement); and `relocate`, the VE service's move of one VM."""

    name = "dvms"
    tick_interval = TICK

    def __init__(self, *, node: Node, settings: DvmsSettings, measured: bool, transport: Endpoint,
                 membership: Membership, nearest: Callable[[], list[str]], successors: Callable[[], list[str]],
                 hypervisor: Domains, holds_vms: Callable[[], bool], set_metadata: SetMetadata,
                 directory: Directory, relocate: Relocate, config: IspConfig | None = None) -> None:
        super().__init__()
        self.node, self.me, self.settings, self.measured = node, node.name, settings, measured
        self.transport, self.membership, self.nearest, self.successors = transport, membership, nearest, successors
        self.hypervisor, self.holds_vms, self.set_metadata = hypervisor, holds_vms, set_metadata
        self.directory, self.relocate = directory, relocate
        self.config = config or IspConfig()
        self.cpu_capacity = node.cpu  # `dvms.load` may lower it (a test hook)
        self.pinned: dict[str, int] = {}  # domain here -> CPU demand pinned by `dvms.load` (its metadata)
        self._read: set[str] = set()  # domains here whose pin was read from their metadata
        self.injector: Injector | None = None
        self._injected: dict[str, int] = {}  # domain -> its demand, per the injector
        self._followed: set[str] = set()  # domains the injector follows
        self._samples: dict[str, DomainStats] = {}  # domain -> its last stats (real guests)
        self._demand: dict[str, tuple[int, int]] = {}  # domain -> measured (CPU, memory MB) demand
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self.counts: Counter[str] = Counter()  # every event so far, by kind (the metrics: `discovery.metrics`)
        self.endings: Counter[str] = Counter()  # partitions this node led that ended, by reason
        self.ended: dict[str, str] = {}  # partition id -> reason, of those this node led
        self.problems: dict[str, str] = {}  # partition id -> "overload" or "underload", of those this node led
        self.plans: dict[tuple[PartitionId, int], Plan] = {}
        self.moving: dict[str, MigrationView] = {}  # VM -> its migration under way, in a plan this node applies
        self.isp: IspNode | None = None
        self.monitor: Monitor | None = None
        self.load = NodeLoad(0, 0, Load.NORMAL.value)
        self._next_sample = -math.inf
        self._last_problem = -math.inf
        self._nursery: trio.Nursery | None = None

    def serve(self, endpoint: Endpoint) -> None:
        """Route the methods this service serves; the composition place calls it (`discovery.agent`)."""
        endpoint.route(DVMS_MSG, self._on_msg)
        endpoint.route(DVMS_REPORT, self._on_report)
        endpoint.route(DVMS_LOAD, self._on_load)
        endpoint.route(DVMS_STATUS, self._on_status)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:  # solves, applies and sends run beside the mailbox
            self._nursery = nursery
            try:
                await super().run()
            finally:
                self._nursery = None
                nursery.cancel_scope.cancel()

    async def start(self) -> None:
        now = trio.current_time()
        incarnation = self.membership.me.incarnation
        # a restarted agent may have promised, before it stopped, to stay in a partition: it refuses for a while
        quarantine = now + self.config.quarantine if incarnation > 0 else -math.inf
        self.isp = IspNode(self.me, self._route, self.config, incarnation=incarnation, quarantine_until=quarantine)
        s = self.settings
        if s.injector_rate > 0 and not self.measured and self.injector is None:
            self.injector = Injector([], s.injector_rate, seed=s.seed, mean=s.injector_mean, std=s.injector_std,
                                     start=now)
        self.monitor = Monitor(replace(self.node, cpu=self.cpu_capacity), s.thresholds())

    def _route(self) -> list[str]:
        alive = {m.name for m in self.membership.alive(include_me=False)}
        return [n for n in spiral_then_ring(self.nearest(), self.successors()) if n in alive]

    def _event(self, kind: str, **data: Any) -> None:
        self.events.append({"time": time.time(), "kind": kind, **data})
        self.counts[kind] += 1

    # -- mailbox and tick -------------------------------------------------------------------------------

    async def handle(self, message: Any) -> Any:
        assert self.isp is not None and self.monitor is not None
        now = trio.current_time()
        if isinstance(message, Event):
            self._carry(self.isp.on_peer_failed(message.data["name"], now))
            return None
        kind, arg = message
        if kind == "msg":
            self._carry(self.isp.on_message(arg, now))
        elif kind == "plan":
            pid, version, plan, refused = arg
            if plan is not None:
                self.plans[pid, version] = plan
                self._event("plan", partition=str(pid), migrations=len(plan.migrations), solver=plan.solver,
                            seconds=round(plan.seconds, 3))
            else:
                self._event("no-plan", partition=str(pid), version=version, refused=refused)
            self._carry(self.isp.on_plan_result(pid, plan is not None, now, version))
        elif kind == "applied":
            self._carry(self.isp.on_apply_done(arg, now))
        elif kind == "load":
            vm, cpu, capacity = arg
            if vm is not None:
                self._read.add(vm)
                if cpu is None:
                    self.pinned.pop(vm, None)
                else:
                    self.pinned[vm] = cpu
            if capacity is not None:
                self.cpu_capacity = capacity
                self.monitor.node = replace(self.monitor.node, cpu=capacity)
            self._next_sample = -math.inf
        elif kind == "status":
            return self._status()
        return None

    def tick_due(self, last: float) -> float:
        """Every TICK while in a partition (keep-alives, leases, timeouts); outside one the core has nothing
        to do, so the next tick is the monitor's next sample (or a retried problem, which waits for one)."""
        isp = self.isp
        if isp is None or isp.membership is not None or isp.lead is not None:
            return last + TICK
        return max(last + TICK, self._next_sample)

    async def tick(self) -> None:
        assert self.isp is not None and self.monitor is not None
        now = trio.current_time()
        self._carry(self.isp.on_tick(now))
        if now < self._next_sample:
            return
        self._next_sample = on_grid(now + MONITOR_PERIOD, MONITOR_PERIOD)  # wakes up with the other actors
        domains = await self.hypervisor.list() if self.measured or self.holds_vms() else []  # module doc
        if self.measured:
            await self._measure(domains)
        vms = await self._local_vms(domains)
        cpu = sum(vm.cpu for vm in vms)
        memory = sum(vm.memory_mb for vm in vms)
        now = trio.current_time()
        transition = self.monitor.observe(now, cpu, memory)
        state = self.monitor.state
        self.load = NodeLoad(cpu, memory, state.value, self.cpu_capacity)
        if transition is not None:
            self._event(transition.after.value, cpu=cpu, memory_mb=memory)
        # an empty node has nothing to consolidate; a consolidation that found no room can wait
        trouble = state is Load.OVERLOAD or (state is Load.UNDERLOAD and bool(vms))
        wait = self.settings.retry if state is Load.OVERLOAD else max(self.settings.retry,
                                                                       self.settings.underload_dwell)
        if trouble and self.isp.membership is None and (transition is not None or now >= self._last_problem + wait):
            self._last_problem = now
            self._event("problem", load=state.value, cpu=cpu, capacity=self.cpu_capacity)
            outputs = self.isp.on_problem(now)
            if self.isp.lead is not None:
                self.problems[str(self.isp.lead.pid)] = state.value
                _trim(self.problems)
            self._carry(outputs)

    # -- carrying out the core's outputs -----------------------------------------------------------------

    def _carry(self, outputs: list[Output]) -> None:
        assert self._nursery is not None and self.isp is not None
        for out in outputs:
            if isinstance(out, Send):
                self._nursery.start_soon(self._send_msg, out)
            elif isinstance(out, Solve):
                self._nursery.start_soon(self._solve, out)
            elif isinstance(out, Apply):
                self._event("apply", partition=str(out.pid), members=list(out.members))
                self._nursery.start_soon(self._apply, out)
            elif isinstance(out, Ended):
                self.ended[str(out.pid)] = out.reason
                self.endings[out.reason] += 1
                _trim(self.ended)
                self.plans = {k: v for k, v in self.plans.items() if k[0] != out.pid}
                self._event("ended", partition=str(out.pid), reason=out.reason, members=list(out.members),
                            problem=self.problems.get(str(out.pid)))
        p = self.isp.lead
        if p is not None and not any(e["kind"] == "created" and e.get("partition") == str(p.pid) for e in self.events):
            self._event("created", partition=str(p.pid), problem=self.problems.get(str(p.pid)))

    def _addr(self, name: str) -> str | None:
        member = self.membership.members.get(name)
        return member.addr if member is not None else None

    async def _send_msg(self, out: Send) -> None:
        if out.to == self.me:
            self.tell_nowait(("msg", out.msg))
            return
        addr = self._addr(out.to)
        if addr is None:
            return
        try:
            await self.transport.call(addr, "dvms.msg", codec.encode_tagged(out.msg), timeout=MSG_TIMEOUT)
        except RpcError as err:  # lost: the core times the request out
            log.debug("dvms: %s to %s lost: %s", type(out.msg).__name__, out.to, err)

    async def _solve(self, out: Solve) -> None:
        """Each member reports the capacity a plan may use (its monitor's `plan_node`: an overloaded node must
        come below overload_clear). An underloaded leader is evacuated, and members left empty are not
        filled: consolidation empties nodes, it does not wake them."""
        assert self.monitor is not None
        plan, refused = None, None
        try:
            nodes, vms, fixed, specs, sites = await self._problem(out.members)
            rules = _rules(specs, {vm.name for vm in [*vms, *fixed]})
            evacuate: set[str] = set()
            if self.monitor.state is Load.UNDERLOAD:
                evacuate = {self.me} | ({n.name for n in nodes} - {vm.node for vm in vms})
            plan = await trio.to_thread.run_sync(
                lambda: solve(nodes, vms, rules, SOLVE_TIME_LIMIT, fixed=fixed, sites=sites, evacuate=evacuate))
            if plan is not None and (refused := blocked_step(plan, [*vms, *fixed], specs, sites)) is not None:
                plan = None  # as if none were found: the partition grows, and a larger one has other ways
        except (RequestError, RpcError) as err:
            log.info("dvms: cannot solve %s: %s", out.pid, err)
        except Exception as err:  # a bad report or a solver bug must not take the service down: no plan
            log.warning("dvms: solving %s failed: %r", out.pid, err)
        self.tell_nowait(("plan", (out.pid, out.version, plan, refused)))

    async def _problem(self, members: tuple[str, ...]) -> tuple[list[Node], list[VM], list[VM], dict[str, VESpec],
                                                                 dict[str, str]]:
        """The partition's nodes and VMs (asked to each member), the specs of their VEs, the VMs of those VEs
        outside the partition (from the VE records: fixed, demand unknown so 0) and the sites of all nodes."""
        reports: dict[str, Report] = {}
        for name in members:
            if name == self.me:
                reports[name] = await self._report()
            else:
                addr = self._addr(name)
                if addr is None:
                    raise RequestError(f"member {name} is not a known node")
                reports[name] = await self.transport.ask(addr, DVMS_REPORT, NoArgs(), timeout=REPORT_TIMEOUT)
        nodes, vms, sites = [], [], {}
        for name, report in reports.items():
            nodes.append(Node(name, report.site, report.cpu, report.memory_mb))
            sites[name] = report.site
            vms += [VM(domain_name(v.ve, v.vm), v.ve, name, v.vcpus, v.memory_mb, v.cpu) for v in report.vms]
        present = {vm.name for vm in vms}
        specs: dict[str, VESpec] = {}
        fixed = []
        for ve in sorted({vm.ve for vm in vms}):
            try:
                record = await self.directory.get(ve)
            except Unreadable as err:
                log.warning("dvms: %s", err)
                continue
            if record is None:
                continue
            spec = specs[ve] = record.ve.spec
            needs = {v.name: v for v in spec.vms}
            for vm_name, slot in record.ve.placement.items():
                domain = domain_name(ve, vm_name)
                if domain in present or vm_name not in needs or slot.node in reports:
                    continue  # here, or said by the record to be on a member that does not have it (moving)
                sites.setdefault(slot.node, slot.site)
                fixed.append(VM(domain, ve, slot.node, needs[vm_name].vcpus, needs[vm_name].memory_mb, 0))
        return nodes, vms, fixed, specs, sites

    async def _apply(self, out: Apply) -> None:
        """The plan's migrations, each once its `predecessors` are done (one migration at a time per node, and
        per VE, in plan order), so migrations between disjoint nodes run side by side; none starts at or
        after the deadline. A failed one is reported and the others go on: each `ve.relocate` reserves room
        on its target, so one that lacks the room a failed one would have freed is refused, not overloading."""
        plan = self.plans.get((out.pid, out.version), Plan())
        caller = Caller(f"dvms@{self.me}", "operator", self.me, self.node.site)
        ves = {m.vm: m.vm.partition(":")[0] for m in plan.migrations}
        done = [trio.Event() for _ in plan.migrations]
        async with trio.open_nursery() as nursery:
            for m, before, finished in zip(plan.migrations, predecessors(plan.migrations, ves), done, strict=True):
                nursery.start_soon(self._migrate, out, m, [done[j] for j in before], finished, caller)
        self.tell_nowait(("applied", out.pid))

    async def _migrate(self, out: Apply, m: Migration, before: list[trio.Event], finished: trio.Event,
                       caller: Caller) -> None:
        try:
            for event in before:
                await event.wait()
            if trio.current_time() >= out.deadline:
                self._event("migration-skipped", partition=str(out.pid), vm=m.vm, source=m.source, target=m.target,
                            reason="deadline")
                return
            ve, _, vm = m.vm.partition(":")
            self.moving[m.vm] = MigrationView(m.vm, m.source, m.target, "moving", time.time(), str(out.pid))
            try:
                await self.relocate(caller, ve, vm, m.target)
            except Exception as err:  # refused, or broke: the others may still help; the VE service recovers
                self._event("migration-failed", partition=str(out.pid), vm=m.vm, source=m.source, target=m.target,
                            error=str(err))
                return
            self._event("migrated", partition=str(out.pid), vm=m.vm, source=m.source, target=m.target)
        finally:
            self.moving.pop(m.vm, None)
            finished.set()

    # -- local state -------------------------------------------------------------------------------------

    async def _local_vms(self, listed: list[DomainInfo] | None = None) -> list[VM]:
        """The VE VMs defined here (`listed`: the host's domains, if the caller just listed them), with their
        current demand: CPU pinned (`dvms.load`), else measured (real guests), else injected, else 0; memory
        measured (real guests), else reserved."""
        domains = [d for d in (listed if listed is not None else await self.hypervisor.list()) if ":" in d.name]
        here = {d.name for d in domains}
        for d in domains:
            if d.name not in self._read:  # arrived (or this agent started): its pin came with its definition
                self._read.add(d.name)
                if (pin := await self._pin_of(d.name)) is not None:
                    self.pinned[d.name] = pin
        now = trio.current_time()  # after the awaits: a concurrent call (`dvms.report`) took an earlier one
        out = []
        for d in domains:
            ve = d.name.partition(":")[0]
            if self.injector is not None and d.name not in self._followed:
                self._followed.add(d.name)
                self._injected[d.name] = self.injector.add(VM(d.name, ve, self.me, d.vcpus, d.memory_mb, 0), now)
            cpu, memory = self._demand.get(d.name, (0, d.memory_mb)) if self.measured else (0, d.memory_mb)
            if d.name in self.pinned:
                cpu = self.pinned[d.name]
            elif self.injector is not None:
                cpu = self._injected.get(d.name, 0)
            running = d.state == "running"
            out.append(VM(d.name, ve, self.me, d.vcpus, memory, min(cpu, 100 * d.vcpus) if running else 0))
        if self.injector is not None:
            for change in self.injector.next_events(now):
                self._injected[change.vm] = change.cpu
            for gone in self._followed - here:
                self.injector.remove(gone)
                self._followed.discard(gone)
                self._injected.pop(gone, None)
        for gone in self._read - here:  # moved away: its pin went with it
            self._read.discard(gone)
            self.pinned.pop(gone, None)
        return out

    async def _measure(self, domains: list[DomainInfo]) -> None:
        """Real guests: each running VM's demand from two samples of libvirt's stats (`dvms.monitor`); domains:
        the host's, just listed."""
        if not domains:  # nothing to sample: a domain that comes back starts afresh
            self._samples, self._demand = {}, {}
            return
        try:
            stats = await self.hypervisor.stats()
        except HypervisorError as err:
            log.warning("dvms: no domain stats: %s", err)
            return
        infos = {d.name: d for d in domains}
        for name, sample in stats.items():
            info, before = infos.get(name), self._samples.get(name)
            if info is None or ":" not in name:
                continue
            memory = memory_demand_mb(sample.balloon, info.memory_mb)
            cpu = self._demand.get(name, (0, 0))[0]
            if before is not None and sample.sampled > before.sampled:
                measured = cpu_demand(before.cpu_time_ns, sample.cpu_time_ns, before.sampled, sample.sampled,
                                      info.vcpus)
                cpu = cpu if measured is None else measured  # None: restarted in between, nothing measured
            self._demand[name] = (cpu, memory)
        self._samples = stats
        self._demand = {name: d for name, d in self._demand.items() if name in stats}

    async def _pin_of(self, domain: str) -> int | None:
        try:
            xml = await self.hypervisor.metadata(domain, PIN_NS)
            cpu = None if xml is None else int(ET.fromstring(xml).get("cpu", ""))
        except HypervisorError:  # gone meanwhile
            return None
        except (ET.ParseError, ValueError):
            log.warning("dvms: %s has an unreadable pin; ignored", domain)
            return None
        return cpu if cpu is None or cpu >= 0 else None

    async def _report(self) -> Report:
        assert self.monitor is not None
        vms = await self._local_vms()
        node = self.monitor.plan_node()
        return Report(self.me, self.node.site, node.cpu, node.memory_mb,
                      [ReportedVM(vm.ve, vm.name.partition(":")[2], vm.vcpus, vm.memory_mb, vm.cpu) for vm in vms])

    def partition(self) -> PartitionView | None:
        """The partition this node is in now, if any (synchronous: the core changes only between awaits)."""
        isp = self.isp
        m = isp.membership if isp is not None else None
        if isp is None or m is None:
            return None
        lead = isp.lead
        return PartitionView(str(m.pid), m.leader, "leader" if lead is not None else "member",
                             list(lead.members) if lead is not None else None,
                             lead.state.value if lead is not None else None, self.problems.get(str(m.pid)))

    def migrations(self, count: int) -> list[MigrationView]:
        """At most `count` migrations of the plans this node led: those under way, then the last finished, newest
        first."""
        finished = [MigrationView(e["vm"], e["source"], e["target"], FINISHED[e["kind"]], e["time"], e["partition"])
                    for e in reversed(self.events) if e["kind"] in FINISHED]
        return [*self.moving.values(), *finished][:max(count, 0)]

    def _status(self) -> DvmsStatus:
        return DvmsStatus(self.me, self.load, self.partition(), dict(self.pinned), dict(self.ended),
                          dict(self.problems), list(self.events))

    # -- RPC ---------------------------------------------------------------------------------------------

    async def _on_msg(self, caller: Caller, msg: Wire) -> None:
        if msg.sender != caller.cn:
            raise Forbidden(f"{caller.cn} may not speak for {msg.sender}")
        await self.ask(("msg", msg))

    async def _on_report(self, caller: Caller, request: NoArgs) -> Report:
        return await self._report()

    async def _on_load(self, caller: Caller, request: SetLoad) -> Loaded:
        """Test hook: pin VM `vm` (a domain `ve:vm` on this node) to `cpu` percent of one vCPU (cpu None: unpin),
        and/or set the CPU capacity (`cpu_capacity`, percent) DVMS counts for this node. The pin is written in
        the domain's metadata, so it follows the VM wherever it is relocated."""
        vm, cpu = request.vm, request.cpu
        if vm is not None:  # NotFound unless the VM is here
            await self.set_metadata(vm, PIN_NS, "dvms", None if cpu is None else f'<load cpu="{cpu}"/>')
        await self.ask(("load", (vm, cpu, request.cpu_capacity)))
        return Loaded(self.me, vm, cpu, self.cpu_capacity)

    async def _on_status(self, caller: Caller, request: NoArgs) -> DvmsStatus:
        status: DvmsStatus = await self.ask(("status", None))
        return status


def _rules(specs: dict[str, VESpec], known: set[str]) -> list[Rules]:
    """The VEs' rules for the solver, over the VMs it knows of (a group keeps its known members)."""
    rules = [rules_of(spec) for spec in specs.values()]
    return [Rules(r.ve, tuple(g & known for g in r.affinity), tuple(g & known for g in r.anti_affinity),
                  r.site, r.same_site, r.spread_sites, r.max_per_node) for r in rules]


def blocked_step(plan: Plan, vms: list[VM], specs: dict[str, VESpec], sites: dict[str, str]) -> str | None:
    """Why `plan` cannot be applied in its order, None if it can. `ve.relocate` checks the whole VE after each
    move; the solver orders a plan so that no step breaks a rule (`dvms.solver.order`), affinity aside: an
    affinity group that moves goes through a step where it is split, and would be refused half-way."""
    node_of: dict[str, dict[str, str]] = {}
    for vm in vms:
        node_of.setdefault(vm.ve, {})[vm.name.partition(":")[2]] = vm.node
    for m in plan.migrations:
        ve, _, name = m.vm.partition(":")
        placed = node_of.setdefault(ve, {})
        placed[name] = m.target
        spec = specs.get(ve)
        if spec is None or not {v.name for v in spec.vms} <= set(placed) or not set(placed.values()) <= set(sites):
            continue  # a VE the partition cannot see whole: ve.relocate has the last word
        why = check_placement(spec, placed, sites)
        if why is not None:
            return f"moving {m.vm} to {m.target} at that point breaks {why}"
    return None


def _trim(entries: dict[str, str]) -> None:
    """Keeps the last MAX_EVENTS partitions of a per-partition record (dicts keep insertion order)."""
    while len(entries) > MAX_EVENTS:
        del entries[next(iter(entries))]
