"""DVMS campaign: overloads repaired by DVMS partitions or by a periodic centralized solver, on a virtual clock.

The cluster: `nodes` nodes (`node_vcpus` = 8 vCPUs = 800 CPU units, 32 GiB each) in `sites` sites; a site is a
cluster of points on a plane (site centres on a circle of radius 100, nodes scattered around them, std 5), so a
node's spiral (every other node by distance) lists its own site first. The ring orders the nodes by a hash of
their name, as Chord does, so a node's ring successors are in any site. VMs (1-2 vCPUs, 1-4 GiB) are placed
round-robin, first-fit when a node's memory is full; VEs are `ve_size` consecutive VMs (so on different nodes)
with anti-affinity. The production `Injector` changes the VMs' CPU demand (N(70, 30) % of a vCPU by default,
VMPlaceS's law) and a production `Monitor` per node detects overloads and, with `underload` > 0, underloads.

Schedulers:

* ``dvms``: a node whose monitor enters overload (or underload) calls `IspNode.on_problem` in an `IspNet` (the
  production ISP cores, in-memory network); a partition walks `route` = ``spiral`` (the node's spiral, then the
  ring) or ``ring`` (ring successors only, the original DVMS). Each `Solve` runs the real `dvms.solver.solve` on
  the members' VMs (the other VMs of their VEs fixed; an underloaded leader evacuated) and answers after the
  solver's wall-clock time (or `virtual_solve_time`, for runs that must be reproducible); each `Apply` starts
  the plan's migrations. A node still overloaded and in no partition asks again every `retry` seconds (an
  underloaded one, if it still holds VMs, after the monitor's underload dwell time).
* ``centralized``: every `period` seconds (or when the previous plan is applied, if later), if any node is
  overloaded, one `solve` on the whole cluster (the Entropy-style baseline VMPlaceS compares against).

The solver's target is each node's `Monitor.plan_node()`: an overloaded node must come below the monitor's
clear threshold. Migration model: a migration copies the VM's memory at `bandwidth_mb_s` inside a site, 4 times
slower between sites (`INTER_SITE_WEIGHT`); a node takes part in one migration at a time, and a node's
migrations, like a VE's, run in plan order (`_timeline`, as agents do), so a plan never overloads a node nor
breaks a VE's rule on the way (`dvms.solver.order`); each VM lands when its migration ends. A DVMS apply drops
the migrations that would end after its deadline. A VM lands only if its VE, its other VMs where they are
now (whichever partition moved them), keeps its rules (`dvms.solver.keeps_rules`, as `ve.relocate` checks
the VE against its record); else it stays, and its plan's migrations not started by then are dropped.

Every plan is checked (`dvms.solver.check`) on the placement it was computed from: capacity of its nodes and
VE rules, at the end and after each step; the rules are checked again on the live placement as VMs land.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

from dvms.isp_net import IspNet
from dvms.model import VM, Migration, Node, Plan, Rules
from dvms.monitor import Load, Monitor, Thresholds
from dvms.partition import Apply, IspConfig, IspNode, Output, Solve, spiral_then_ring
from dvms.solver import INTER_SITE_WEIGHT, apply, check, keeps_rules, predecessors, solve
from dvms.workload import MEAN, STD, Injector

SCHEDULERS = ("dvms", "centralized")
ROUTES = ("spiral", "ring")
NODE_VCPUS, NODE_MEMORY_MB = 8, 32 * 1024
_AFTER = 1e-6  # an apply is reported done just after its last VM landed


@dataclass
class _Event:
    """One solver call and what came of it."""

    time: float
    nodes: int  # partition size (dvms) or cluster size (centralized)
    solve_seconds: float  # wall clock
    found: bool
    kind: str = "overload"  # or "underload" (dvms: the leader's state)
    migrations: int = 0
    apply_seconds: float = 0.0  # simulated
    applied: bool = False


class _Cluster:
    """Placement, per-node demand and the metrics both schedulers share."""

    def __init__(self, nodes: int, vms_per_node: int, sites: int, seed: int, ve_size: int, node_vcpus: int) -> None:
        rng = random.Random(f"sim_dvms:{seed}")
        self.nodes = [Node(f"n{i:04d}", f"s{i % sites}", 100 * node_vcpus, NODE_MEMORY_MB) for i in range(nodes)]
        self.by_name = {n.name: n for n in self.nodes}
        self.site_of = {n.name: n.site for n in self.nodes}
        centres = [(100 * math.cos(2 * math.pi * k / sites), 100 * math.sin(2 * math.pi * k / sites))
                   for k in range(sites)]
        self.names = [n.name for n in self.nodes]
        self.xy = np.array([[centres[i % sites][0] + rng.gauss(0, 5), centres[i % sites][1] + rng.gauss(0, 5)]
                            for i in range(nodes)])
        self.ring = sorted(self.names, key=lambda n: hashlib.sha1(n.encode()).digest())
        self.ring_index = {n: i for i, n in enumerate(self.ring)}
        self.memory = dict.fromkeys(self.by_name, 0)
        self.vms: dict[str, VM] = {}
        self.on: dict[str, set[str]] = {n: set() for n in self.by_name}  # node -> VMs there
        taken: set[str] = set()  # nodes of the current VE's VMs (anti-affine)
        for k in range(nodes * vms_per_node):
            vcpus, memory_mb = rng.randint(1, 2), 1024 * rng.randint(1, 4)
            if k % ve_size == 0:
                taken = set()
            start = k % nodes
            for j in range(nodes):  # round-robin, first fit when full
                node = self.names[(start + j) % nodes]
                if self.memory[node] + memory_mb <= NODE_MEMORY_MB and node not in taken:
                    break
            else:
                continue
            taken.add(node)
            self.memory[node] += memory_mb
            name = f"vm{k:06d}"
            self.vms[name] = VM(name, f"ve{k // ve_size:05d}", node, vcpus, memory_mb, 0)
            self.on[node].add(name)
        self.ve_vms: dict[str, list[str]] = {}
        for vm in self.vms.values():
            self.ve_vms.setdefault(vm.ve, []).append(vm.name)
        self.rules = {ve: Rules(ve, anti_affinity=(frozenset(names),) if len(names) > 1 else ())
                      for ve, names in self.ve_vms.items()}
        self.cpu = dict.fromkeys(self.by_name, 0)
        self.overloaded: set[str] = set()
        self.rng = rng
        self.overload_node_seconds = 0.0
        self.clock = 0.0
        self.migrations = 0
        self.inter_site = 0
        self.refused = 0  # landings refused: they would have broken a rule of their VE
        self.dropped = 0  # migrations not started: an earlier one of their plan was refused
        self.failures: list[str] = []
        self.route = lru_cache(maxsize=4096)(self._route)  # a leader reads its route at every hop

    def _route(self, origin: str, kind: str) -> tuple[str, ...]:
        """A partition's route from origin: its spiral (every node by distance) then the ring, or the ring only."""
        i = self.ring_index[origin]
        successors = self.ring[i + 1:] + self.ring[:i]
        if kind == "ring":
            return tuple(successors)
        k = self.names.index(origin)
        distance = ((self.xy - self.xy[k]) ** 2).sum(axis=1)
        spiral = [self.names[j] for j in np.lexsort((np.arange(len(self.names)), distance)) if j != k]
        return tuple(spiral_then_ring(spiral, successors))

    def advance(self, now: float) -> None:
        """Counts the overload between the last change and now."""
        if now > self.clock:
            self.overload_node_seconds += (now - self.clock) * len(self.overloaded)
            self.clock = now

    def _recount(self, node: str) -> None:
        n = self.by_name[node]
        if self.cpu[node] > n.cpu or self.memory[node] > n.memory_mb:
            self.overloaded.add(node)
        else:
            self.overloaded.discard(node)

    def set_demand(self, now: float, vm_name: str, cpu: int) -> str:
        self.advance(now)
        vm = self.vms[vm_name]
        self.cpu[vm.node] += cpu - vm.cpu
        self.vms[vm_name] = replace(vm, cpu=cpu)
        self._recount(vm.node)
        return vm.node

    def land(self, now: float, m: Migration) -> bool:
        """The migration ends: its VM now runs on its target, unless that would break a rule of its VE as the
        VE is now (a plan solved on a view that other partitions' moves made stale): then it stays where it
        is, as `ve.relocate` refuses such a move. Whether the VM moved."""
        self.advance(now)
        vm = self.vms[m.vm]
        if vm.node != m.source:
            self.failures.append(f"{now:.2f}: {m.vm} lands from {m.source} but runs on {vm.node}")
            return False
        if not keeps_rules(self.rules[vm.ve], [self.vms[name] for name in self.ve_vms[vm.ve]], vm.name, m.target,
                           self.site_of):
            self.refused += 1
            return False
        self.cpu[m.source] -= vm.cpu
        self.memory[m.source] -= vm.memory_mb
        self.cpu[m.target] += vm.cpu
        self.memory[m.target] += vm.memory_mb
        self.vms[m.vm] = replace(vm, node=m.target)
        self.on[m.source].discard(m.vm)
        self.on[m.target].add(m.vm)
        self.migrations += 1
        self.inter_site += self.site_of[m.source] != self.site_of[m.target]
        self._recount(m.source)
        self._recount(m.target)
        peers = [self.vms[name] for name in self.ve_vms[vm.ve]]
        self.failures += [f"{now:.2f}: live: {e}" for e in check([], peers, [self.rules[vm.ve]], sites=self.site_of)]
        return True

    def solve(self, members: Sequence[Node], time_limit: float, engine: str, seed: int,
              evacuate: Sequence[str] = ()) -> Plan | None:
        """The real solver on the members' VMs, the other VMs of their VEs fixed; the plan is checked."""
        names = {n.name for n in members}
        movable = [self.vms[vm] for n in sorted(names) for vm in sorted(self.on[n])]
        ves = sorted({vm.ve for vm in movable})
        fixed = [self.vms[name] for ve in ves for name in self.ve_vms[ve] if self.vms[name].node not in names]
        rules = [self.rules[ve] for ve in ves]
        plan = solve(members, movable, rules, time_limit, fixed=fixed, sites=self.site_of, evacuate=evacuate,
                     engine=engine, seed=seed)
        if plan is not None and plan.migrations:
            broken = check(members, [*apply(movable, plan.migrations), *fixed], rules, sites=self.site_of)
            broken += self._steps_broken([*movable, *fixed], plan.migrations)
            self.failures += [f"{self.clock:.2f}: plan: {e}" for e in broken]
        return plan

    def _steps_broken(self, vms: Sequence[VM], migrations: Sequence[Migration]) -> list[str]:
        """What each step of a plan breaks of its VE's rules that the VE kept before the plan (vms: the VMs of
        the plan's VEs, where they were when it was solved)."""
        first = {vm.name: vm for vm in vms}
        where = dict(first)
        kept: dict[str, set[str]] = {}  # VE -> what it broke already
        out: list[str] = []
        for i, m in enumerate(migrations):
            ve = where[m.vm].ve
            names = [name for name in self.ve_vms[ve] if name in where]
            if ve not in kept:
                kept[ve] = set(check([], [first[n] for n in names], [self.rules[ve]], sites=self.site_of))
            where[m.vm] = replace(where[m.vm], node=m.target)
            out += [f"step {i + 1} ({m.vm} to {m.target}): {e}"
                    for e in check([], [where[n] for n in names], [self.rules[ve]], sites=self.site_of)
                    if e not in kept[ve]]
        return out


