"""DVMS campaign: overloads repaired by DVMS partitions or by a periodic centralized solver, on a virtual clock.

The cluster: `nodes` nodes (`node_vcpus` = 8 vCPUs = 800 CPU units, 32 GiB each) in `sites` sites; a site is a
cluster of points on a plane (site centres on a circle of radius 100, nodes scattered around them, std 5), so a node's
spiral (every other node by distance) lists its own site first. VMs (1-2 vCPUs, 1-4 GiB) are placed
round-robin, first-fit when a node's memory is full; VEs are `ve_size` consecutive VMs (so on different
nodes) with anti-affinity. The production `Injector` changes the VMs' CPU demand and a production `Monitor`
per node detects overloads (underload/consolidation is not simulated).

Schedulers:

* ``dvms``: an overloaded node calls `IspNode.on_problem` in an `IspNet` (the production ISP cores,
  in-memory network); each `Solve` runs the real `dvms.solver.solve` on the members' VMs (the other VMs of
  their VEs fixed) and answers after the solver's wall-clock time (or `virtual_solve_time`, for runs that
  must be reproducible); each `Apply` moves the VMs. A node still overloaded and in no partition asks again
  every `retry` seconds.
* ``centralized``: every `period` seconds, if any node is overloaded, one `solve` on the whole cluster.

Migration model: migrations run one after another (as `dvms.solver.order` sequences them) at `bandwidth_mb_s`
inside a site, 4 times slower between sites (`INTER_SITE_WEIGHT`); the VMs move when their migration ends.
A DVMS apply stops at its deadline (the migrations not finished by then are dropped).

Every plan is checked (`dvms.solver.check`) on the placement it was computed from: capacity of its nodes and
VE rules; the rules are checked again on the live placement after the plan is applied.
"""

from __future__ import annotations

import heapq
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from dvms.isp_net import IspNet
from dvms.model import VM, Migration, Node, Plan, Rules
from dvms.monitor import Load, Monitor, Thresholds
from dvms.partition import Apply, IspConfig, IspNode, Output, Solve, spiral_then_ring
from dvms.solver import INTER_SITE_WEIGHT, apply, check, solve
from dvms.workload import Injector

SCHEDULERS = ("dvms", "centralized")
NODE_VCPUS, NODE_MEMORY_MB = 8, 32 * 1024


@dataclass
class _Event:
    """One solver call and what came of it."""

    time: float
    nodes: int  # partition size (dvms) or cluster size (centralized)
    solve_seconds: float  # wall clock
    found: bool
    migrations: int = 0
    apply_seconds: float = 0.0  # simulated
    applied: bool = False


