"""DVMS inside each agent: the `IspNode` core of `dvms.partition` driven over the agents' RPC (test driver).

`DvmsService` is an actor that owns one `IspNode` and carries out its outputs, as `discovery.sim_dvms` does on
a virtual clock, but on the agent's clock and network:

* `Send` becomes a `dvms.msg` call (the message encoded by `encode`, checked by `decode`: a malformed message is
  a RequestError). A message lost to a failed call costs the core a reply timeout; a peer that gossip declares
  dead or gone is reported with `on_peer_failed`.
* The route is `spiral_then_ring`: the agent's spiral view (nearest first), then its ring successors.
* Monitoring: each VM's CPU demand (percent of one vCPU) is what `dvms.load` pinned, else what an `Injector`
  gives (only when ``DISCOVERY_DVMS_RATE`` > 0: by default no VM demands anything, so nothing ever moves),
  else 0; memory is what the VMs reserved. A `Monitor` turns the node's total into overload events, each an
  `on_problem`; a node still overloaded and in no partition asks again every `RETRY` seconds.
* `Solve`: the leader asks every member for its capacity and VMs (`dvms.report`), reads the VEs' records for
  their rules and the VMs outside the partition, and runs `dvms.solver.solve` in a worker thread.
* `Apply`: the plan's migrations, one at a time in order, through this agent's own VE service
  (`ve.relocate` with `vm` and `to`, so constraints are checked and an interrupted move is recovered); none
  starts at or after the Apply deadline.

Authorization: `dvms.msg` and `dvms.report` are for agents (node role); `dvms.load` and `dvms.status` for
agents and operators. A relocation is the agent's own act: it calls its VE service in process with an
internal operator-role caller (`dvms@<node>`), which no remote peer can present, so no wire rule changed.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from dataclasses import fields
from typing import TYPE_CHECKING, Any

import trio

from agents.runtime import Actor, Event
from discovery.spec import SpecError, VESpec
from discovery.ve_base import PREFIX, domain_name
from dvms.model import VM, Node, Plan, Rules
from dvms.monitor import Load, Monitor, Thresholds
from dvms.partition import (
    Abort,
    Absorb,
    Alive,
    Apply,
    Commit,
    Committed,
    Dissolve,
    Ended,
    IspConfig,
    IspNode,
    Join,
    Joined,
    KeepAlive,
    Merge,
    Message,
    Output,
    PartitionId,
    Refuse,
    Release,
    Send,
    Solve,
    Yield,
    spiral_then_ring,
)
from dvms.solver import solve
from dvms.workload import Injector
from overlay.rpc import Caller, Forbidden, RequestError, RpcError

if TYPE_CHECKING:
    from agents.node import NodeAgent
    from discovery.ve_service import VEService

log = logging.getLogger(__name__)
TICK = 0.1
MONITOR_PERIOD = 1.0  # seconds between two samples of the node's demand
RETRY = 5.0  # an overloaded node in no partition starts one again after this long
MSG_TIMEOUT = 1.0
REPORT_TIMEOUT = 5.0
SOLVE_TIME_LIMIT = 1.0
MAX_EVENTS = 100
RATE_ENV = "DISCOVERY_DVMS_RATE"  # load changes per VM per second of the injector; unset or 0: no injector

MESSAGES: dict[str, type[Message]] = {cls.__name__: cls for cls in (
    Join, Joined, Refuse, KeepAlive, Alive, Commit, Committed, Abort, Release, Dissolve, Merge, Absorb, Yield)}
_PID_FIELDS = ("pid", "replaces", "other", "target", "to")


# -- wire format ------------------------------------------------------------------------------------------


def encode(msg: Message) -> dict[str, Any]:
    """A core message as a plain dict: its type name and fields, partition ids as [origin, incarnation, seq]."""
    out: dict[str, Any] = {"type": type(msg).__name__}
    for f in fields(msg):
        value = getattr(msg, f.name)
        if isinstance(value, PartitionId):
            value = [value.origin, value.incarnation, value.seq]
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def _pid(value: Any, name: str) -> PartitionId:
    if not (isinstance(value, list) and len(value) == 3 and isinstance(value[0], str)
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value[1:])):
        raise RequestError(f"dvms message: {name} must be [origin, incarnation, seq]")
    return PartitionId(value[0], value[1], value[2])


def decode(data: Any) -> Message:
    """The message `encode` made; RequestError naming the first field that is missing or of the wrong type."""
    if not isinstance(data, dict):
        raise RequestError("dvms message: not an object")
    cls = MESSAGES.get(data.get("type"))  # type: ignore[arg-type]
    if cls is None:
        raise RequestError(f"dvms message: unknown type {data.get('type')!r}")
    known = {f.name for f in fields(cls)}
    extra = set(data) - known - {"type"}
    if extra:
        raise RequestError(f"dvms message: unknown fields {', '.join(sorted(extra))}")
    args: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in data:
            if f.name in ("replaces", "other", "other_leader"):
                continue  # optional (they default to None)
            raise RequestError(f"dvms message: {f.name} is missing")
        value = data[f.name]
        if f.name in _PID_FIELDS:
            value = None if value is None and f.name in ("replaces", "other") else _pid(value, f.name)
        elif f.name in ("sender", "other_leader"):
            if not (isinstance(value, str) and value) and not (value is None and f.name == "other_leader"):
                raise RequestError(f"dvms message: {f.name} must be a node name")
        elif f.name == "version":
            if not isinstance(value, int) or isinstance(value, bool):
                raise RequestError("dvms message: version must be an integer")
        elif f.name in ("sent_at", "hold"):
            if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
                raise RequestError(f"dvms message: {f.name} must be a finite number")
            value = float(value)
        elif f.name == "members":
            if not (isinstance(value, list) and all(isinstance(m, str) for m in value)):
                raise RequestError("dvms message: members must be a list of node names")
            value = tuple(value)
        args[f.name] = value
    return cls(**args)


# -- VE rules ----------------------------------------------------------------------------------------------


def rules_of(spec: VESpec) -> Rules:
    """A VE's placement rules for the solver, by domain name (`ve:vm`)."""
    c = spec.constraints

    def groups(gs: Any) -> tuple[frozenset[str], ...]:
        return tuple(frozenset(domain_name(spec.name, vm) for vm in g) for g in gs if len(g) > 1)

    return Rules(spec.name, affinity=groups(c.together()), anti_affinity=groups(c.anti_affinity), site=spec.site,
                 same_site=c.same_site, spread_sites=c.spread_sites, max_per_node=c.max_per_node)