def _spans(site_of: dict[str, str], migrations: Sequence[Migration], bandwidth_mb_s: float,
           ve_of: dict[str, str] | None = None) -> list[tuple[float, float]]:
    """When each migration starts and ends, from the start of the plan: each starts when its `predecessors`
    have ended (a node takes part in one migration at a time and, with ve_of (VM -> VE), a VE moves one VM at
    a time, in plan order, as agents do); migrations between other nodes run in parallel."""
    spans: list[tuple[float, float]] = []
    for m, before in zip(migrations, predecessors(migrations, ve_of), strict=True):
        inter = site_of[m.source] != site_of[m.target]
        start = max((spans[j][1] for j in before), default=0.0)
        spans.append((start, start + m.memory_mb / bandwidth_mb_s * (INTER_SITE_WEIGHT if inter else 1.0)))
    return spans


def _timeline(site_of: dict[str, str], migrations: Sequence[Migration], bandwidth_mb_s: float,
              ve_of: dict[str, str] | None = None) -> list[float]:
    """When each migration ends, from the start of the plan (`_spans`)."""
    return [end for _, end in _spans(site_of, migrations, bandwidth_mb_s, ve_of)]


class _Landings:
    """Migrations under way, landed in time order by the main loop. A landing that `_Cluster.land` refuses
    cuts its plan: the plan's migrations not started by then are dropped (those under way do not wait for
    it, so do not depend on it: they share no node or VE with it, or come before it)."""

    def __init__(self, cluster: _Cluster, observe: Callable[[str, float], None]) -> None:
        self.cluster, self.observe = cluster, observe
        self.heap: list[tuple[float, int, Migration, int, float]] = []  # (end, seq, migration, plan, start)
        self.seq = 0
        self.plans = 0
        self.cut: dict[int, float] = {}  # plan -> when a landing of it was refused

    def start(self, now: float, migrations: Sequence[Migration], spans: Sequence[tuple[float, float]]) -> None:
        """Starts a plan's migrations, each within (start, end) from now (`_spans`)."""
        self.plans += 1
        for m, (start, end) in zip(migrations, spans, strict=True):
            self.seq += 1
            heapq.heappush(self.heap, (now + end, self.seq, m, self.plans, now + start))

    def next_time(self) -> float:
        return self.heap[0][0] if self.heap else math.inf

    def land(self) -> None:
        when, _, m, plan, start = heapq.heappop(self.heap)
        if start >= self.cut.get(plan, math.inf):
            self.cluster.dropped += 1
            return
        if not self.cluster.land(when, m):
            self.cut.setdefault(plan, when)
            return
        self.observe(m.source, when)
        self.observe(m.target, when)