class _Cluster:
    """Placement, per-node demand and the metrics both schedulers share."""

    def __init__(self, nodes: int, vms_per_node: int, sites: int, seed: int, ve_size: int, node_vcpus: int) -> None:
        rng = random.Random(f"sim_dvms:{seed}")
        self.nodes = [Node(f"n{i:03d}", f"s{i % sites}", 100 * node_vcpus, NODE_MEMORY_MB) for i in range(nodes)]
        self.by_name = {n.name: n for n in self.nodes}
        self.site_of = {n.name: n.site for n in self.nodes}
        centres = {f"s{k}": (100 * math.cos(2 * math.pi * k / sites), 100 * math.sin(2 * math.pi * k / sites))
                   for k in range(sites)}
        self.position = {n.name: (centres[n.site][0] + rng.gauss(0, 5), centres[n.site][1] + rng.gauss(0, 5))
                         for n in self.nodes}
        memory = dict.fromkeys(self.by_name, 0)
        self.vms: dict[str, VM] = {}
        for k in range(nodes * vms_per_node):
            vcpus, memory_mb = rng.randint(1, 2), 1024 * rng.randint(1, 4)
            start = k % nodes
            for j in range(nodes):  # round-robin, first fit when full
                node = self.nodes[(start + j) % nodes].name
                if memory[node] + memory_mb <= NODE_MEMORY_MB:
                    break
            else:
                continue
            memory[node] += memory_mb
            name = f"vm{k:05d}"
            self.vms[name] = VM(name, f"ve{k // ve_size:04d}", node, vcpus, memory_mb, 0)
        names_by_ve: dict[str, list[str]] = {}
        for vm in self.vms.values():
            names_by_ve.setdefault(vm.ve, []).append(vm.name)
        self.rules = {ve: Rules(ve, anti_affinity=(frozenset(names),) if len(names) > 1 else ())
                      for ve, names in names_by_ve.items()}
        self.cpu = dict.fromkeys(self.by_name, 0)
        self.memory = memory
        self.overloaded: set[str] = set()
        self.overload_node_seconds = 0.0
        self.clock = 0.0
        self.migrations = 0
        self.inter_site = 0
        self.failures: list[str] = []

    def spiral(self, origin: str) -> list[str]:
        x, y = self.position[origin]
        return sorted((n for n in self.by_name if n != origin),
                      key=lambda n: ((self.position[n][0] - x) ** 2 + (self.position[n][1] - y) ** 2, n))

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

    def migrate(self, now: float, migrations: Sequence[Migration]) -> set[str]:
        """Moves the VMs (each migration from where its VM is now); returns the nodes touched."""
        self.advance(now)
        touched: set[str] = set()
        for m in migrations:
            vm = self.vms[m.vm]
            self.cpu[m.source] -= vm.cpu
            self.memory[m.source] -= vm.memory_mb
            self.cpu[m.target] += vm.cpu
            self.memory[m.target] += vm.memory_mb
            self.vms[m.vm] = replace(vm, node=m.target)
            touched |= {m.source, m.target}
            self.migrations += 1
            self.inter_site += self.site_of[m.source] != self.site_of[m.target]
        for node in touched:
            self._recount(node)
        ves = {self.vms[m.vm].ve for m in migrations}
        broken = check([], self.vms.values(), [self.rules[ve] for ve in sorted(ves)], sites=self.site_of)
        self.failures += [f"{now:.2f}: live: {e}" for e in broken]
        return touched

    def solve(self, members: Sequence[str], time_limit: float, engine: str, seed: int) -> Plan | None:
        """The real solver on the members' VMs, the other VMs of their VEs fixed; the plan is checked."""
        names = set(members)
        nodes = [self.by_name[n] for n in members]
        movable = [vm for vm in self.vms.values() if vm.node in names]
        ves = {vm.ve for vm in movable}
        fixed = [vm for vm in self.vms.values() if vm.ve in ves and vm.node not in names]
        rules = [self.rules[ve] for ve in sorted(ves)]
        plan = solve(nodes, movable, rules, time_limit, fixed=fixed, sites=self.site_of, engine=engine, seed=seed)
        if plan is not None and plan.migrations:
            broken = check(nodes, [*apply(movable, plan.migrations), *fixed], rules, sites=self.site_of)
            self.failures += [f"{self.clock:.2f}: plan: {e}" for e in broken]
        return plan


def _durations(cluster: _Cluster, migrations: Sequence[Migration], bandwidth_mb_s: float) -> list[float]:
    """When each migration ends, from the start of the plan (one after another)."""
    out, t = [], 0.0
    for m in migrations:
        inter = cluster.site_of[m.source] != cluster.site_of[m.target]
        t += m.memory_mb / bandwidth_mb_s * (INTER_SITE_WEIGHT if inter else 1.0)
        out.append(t)
    return out


class _Net(IspNet):
    """An `IspNet` whose `Solve` runs the real solver and whose `Apply` moves the VMs."""

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
        migrations, duration = self.sim.start_apply(out, self.now)
        self._push(self.now + duration, lambda: self.sim.finish_apply(migrations, self.now))
        self.apply_time = (duration, duration)
        super()._start_apply(name, out)