# -- the service ----------------------------------------------------------------------------------------


class DvmsService(Actor):
    """One agent's DVMS: the ISP core, the monitor, and the shell that solves and applies (module doc)."""

    name = "dvms"
    tick_interval = TICK

    def __init__(self, agent: NodeAgent, ve: VEService, config: IspConfig | None = None) -> None:
        super().__init__()
        self.agent, self.ve = agent, ve
        self.me = agent.config.name
        self.config = config or IspConfig()
        self.cpu_capacity = 100 * agent.config.capacity.vcpus  # `dvms.load` may lower it (a test hook)
        self.pinned: dict[str, int] = {}  # domain -> CPU demand set by `dvms.load`
        rate = _rate()
        self.injector = Injector([], rate, seed=_seed(self.me)) if rate > 0 else None
        self._injected: dict[str, int] = {}  # domain -> its demand, per the injector
        self._followed: set[str] = set()  # domains the injector follows
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self.ended: dict[str, str] = {}  # partition id -> reason, of those this node led
        self.plans: dict[tuple[PartitionId, int], Plan] = {}
        self.isp: IspNode | None = None
        self.monitor: Monitor | None = None
        self.load = {"cpu": 0, "memory_mb": 0, "state": Load.NORMAL.value}
        self._next_sample = -math.inf
        self._last_problem = -math.inf
        self._nursery: trio.Nursery | None = None
        for method in ("msg", "report", "load", "status"):
            agent.transport.route(f"dvms.{method}", getattr(self, f"_on_{method}"))
        agent.notifier.subscribe(self.tell_nowait, {"member_dead", "member_left"})

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
        incarnation = self.agent.membership.me.incarnation
        # a restarted agent may have promised, before it stopped, to stay in a partition: it refuses for a while
        quarantine = now + self.config.quarantine if incarnation > 0 else -math.inf
        self.isp = IspNode(self.me, self._route, self.config, incarnation=incarnation, quarantine_until=quarantine)
        cap = self.agent.config.capacity
        self.monitor = Monitor(Node(self.me, self.agent.config.site, self.cpu_capacity, cap.memory_mb),
                               Thresholds(underload=0.0, underload_clear=0.0))

    def _route(self) -> list[str]:
        view = self.agent.spiral.view
        spiral = [e.name for e in view.entries()]
        ring = [p.name for p in self.agent.ring.state.successor_list()]
        alive = {m.name for m in self.agent.membership.alive(include_me=False)}
        return [n for n in spiral_then_ring(spiral, ring) if n in alive]

    def _event(self, kind: str, **data: Any) -> None:
        self.events.append({"time": time.time(), "kind": kind, **data})

    # -- mailbox and tick -------------------------------------------------------------------------------

    async def handle(self, message: Any) -> Any:
        assert self.isp is not None
        now = trio.current_time()
        if isinstance(message, Event):
            self._carry(self.isp.on_peer_failed(message.data["name"], now))
            return None
        kind, arg = message
        if kind == "msg":
            self._carry(self.isp.on_message(arg, now))
        elif kind == "plan":
            pid, version, plan = arg
            if plan is not None:
                self.plans[pid, version] = plan
                self._event("plan", partition=str(pid), migrations=len(plan.migrations), solver=plan.solver,
                            seconds=round(plan.seconds, 3))
            else:
                self._event("no-plan", partition=str(pid), version=version)
            self._carry(self.isp.on_plan_result(pid, plan is not None, now, version))
        elif kind == "applied":
            self._carry(self.isp.on_apply_done(arg, now))
        elif kind == "load":
            vm, cpu, capacity = arg
            if vm is not None:
                self.pinned[vm] = cpu
            if capacity is not None:
                self.cpu_capacity = capacity
                cap = self.agent.config.capacity
                assert self.monitor is not None
                state = self.monitor.state
                self.monitor = Monitor(Node(self.me, self.agent.config.site, capacity, cap.memory_mb),
                                       self.monitor.thresholds)
                self.monitor.state = state
            self._next_sample = -math.inf
        elif kind == "status":
            return self._status()
        return None

    async def tick(self) -> None:
        assert self.isp is not None and self.monitor is not None
        now = trio.current_time()
        self._carry(self.isp.on_tick(now))
        if now < self._next_sample:
            return
        self._next_sample = now + MONITOR_PERIOD
        vms = await self._local_vms()
        cpu = sum(vm.cpu for vm in vms)
        memory = sum(vm.memory_mb for vm in vms)
        transition = self.monitor.observe(now, cpu, memory)
        self.load = {"cpu": cpu, "memory_mb": memory, "state": self.monitor.state.value,
                     "cpu_capacity": self.cpu_capacity}
        if transition is not None:
            self._event(transition.after.value, cpu=cpu, memory_mb=memory)
        overloaded = self.monitor.state is Load.OVERLOAD
        if overloaded and self.isp.membership is None and (transition is not None or now >= self._last_problem + RETRY):
            self._last_problem = now
            self._event("problem", cpu=cpu, capacity=self.cpu_capacity)
            self._carry(self.isp.on_problem(now))

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
                self.plans = {k: v for k, v in self.plans.items() if k[0] != out.pid}
                self._event("ended", partition=str(out.pid), reason=out.reason, members=list(out.members))
        p = self.isp.lead
        if p is not None and not any(e["kind"] == "created" and e.get("partition") == str(p.pid) for e in self.events):
            self._event("created", partition=str(p.pid))

    def _addr(self, name: str) -> str | None:
        member = self.agent.membership.members.get(name)
        return member.addr if member is not None else None

    async def _send_msg(self, out: Send) -> None:
        if out.to == self.me:
            self.tell_nowait(("msg", out.msg))
            return
        addr = self._addr(out.to)
        if addr is None:
            return
        try:
            await self.agent.transport.call(addr, "dvms.msg", encode(out.msg), timeout=MSG_TIMEOUT)
        except RpcError as err:  # lost: the core times the request out
            log.debug("dvms: %s to %s lost: %s", type(out.msg).__name__, out.to, err)

    async def _solve(self, out: Solve) -> None:
        plan = None
        try:
            nodes, vms, fixed, rules, sites = await self._problem(out.members)
            plan = await trio.to_thread.run_sync(
                lambda: solve(nodes, vms, rules, SOLVE_TIME_LIMIT, fixed=fixed, sites=sites))
        except (RequestError, RpcError) as err:
            log.info("dvms: cannot solve %s: %s", out.pid, err)
        except Exception as err:  # a bad report or a solver bug must not take the service down: no plan
            log.warning("dvms: solving %s failed: %r", out.pid, err)
        self.tell_nowait(("plan", (out.pid, out.version, plan)))

    async def _problem(self, members: tuple[str, ...]) -> tuple[list[Node], list[VM], list[VM], list[Rules],
                                                                 dict[str, str]]:
        """The partition's nodes and VMs (asked to each member), the rules of their VEs and the VMs of those
        VEs outside the partition (from the VE records: fixed, demand unknown so 0)."""
        reports: dict[str, dict[str, Any]] = {}
        for name in members:
            if name == self.me:
                reports[name] = await self._report()
            else:
                addr = self._addr(name)
                if addr is None:
                    raise RequestError(f"member {name} is not a known node")
                reports[name] = await self.agent.transport.call(addr, "dvms.report", {}, timeout=REPORT_TIMEOUT)
        nodes, vms, sites = [], [], {}
        for name, report in reports.items():
            nodes.append(Node(name, report["site"], int(report["cpu"]), int(report["memory_mb"])))
            sites[name] = report["site"]
            vms += [VM(domain_name(v["ve"], v["vm"]), v["ve"], name, int(v["vcpus"]), int(v["memory_mb"]),
                       int(v["cpu"])) for v in report["vms"]]
        present = {vm.name for vm in vms}
        rules, fixed = [], []
        for ve in sorted({vm.ve for vm in vms}):
            record = await self.agent.records.get(PREFIX + ve)
            if record is None:
                continue
            try:
                spec = VESpec.from_dict(record.value["spec"])
            except (SpecError, KeyError) as err:
                log.warning("dvms: VE %s has an unreadable spec: %s", ve, err)
                continue
            rules.append(rules_of(spec))
            needs = {v.name: v for v in spec.vms}
            for vm_name, slot in record.value.get("placement", {}).items():
                domain = domain_name(ve, vm_name)
                if domain in present or vm_name not in needs or slot.get("node") in sites:
                    continue
                sites.setdefault(slot["node"], slot.get("site", ""))
                fixed.append(VM(domain, ve, slot["node"], needs[vm_name].vcpus, needs[vm_name].memory_mb, 0))
        known = {vm.name for vm in [*vms, *fixed]}
        rules = [Rules(r.ve, tuple(g & known for g in r.affinity), tuple(g & known for g in r.anti_affinity),
                       r.site, r.same_site, r.spread_sites, r.max_per_node) for r in rules]
        return nodes, vms, fixed, rules, sites

    async def _apply(self, out: Apply) -> None:
        plan = self.plans.get((out.pid, out.version), Plan())
        caller = Caller(f"dvms@{self.me}", "operator", self.me, self.agent.config.site)
        done = 0
        for m in plan.migrations:
            if trio.current_time() >= out.deadline:
                left = len(plan.migrations) - done
                self._event("apply-stopped", partition=str(out.pid), reason="deadline", left=left)
                break
            ve, _, vm = m.vm.partition(":")
            try:
                await self.ve._on_relocate(caller, {"name": ve, "vm": vm, "to": m.target})
            except Exception as err:  # refused, or broke: the others may still help; the VE service recovers
                self._event("migration-failed", partition=str(out.pid), vm=m.vm, to=m.target, error=str(err))
                continue
            done += 1
            self._event("migrated", partition=str(out.pid), vm=m.vm, source=m.source, target=m.target)
        self.tell_nowait(("applied", out.pid))

    # -- local state -------------------------------------------------------------------------------------

    async def _local_vms(self) -> list[VM]:
        """The VE VMs defined here, with their current CPU demand (module doc)."""
        now = trio.current_time()
        out = []
        domains = await self.agent.hypervisor.list()
        here = set()
        for d in domains:
            ve, sep, vm = d.name.partition(":")
            if not sep:
                continue
            here.add(d.name)
            cpu = 0
            if self.injector is not None and d.name not in self._followed:
                self._followed.add(d.name)
                self._injected[d.name] = self.injector.add(VM(d.name, ve, self.me, d.vcpus, d.memory_mb, 0), now)
            if d.name in self.pinned:
                cpu = self.pinned[d.name]
            elif self.injector is not None:
                cpu = self._injected.get(d.name, 0)
            out.append(VM(d.name, ve, self.me, d.vcpus, d.memory_mb, min(cpu, 100 * d.vcpus) if d.state == "running"
                          else 0))
        if self.injector is not None:
            for change in self.injector.next_events(now):
                self._injected[change.vm] = change.cpu
            for gone in self._followed - here:
                self.injector.remove(gone)
                self._followed.discard(gone)
                self._injected.pop(gone, None)
        for gone in set(self.pinned) - here:  # moved away: the pin stays with the node it was set on
            del self.pinned[gone]
        return out

    async def _report(self) -> dict[str, Any]:
        vms = await self._local_vms()
        return {"node": self.me, "site": self.agent.config.site, "cpu": self.cpu_capacity,
                "memory_mb": self.agent.config.capacity.memory_mb,
                "vms": [{"ve": vm.ve, "vm": vm.name.partition(":")[2], "vcpus": vm.vcpus, "memory_mb": vm.memory_mb,
                         "cpu": vm.cpu} for vm in vms]}

    def _status(self) -> dict[str, Any]:
        assert self.isp is not None
        partition = None
        m = self.isp.membership
        if m is not None:
            lead = self.isp.lead
            partition = {"id": str(m.pid), "leader": m.leader, "role": "leader" if lead is not None else "member",
                         "members": list(lead.members) if lead is not None else None,
                         "state": lead.state.value if lead is not None else None}
        return {"node": self.me, "load": self.load, "partition": partition, "pinned": dict(self.pinned),
                "ended": dict(self.ended), "events": list(self.events)}

    # -- RPC ---------------------------------------------------------------------------------------------

    async def _on_msg(self, caller: Caller, args: dict[str, Any]) -> None:
        if caller.role != "node":
            raise Forbidden("only agents exchange DVMS messages")
        msg = decode(args)
        if msg.sender != caller.cn:
            raise Forbidden(f"{caller.cn} may not speak for {msg.sender}")
        await self.ask(("msg", msg))

    async def _on_report(self, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        if caller.role != "node":
            raise Forbidden("only agents ask for DVMS reports")
        return await self._report()

    async def _on_load(self, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        """Test hook: pin VM `vm` (a domain `ve:vm` on this node) to `cpu` percent of one vCPU, and/or set the
        CPU capacity (`cpu_capacity`, percent) DVMS counts for this node."""
        if caller.role not in ("node", "operator"):
            raise Forbidden("only operators and agents may set DVMS load")
        vm, cpu, capacity = args.get("vm"), args.get("cpu"), args.get("cpu_capacity")
        if vm is None and capacity is None:
            raise RequestError("dvms.load needs vm and cpu, or cpu_capacity")
        if vm is not None:
            if not (isinstance(vm, str) and ":" in vm):
                raise RequestError("vm must be a domain name ve:vm")
            if not isinstance(cpu, int) or isinstance(cpu, bool) or cpu < 0:
                raise RequestError("cpu must be an integer >= 0 (percent of one vCPU)")
        if capacity is not None and (not isinstance(capacity, int) or isinstance(capacity, bool) or capacity <= 0):
            raise RequestError("cpu_capacity must be an integer > 0")
        await self.ask(("load", (vm, cpu, capacity)))
        return {"node": self.me, "vm": vm, "cpu": cpu, "cpu_capacity": self.cpu_capacity}

    async def _on_status(self, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        if caller.role not in ("node", "operator"):
            raise Forbidden("only operators and agents may read DVMS status")
        return await self.ask(("status", None))


def _rate() -> float:
    try:
        rate = float(os.environ.get(RATE_ENV, "0") or 0)
    except ValueError:
        log.warning("%s is not a number: no load injector", RATE_ENV)
        return 0.0
    return rate if rate > 0 and math.isfinite(rate) else 0.0


def _seed(name: str) -> int:
    return sum(ord(c) * 31**i for i, c in enumerate(name)) % 2**31