class _Net(IspNet):
    """An `IspNet` whose `Solve` runs the real solver and whose `Apply` starts the migrations."""

    def __init__(self, sim: _Dvms, names: Sequence[str], route: Callable[[str], Sequence[str]], **kw) -> None:
        self.sim = sim
        super().__init__(names, route, **kw)

    def _carry(self, name: str, node: IspNode, out: Output) -> None:
        if isinstance(out, Solve):
            found, delay = self.sim.solve(out)
            self._push(self.now + delay,
                       lambda: self._input(name, lambda n: n.on_plan_result(out.pid, found, self.now, out.version)))
        else:
            super()._carry(name, node, out)

    def _start_apply(self, name: str, out: Apply) -> None:
        duration = self.sim.start_apply(out, self.now)
        self.apply_time = (duration + _AFTER, duration + _AFTER)  # IspNet reports the apply done then
        super()._start_apply(name, out)


class _Dvms:
    def __init__(self, cluster: _Cluster, monitors: dict[str, Monitor], landings: _Landings, *, route: str,
                 seed: int, time_limit: float, engine: str, bandwidth_mb_s: float,
                 virtual_solve_time: float | None) -> None:
        self.cluster, self.monitors, self.landings = cluster, monitors, landings
        self.seed, self.time_limit, self.engine = seed, time_limit, engine
        self.bandwidth, self.virtual_solve_time = bandwidth_mb_s, virtual_solve_time
        self.plans: dict[tuple[object, int], tuple[Plan, _Event]] = {}
        self.events: list[_Event] = []
        self.last_problem: dict[str, float] = {}  # node -> when it last started a partition
        self.net = _Net(self, cluster.names, lambda origin: cluster.route(origin, route), config=IspConfig(),
                        seed=seed)

    def solve(self, out: Solve) -> tuple[bool, float]:
        self.cluster.advance(self.net.now)
        leader = self.monitors[out.pid.origin]
        evacuate = [leader.node.name] if leader.state is Load.UNDERLOAD else []
        start = time.perf_counter()
        plan = self.cluster.solve([self.monitors[m].plan_node() for m in out.members], self.time_limit,
                                  self.engine, self.seed, evacuate)
        seconds = time.perf_counter() - start
        event = _Event(self.net.now, len(out.members), seconds, plan is not None, leader.state.value)
        self.events.append(event)
        if plan is not None:
            self.plans[out.pid, out.version] = (plan, event)
        delay = seconds if self.virtual_solve_time is None else self.virtual_solve_time
        return plan is not None, delay

    def start_apply(self, out: Apply, now: float) -> float:
        """Starts the plan's migrations that end before the deadline; returns when the last one ends."""
        plan, event = self.plans.pop((out.pid, out.version), (Plan(), None))
        ve_of = {m.vm: self.cluster.vms[m.vm].ve for m in plan.migrations}
        spans = _spans(self.cluster.site_of, plan.migrations, self.bandwidth, ve_of)
        done = [(m, span) for m, span in zip(plan.migrations, spans, strict=True) if now + span[1] < out.deadline]
        self.landings.start(now, [m for m, _ in done], [span for _, span in done])
        duration = max((span[1] for _, span in done), default=0.0)
        if event is not None:
            event.applied, event.migrations, event.apply_seconds = True, len(done), duration
        return duration

    def observe(self, node: str, now: float) -> None:
        c = self.cluster
        transition = self.monitors[node].observe(now, c.cpu[node], c.memory[node])
        if transition is not None and self._trouble(node):
            self._problem(node, now)

    def retry(self, now: float) -> None:
        """Nodes still in trouble and in no partition ask again (called every `retry` seconds); an underload
        waits its dwell time between two tries (a consolidation that found no room can wait), as agents do."""
        for name, monitor in self.monitors.items():
            wait = 0.0 if monitor.state is Load.OVERLOAD else monitor.thresholds.underload_dwell
            if (self._trouble(name) and self.net.nodes[name].membership is None
                    and now >= self.last_problem.get(name, -math.inf) + wait):
                self._problem(name, now)

    def _trouble(self, node: str) -> bool:
        """Overloaded, or underloaded with VMs to move away (an empty node has nothing to consolidate)."""
        state = self.monitors[node].state
        return state is Load.OVERLOAD or (state is Load.UNDERLOAD and bool(self.cluster.on[node]))

    def _problem(self, node: str, now: float) -> None:
        self.last_problem[node] = now
        self.net.problem(node, now)