class _Dvms:
    def __init__(self, cluster: _Cluster, monitors: dict[str, Monitor], *, seed: int, time_limit: float,
                 engine: str, bandwidth_mb_s: float, virtual_solve_time: float | None) -> None:
        self.cluster, self.monitors = cluster, monitors
        self.seed, self.time_limit, self.engine = seed, time_limit, engine
        self.bandwidth, self.virtual_solve_time = bandwidth_mb_s, virtual_solve_time
        self.plans: dict[tuple[object, int], tuple[Plan, _Event]] = {}
        self.events: list[_Event] = []
        names = [n.name for n in cluster.nodes]
        routes = {n: spiral_then_ring(cluster.spiral(n), names) for n in names}
        self.net = _Net(self, names, routes.__getitem__, config=IspConfig(), seed=seed)

    def solve(self, out: Solve) -> tuple[bool, float]:
        self.cluster.advance(self.net.now)
        start = time.perf_counter()
        plan = self.cluster.solve(out.members, self.time_limit, self.engine, self.seed)
        seconds = time.perf_counter() - start
        event = _Event(self.net.now, len(out.members), seconds, plan is not None)
        self.events.append(event)
        if plan is not None:
            self.plans[out.pid, out.version] = (plan, event)
        delay = seconds if self.virtual_solve_time is None else self.virtual_solve_time
        return plan is not None, delay

    def start_apply(self, out: Apply, now: float) -> tuple[list[Migration], float]:
        plan, event = self.plans.pop((out.pid, out.version), (Plan(), None))
        ends = _durations(self.cluster, plan.migrations, self.bandwidth)
        done = [m for m, end in zip(plan.migrations, ends, strict=True) if now + end < out.deadline]
        duration = ends[len(done) - 1] if done else 0.0
        if event is not None:
            event.applied, event.migrations, event.apply_seconds = True, len(done), duration
        return done, duration

    def finish_apply(self, migrations: list[Migration], now: float) -> None:
        for node in self.cluster.migrate(now, migrations):
            self.observe(node, now)

    def observe(self, node: str, now: float) -> None:
        c = self.cluster
        transition = self.monitors[node].observe(now, c.cpu[node], c.memory[node])
        if transition is not None and transition.after is Load.OVERLOAD:
            self.net.problem(node, now)

    def retry(self, now: float) -> None:
        for name, monitor in self.monitors.items():
            if monitor.state is Load.OVERLOAD and self.net.nodes[name].membership is None:
                self.net.problem(name, now)