def run(nodes: int = 64, vms_per_node: int = 10, sites: int = 4, duration: float = 600.0, scheduler: str = "dvms",
        seed: int = 1, *, route: str = "spiral", rate: float = 1 / 30, mean: float = MEAN, std: float = STD,
        underload: float = 0.0, ve_size: int = 3, period: float = 30.0, retry: float = 10.0,
        time_limit: float = 0.2, central_time_limit: float = 1.0, engine: str = "auto",
        bandwidth_mb_s: float = 1024.0, sample: float = 5.0, virtual_solve_time: float | None = None,
        node_vcpus: int = NODE_VCPUS) -> dict:
    """One run; see the module's doc. rate/mean/std go to the `Injector` (changes per VM per second, demand
    in percent of one vCPU); underload: the monitor's underload threshold (0: no consolidation);
    virtual_solve_time: the simulated solving time (None: the measured wall time)."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"sim dvms: unknown scheduler {scheduler!r} (one of {', '.join(SCHEDULERS)})")
    if route not in ROUTES:
        raise ValueError(f"sim dvms: unknown route {route!r} (one of {', '.join(ROUTES)})")
    if not (nodes >= 2 and vms_per_node >= 1 and 1 <= sites <= nodes and duration > 0 and ve_size >= 1):
        raise ValueError("sim dvms: need nodes >= 2, vms_per_node >= 1, 1 <= sites <= nodes, duration > 0")
    if not 0 <= underload < 0.9:
        raise ValueError("sim dvms: need 0 <= underload < 0.9")
    started = time.perf_counter()
    cluster = _Cluster(nodes, vms_per_node, sites, seed, ve_size, node_vcpus)
    for vm in list(cluster.vms.values()):  # loaded from the start, by the injector's law: no warm-up
        cluster.set_demand(0.0, vm.name, round(min(max(cluster.rng.gauss(mean, std), 0), 100 * vm.vcpus)))
    injector = Injector(list(cluster.vms.values()), rate, seed=seed, mean=mean, std=std)
    thresholds = Thresholds(underload=underload, underload_clear=min(0.9, underload + 0.1) if underload else 0.0)
    monitors = {n.name: Monitor(n, thresholds) for n in cluster.nodes}
    dvms: _Dvms | None = None

    def observe(node: str, now: float) -> None:
        if dvms is not None:
            dvms.observe(node, now)
        else:
            monitors[node].observe(now, cluster.cpu[node], cluster.memory[node])

    landings = _Landings(cluster, observe)
    if scheduler == "dvms":
        dvms = _Dvms(cluster, monitors, landings, route=route, seed=seed, time_limit=time_limit, engine=engine,
                     bandwidth_mb_s=bandwidth_mb_s, virtual_solve_time=virtual_solve_time)
    events: list[_Event] = []
    series: list[tuple[float, int]] = []
    queue: list[tuple[float, int, str]] = [(0.0, 0, "sample"), (period if dvms is None else retry, 1, "schedule")]
    seq = 2
    for node in cluster.by_name:
        observe(node, 0.0)
    while True:
        t_load = injector.next_time()
        t = min(t_load if t_load is not None else math.inf, queue[0][0], landings.next_time())
        if t > duration:
            break
        if dvms is not None:
            dvms.net.run(t)
        if landings.next_time() == t:
            landings.land()
        elif queue[0][0] == t:
            _, _, kind = heapq.heappop(queue)
            if kind == "sample":
                cluster.advance(t)
                series.append((t, len(cluster.overloaded)))
                heapq.heappush(queue, (t + sample, seq, kind))
            elif dvms is not None:
                dvms.retry(t)
                heapq.heappush(queue, (t + retry, seq, kind))
            else:
                busy = _centralized(cluster, monitors, landings, events, t, central_time_limit, engine, seed,
                                    bandwidth_mb_s, virtual_solve_time)
                heapq.heappush(queue, (max(t + period, busy), seq, kind))
            seq += 1
        else:
            for change in injector.next_events(t):
                observe(cluster.set_demand(t, change.vm, change.cpu), t)
    if dvms is not None:
        dvms.net.run(duration)
        events = dvms.events
    cluster.advance(duration)
    return _summary(cluster, scheduler, events, series, dvms, time.perf_counter() - started, {
        "nodes": nodes, "vms": len(cluster.vms), "vms_per_node": vms_per_node,
        "node_vcpus": node_vcpus, "sites": sites, "duration": duration, "route": route,
        "seed": seed, "rate": rate, "mean": mean, "std": std, "underload": underload, "ve_size": ve_size,
        "period": period, "retry": retry, "time_limit": central_time_limit if dvms is None else time_limit,
        "engine": engine, "bandwidth_mb_s": bandwidth_mb_s, "virtual_solve_time": virtual_solve_time})


def _centralized(cluster: _Cluster, monitors: dict[str, Monitor], landings: _Landings, events: list[_Event],
                 t: float, time_limit: float, engine: str, seed: int, bandwidth_mb_s: float,
                 virtual_solve_time: float | None) -> float:
    """One period of the centralized scheduler: if a node is overloaded, solve the whole cluster and start
    the plan; returns when it is applied (the next solve waits for it)."""
    if not cluster.overloaded:
        return t
    cluster.advance(t)
    start = time.perf_counter()
    plan = cluster.solve([m.plan_node() for m in monitors.values()], time_limit, engine, seed)
    seconds = time.perf_counter() - start
    event = _Event(t, len(cluster.nodes), seconds, plan is not None)
    events.append(event)
    if plan is None or not plan.migrations:
        return t
    solved = t + (seconds if virtual_solve_time is None else virtual_solve_time)
    ve_of = {m.vm: cluster.vms[m.vm].ve for m in plan.migrations}
    spans = _spans(cluster.site_of, plan.migrations, bandwidth_mb_s, ve_of)
    end = max(e for _, e in spans)
    event.applied, event.migrations, event.apply_seconds = True, len(spans), end
    landings.start(solved, plan.migrations, spans)
    return solved + end


def _stats(values: Sequence[float]) -> dict:
    if not values:
        return {"count": 0}
    ordered = sorted(values)
    return {"count": len(values), "mean": round(statistics.fmean(values), 4),
            "p50": round(ordered[len(ordered) // 2], 4), "p90": round(ordered[int(0.9 * (len(ordered) - 1))], 4),
            "max": round(ordered[-1], 4)}


def _summary(cluster: _Cluster, scheduler: str, events: list[_Event], series: list[tuple[float, int]],
             dvms: _Dvms | None, wall: float, config: dict) -> dict:
    out = {
        "scheduler": scheduler,
        "config": config,
        "solves": len(events),
        "plans_found": sum(e.found for e in events),
        "plans_applied": sum(e.applied for e in events),
        "solve_seconds": _stats([e.solve_seconds for e in events]),
        "apply_seconds": _stats([e.apply_seconds for e in events if e.applied]),
        "overload_node_seconds": round(cluster.overload_node_seconds, 3),
        "overloaded_at_end": len(cluster.overloaded),
        "empty_nodes_at_end": sum(not vms for vms in cluster.on.values()),
        "migrations": cluster.migrations,
        "inter_site_migrations": cluster.inter_site,
        "inter_site_share": round(cluster.inter_site / cluster.migrations, 4) if cluster.migrations else 0.0,
        "migrations_refused": cluster.refused,
        "migrations_dropped": cluster.dropped,
        "check_failures": cluster.failures,
        "overloaded_nodes": [[round(t, 3), k] for t, k in series],
        "wall_seconds": round(wall, 3),
        "events": [{"time": round(e.time, 3), "kind": e.kind, "nodes": e.nodes,
                    "solve_seconds": round(e.solve_seconds, 5), "found": e.found, "applied": e.applied,
                    "migrations": e.migrations, "apply_seconds": round(e.apply_seconds, 3)} for e in events],
    }
    if dvms is not None:
        sizes = [e.nodes for e in events]
        ended: dict[str, int] = {}
        for _, reason in dvms.net.trace.ended.values():
            ended[reason] = ended.get(reason, 0) + 1
        out["partition_sizes"] = {**_stats(sizes), "histogram": {str(k): sizes.count(k) for k in sorted(set(sizes))}}
        out["partitions"] = {"created": len(dvms.net.trace.created), "ended": ended,
                             "messages": dvms.net.messages, "protocol_violations": dvms.net.violations}
    return out


def plot(results: dict[str, dict], path: str) -> None:
    """Overloaded nodes over time, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    for name, res in results.items():
        ax.step([p[0] for p in res["overloaded_nodes"]], [p[1] for p in res["overloaded_nodes"]], where="post",
                label=f"{name}: {res['overload_node_seconds']:.0f} node·s overloaded, {res['migrations']} migrations")
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("overloaded nodes")
    c = next(iter(results.values()))["config"]
    ax.set_title(f"{c['nodes']} nodes, {c['vms']} VMs, {c['sites']} sites")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