def run(nodes: int = 64, vms_per_node: int = 8, sites: int = 4, duration: float = 600.0, scheduler: str = "dvms",
        seed: int = 1, *, rate: float = 1 / 30, mean: float = 85.0, std: float = 40.0, ve_size: int = 3,
        period: float = 30.0, retry: float = 10.0, time_limit: float = 0.2, central_time_limit: float = 1.0,
        engine: str = "auto", bandwidth_mb_s: float = 1024.0, sample: float = 5.0,
        virtual_solve_time: float | None = None, node_vcpus: int = NODE_VCPUS) -> dict:
    """One run; see the module's doc. rate/mean/std go to the `Injector` (changes per VM per second, demand
    in percent of one vCPU); virtual_solve_time: the simulated solving time (None: the measured wall time)."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"sim dvms: unknown scheduler {scheduler!r} (one of {', '.join(SCHEDULERS)})")
    if not (nodes >= 2 and vms_per_node >= 1 and 1 <= sites <= nodes and duration > 0 and ve_size >= 1):
        raise ValueError("sim dvms: need nodes >= 2, vms_per_node >= 1, 1 <= sites <= nodes, duration > 0")
    started = time.perf_counter()
    cluster = _Cluster(nodes, vms_per_node, sites, seed, ve_size, node_vcpus)
    injector = Injector(list(cluster.vms.values()), rate, seed=seed, mean=mean, std=std)
    for change in injector.next_events(0.0):
        cluster.set_demand(0.0, change.vm, change.cpu)
    monitors = {n.name: Monitor(n, Thresholds(underload=0.0, underload_clear=0.0)) for n in cluster.nodes}
    dvms = _Dvms(cluster, monitors, seed=seed, time_limit=time_limit, engine=engine, bandwidth_mb_s=bandwidth_mb_s,
                 virtual_solve_time=virtual_solve_time) if scheduler == "dvms" else None
    events: list[_Event] = []
    series: list[tuple[float, int]] = []
    queue: list[tuple[float, int, str]] = [(0.0, 0, "sample"), (period if dvms is None else retry, 1, "schedule")]
    pending: list[tuple[float, int, list[Migration]]] = []  # centralized plans being applied: (end, seq, moves)
    seq = 2

    def observe(node: str, now: float) -> None:
        if dvms is not None:
            dvms.observe(node, now)
        else:
            monitors[node].observe(now, cluster.cpu[node], cluster.memory[node])

    for node in cluster.by_name:
        observe(node, 0.0)
    while True:
        t_load = injector.next_time()
        t = min(t_load if t_load is not None else math.inf, queue[0][0], pending[0][0] if pending else math.inf)
        if t > duration:
            break
        if dvms is not None:
            dvms.net.run(t)
        if pending and pending[0][0] == t:
            _, _, moves = heapq.heappop(pending)
            for node in cluster.migrate(t, moves):
                observe(node, t)
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
                busy_until = t
                if cluster.overloaded:
                    cluster.advance(t)
                    start = time.perf_counter()
                    plan = cluster.solve([n.name for n in cluster.nodes], central_time_limit, engine, seed)
                    seconds = time.perf_counter() - start
                    event = _Event(t, nodes, seconds, plan is not None)
                    events.append(event)
                    if plan is not None and plan.migrations:
                        solved = t + (seconds if virtual_solve_time is None else virtual_solve_time)
                        ends = _durations(cluster, plan.migrations, bandwidth_mb_s)
                        event.applied, event.migrations, event.apply_seconds = True, len(ends), ends[-1]
                        busy_until = solved + ends[-1]
                        heapq.heappush(pending, (busy_until, seq, plan.migrations))
                heapq.heappush(queue, (max(t + period, busy_until), seq, kind))
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
        "node_vcpus": node_vcpus, "sites": sites, "duration": duration,
        "seed": seed, "rate": rate, "mean": mean, "std": std, "ve_size": ve_size, "period": period, "retry": retry,
        "time_limit": central_time_limit if dvms is None else time_limit, "engine": engine,
        "bandwidth_mb_s": bandwidth_mb_s, "virtual_solve_time": virtual_solve_time})


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
        "migrations": cluster.migrations,
        "inter_site_migrations": cluster.inter_site,
        "inter_site_share": round(cluster.inter_site / cluster.migrations, 4) if cluster.migrations else 0.0,
        "check_failures": cluster.failures,
        "overloaded_nodes": [[round(t, 3), k] for t, k in series],
        "wall_seconds": round(wall, 3),
        "events": [{"time": round(e.time, 3), "nodes": e.nodes, "solve_seconds": round(e.solve_seconds, 5),
                    "found": e.found, "applied": e.applied, "migrations": e.migrations,
                    "apply_seconds": round(e.apply_seconds, 3)} for e in events],
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
    """Overloaded nodes over time, one line per scheduler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    for name, res in results.items():
        ax.step([p[0] for p in res["overloaded_nodes"]], [p[1] for p in res["overloaded_nodes"]], where="post",
                label=f"{name}: {res['overload_node_seconds']:.0f} node·s overloaded, {res['migrations']} migrations")
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("overloaded nodes")
    any_res = next(iter(results.values()))
    c = any_res["config"]
    ax.set_title(f"{c['nodes']} nodes, {c['vms']} VMs, {c['sites']} sites")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
