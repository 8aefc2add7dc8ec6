"""A partition's plan: where its VMs go so that no node is over capacity and every VE keeps its rules.

`solve` takes the partition's nodes, the VMs running on them (movable) and, explicitly, the VMs of the
same VEs that it may not move (`fixed`: outside the partition, or pinned where they are) with the sites
of their nodes (`sites`): they count for the VEs' rules (anti-affinity, max_per_node, same_site, spread,
affinity) but stay put. After the plan, on every node of the partition, CPU demand and reserved memory
fit; cost is the memory migrated, an inter-site migration costing `inter_site_weight` times an intra-site
one (WAN links are slower and shared), plus one unit per migration so that, cost otherwise equal, fewer
VMs move. `None` means no plan exists within the partition: the partition protocol grows it.

Engines: a greedy first-fit-decreasing repair, then OR-Tools CP-SAT. Greedy: evict what breaks a rule
or overloads a node (the cheapest single VM that relieves a node, else the largest CPU), then re-place
the evictees by decreasing CPU, each on its first node that fits and keeps the rules (its own node
first, then its site's nodes, then the others', each by most free CPU); milliseconds, but no optimum.
CP-SAT: booleans x[unit, node], a unit being the movable VMs of one affinity group (a lone VM
otherwise), each domain pruned beforehand (room, pinned site, fixed peers), hinted with the greedy
placement and stopped at the time limit. The cheaper of the two wins, so when CP-SAT stops without a
solution the greedy plan stands, and CP-SAT's at the limit is no worse than greedy's when it kept the
hint. `Plan.solver` says which one produced it.

Large problems (a whole cluster: movable VMs × nodes above `LARGE`) are pruned so the model has the size
of the trouble, not of the cluster: only the VMs of nodes in trouble or of VEs breaking a rule move, and
CP-SAT sees `CANDIDATES` nodes per unit besides its home and greedy's choice (`_Problem._fix_healthy`).

`order` then sequences the migrations so that no step overloads a node or breaks a rule (see there);
`check` lists what a placement breaks.

OR-Tools is imported by the first solve that runs CP-SAT (`_load_cp_sat`), not with this module: every agent
loads the solver, few ever need CP-SAT, and OR-Tools alone would double an idle agent's memory.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from itertools import chain, islice
from typing import TYPE_CHECKING

from dvms.model import VM, Migration, Node, Plan, Rules

if TYPE_CHECKING:  # imported by the first CP-SAT solve (`_load_cp_sat`)
    from ortools.sat.python import cp_model

log = logging.getLogger(__name__)

INTER_SITE_WEIGHT = 4.0  # an inter-site migration costs this many times the same memory moved inside a site
_SCALE = 100  # cost units per MB moved inside a site: room for a non-integer weight
LARGE = 20_000  # movable VMs x nodes above which a problem is pruned (`_Problem._fix_healthy`, `CANDIDATES`)
CANDIDATES = 16  # in a large problem, the nodes CP-SAT may send a unit to besides its home and greedy's choice


class Unorderable(ValueError):
    """The migrations block each other and no node has room to break the cycle."""


# ---------------------------------------------------------------- check


def check(nodes: Sequence[Node], vms: Iterable[VM], rules: Iterable[Rules] = (), *,
          sites: Mapping[str, str] | None = None) -> list[str]:
    """Every capacity and rule that the placement `vms` breaks, one line each (empty: all is well).

    Capacity is checked on `nodes`; VMs may also run on other nodes whose site `sites` gives (node ->
    site), where they count for their VE's rules only. Rule groups naming VMs absent from vms skip them.
    """
    vms = list(vms)
    site_of = _site_map(nodes, sites)
    out = [f"vm {name}: listed {n} times" for name, n in Counter(vm.name for vm in vms).items() if n > 1]
    out += [f"vm {vm.name}: on {vm.node}, a node of unknown site" for vm in vms if vm.node not in site_of]
    cpu, memory = _loads(vms)
    for node in nodes:
        if cpu[node.name] > node.cpu:
            out.append(f"node {node.name}: CPU demand {cpu[node.name]} > capacity {node.cpu}")
        if memory[node.name] > node.memory_mb:
            out.append(f"node {node.name}: memory {memory[node.name]} MB > capacity {node.memory_mb} MB")
    by_name = {vm.name: vm for vm in vms}
    by_ve = _by_ve(vms)
    for r in rules:
        out += _rule_violations(r, by_ve.get(r.ve, []), by_name, site_of)
    return out


def _rule_violations(r: Rules, members: list[VM], by_name: Mapping[str, VM], site_of: Mapping[str, str]) -> list[str]:
    out = []

    def group(names: frozenset[str]) -> list[VM]:
        return [by_name[n] for n in sorted(names) if n in by_name]

    for g in r.affinity:
        where = sorted({vm.node for vm in group(g)})
        if len(where) > 1:
            out.append(f"ve {r.ve}: affinity {{{', '.join(sorted(g))}}} split over {', '.join(where)}")
    for g in r.anti_affinity:
        for node, names in _by_node(group(g)).items():
            if len(names) > 1:
                out.append(f"ve {r.ve}: anti-affinity {{{', '.join(sorted(g))}}}: {', '.join(names)} share {node}")
    if r.max_per_node is not None:
        for node, names in _by_node(members).items():
            if len(names) > r.max_per_node:
                out.append(f"ve {r.ve}: {len(names)} VMs on {node}, max_per_node {r.max_per_node}")
    located = [(vm, site_of[vm.node]) for vm in members if vm.node in site_of]
    if r.site is not None:
        out += [f"ve {r.ve}: vm {vm.name} on site {s}, pinned to {r.site}" for vm, s in located if s != r.site]
    covered = sorted({s for _, s in located})
    if r.same_site and len(covered) > 1:
        out.append(f"ve {r.ve}: on sites {', '.join(covered)}, not one (same_site)")
    if r.spread_sites is not None and len(covered) < r.spread_sites:
        out.append(f"ve {r.ve}: covers {len(covered)} site(s), spread_sites needs {r.spread_sites}")
    return out


def apply(vms: Iterable[VM], migrations: Iterable[Migration]) -> list[VM]:
    """The placement after the migrations, in order; ValueError if one names an unknown VM or wrong source."""
    where = {vm.name: vm for vm in vms}
    for m in migrations:
        vm = where.get(m.vm)
        if vm is None or vm.node != m.source:
            raise ValueError(f"migration of {m.vm} from {m.source}: the VM is {'on ' + vm.node if vm else 'unknown'}")
        where[m.vm] = replace(vm, node=m.target)
    return list(where.values())


# ---------------------------------------------------------------- order


def order(plan: Plan, nodes: Sequence[Node], vms: Sequence[VM], *, fixed: Sequence[VM] = (),
          pivots: Collection[str] | None = None, rules: Iterable[Rules] = (),
          sites: Mapping[str, str] | None = None) -> Plan:
    """The plan's migrations in an order that never takes a node over capacity nor breaks a VE's rule on the
    way, with pivots where needed.

    Model: migrations run one after another; while one runs, the VM's memory and CPU are held at both its
    source and its target (the target reserves before the copy, the source frees after the switch-over),
    so a migration may start only if its target has room for the VM next to what it holds. A node over
    capacity at the start only sheds load until it fits. Each step also keeps its VE's `rules` no worse
    (`keeps_rules`: a rule that holds keeps holding, one already broken is not broken further), the
    `fixed` VMs counted where they are (`sites`: the site of their nodes outside `nodes`); so every prefix
    of the plan keeps the rules that held before it, and a plan cut at its deadline, or refused half-way,
    leaves no rule broken. Among the migrations that may start, those that relieve an overloaded node go
    first. When none may start (a cycle: A waits for B's room and B for A's, or a VM waits for an
    anti-affine peer to leave the node the peer is to swap for its own), one VM on a node that a blocked
    migration targets goes first to a pivot — a node of `pivots` (default: all of `nodes`) with room, in
    its source's or target's site (a VM pinned to a site stays there), its own site first, where it keeps
    its VE's rules — and on to its target later. Each VM pivots once at most; Unorderable when no pivot
    has room. Affinity holds at the end only: a group moves one VM at a time (relocation, which checks
    the whole VE after each move, refuses such a step). Migrations go from where the VM is (`vms`)
    between `nodes`; `fixed` VMs take room and count for the rules.
    """
    state = _Ordering(nodes, vms, fixed, pivots, rules, sites)
    pending = state.check(plan.migrations)
    while pending:
        m = state.next_ready(pending)
        if m is not None:
            pending.remove(m)
            del state.target_of[m.vm]
            state.move(m.vm, m.target)
            continue
        state.move(*state.pivot(pending))
    return Plan(state.out, plan.solver, plan.seconds)


class _Ordering:
    """`order`'s state while it orders: where each VM is, the load it puts on each node, and which pending
    migrations keep their VE's rules as things stand (`allowed`, reviewed after each move of the VE)."""

    def __init__(self, nodes: Sequence[Node], vms: Sequence[VM], fixed: Sequence[VM],
                 pivots: Collection[str] | None, rules: Iterable[Rules], sites: Mapping[str, str] | None) -> None:
        self.site_of = {n.name: n.site for n in nodes}
        self.capacity = {n.name: (n.cpu, n.memory_mb) for n in nodes}
        self.pivots = set(self.site_of if pivots is None else pivots) & set(self.site_of)
        self.by_name = {vm.name: vm for vm in vms}
        self.cpu, self.memory = _loads([*vms, *fixed])
        self.where = {vm.name: vm.node for vm in vms}
        self.rules_of = {r.ve: r for r in rules}
        self.everywhere = _site_map(nodes, sites)
        self.ve_now: dict[str, dict[str, VM]] = defaultdict(dict)  # VE with rules -> its VMs (fixed too), now
        for vm in [*vms, *fixed]:
            if vm.ve in self.rules_of:
                self.ve_now[vm.ve][vm.name] = vm
        self.target_of: dict[str, str] = {}  # VM -> its target, while its migration is pending
        self.waiting: dict[str, list[str]] = defaultdict(list)  # VE with rules -> its VMs with a migration
        self.allowed: dict[str, bool] = {}  # VM -> whether its pending migration keeps its VE's rules now
        self.pivoted: set[str] = set()
        self.out: list[Migration] = []

    def check(self, migrations: Iterable[Migration]) -> list[Migration]:
        """The migrations to order, each checked against the VMs, with their rules reviewed."""
        pending: list[Migration] = []
        for m in migrations:
            if m.vm not in self.by_name or self.where[m.vm] != m.source or {m.source, m.target} - set(self.site_of):
                raise ValueError(f"order: migration of {m.vm} from {m.source} to {m.target} does not match the VMs")
            pending.append(m)
        if len({m.vm for m in pending}) < len(pending):
            raise ValueError("order: a VM migrates twice; give its source and final target once")
        for m in pending:
            self.target_of[m.vm] = m.target
            if self.by_name[m.vm].ve in self.rules_of:
                self.waiting[self.by_name[m.vm].ve].append(m.vm)
        for ve in self.waiting:
            self._review(ve)
        return pending

    def next_ready(self, pending: list[Migration]) -> Migration | None:
        """A migration that may start now, those relieving an overloaded node first; None if none may."""
        ready = [m for m in pending if self.allowed.get(m.vm, True) and self._fits(m.target, self.by_name[m.vm])]
        if not ready:
            return None
        wanted = {m.target for m in pending}
        return min(ready, key=lambda m: (not self._over(self.where[m.vm]), self.where[m.vm] not in wanted))

    def pivot(self, pending: list[Migration]) -> tuple[str, str]:
        """The VM to send to a pivot, and the pivot, to break a cycle: the smallest VM on a node that a
        blocked migration targets, to a node in its source's or target's site (its own first) with room
        and where it keeps its VE's rules, the emptiest first. Unorderable when none exists."""
        blocked = {m.target for m in pending}
        site_of, where = self.site_of, self.where
        choices = [(self.by_name[m.vm].memory_mb, m.vm, site_of[p] != site_of[where[m.vm]],
                    -(self.capacity[p][1] - self.memory[p]), p)
                   for m in pending if where[m.vm] in blocked and m.vm not in self.pivoted
                   for p in self.pivots - {where[m.vm], m.target}
                   if site_of[p] in (site_of[where[m.vm]], site_of[m.target]) and self._fits(p, self.by_name[m.vm])
                   and self._keeps(self.by_name[m.vm], p)]
        if not choices:
            stuck = ", ".join(f"{m.vm} {where[m.vm]}->{m.target}" for m in pending)
            raise Unorderable(f"migrations wait for each other's room or rules and no node can take a pivot: {stuck}")
        _, vm_name, _, _, p = min(choices)
        self.pivoted.add(vm_name)
        return vm_name, p

    def move(self, vm_name: str, target: str) -> None:
        """Append the migration of `vm_name` to `target`, and account for it."""
        vm = self.by_name[vm_name]
        source = self.where[vm_name]
        self.out.append(Migration(vm_name, source, target, vm.memory_mb))
        self.cpu[source] -= vm.cpu
        self.memory[source] -= vm.memory_mb
        self.cpu[target] += vm.cpu
        self.memory[target] += vm.memory_mb
        self.where[vm_name] = target
        if vm.ve in self.rules_of:
            self.ve_now[vm.ve][vm_name] = replace(vm, node=target)
            self._review(vm.ve)

    def _review(self, ve: str) -> None:
        for name in self.waiting.get(ve, ()):
            if name in self.target_of:
                self.allowed[name] = self._keeps(self.by_name[name], self.target_of[name])

    def _keeps(self, vm: VM, target: str) -> bool:
        r = self.rules_of.get(vm.ve)
        return r is None or keeps_rules(r, self.ve_now[vm.ve].values(), vm.name, target, self.everywhere)

    def _fits(self, node: str, vm: VM) -> bool:
        return (self.cpu[node] + vm.cpu <= self.capacity[node][0]
                and self.memory[node] + vm.memory_mb <= self.capacity[node][1])

    def _over(self, node: str) -> bool:
        return node in self.capacity and (self.cpu[node] > self.capacity[node][0]
                                          or self.memory[node] > self.capacity[node][1])


def keeps_rules(r: Rules, vms: Iterable[VM], vm: str, target: str, sites: Mapping[str, str]) -> bool:
    """Whether moving `vm` to `target` leaves its VE's rules `r` no worse: every rule that holds keeps holding
    and a broken one is broken no further (`_strain`), affinity aside (see `order`). vms: the VE's VMs where
    they are now (those absent are not counted); sites: node -> site, for their nodes and target."""
    before = list(vms)
    after = [replace(v, node=target) if v.name == vm else v for v in before]
    was, now = _strain(r, before, sites), _strain(r, after, sites)
    return all(now[k] <= was[k] for k in now)


def _strain(r: Rules, vms: Sequence[VM], sites: Mapping[str, str]) -> Counter[str]:
    """How far a VE's VMs are from keeping each of its rules but affinity, 0 for one kept: per anti-affinity
    group, its VMs on a node with an earlier one of the group; the VMs beyond max_per_node; the VMs out
    of the pinned site; the sites beyond one (same_site); the sites short of spread_sites."""
    out: Counter[str] = Counter()
    by_name = {vm.name: vm for vm in vms}
    for k, g in enumerate(r.anti_affinity):
        on = [by_name[n].node for n in g if n in by_name]
        out[f"anti-affinity {k}"] = len(on) - len(set(on))
    if r.max_per_node is not None:
        out["max_per_node"] = sum(max(0, n - r.max_per_node) for n in Counter(vm.node for vm in vms).values())
    located = [sites[vm.node] for vm in vms if vm.node in sites]
    covered = len(set(located))
    if r.site is not None:
        out["site"] = sum(1 for s in located if s != r.site)
    if r.same_site:
        out["same_site"] = max(0, covered - 1)
    if r.spread_sites is not None:
        out["spread_sites"] = max(0, r.spread_sites - covered)
    return out


def predecessors(migrations: Sequence[Migration], ve_of: Mapping[str, str] | None = None) -> list[set[int]]:
    """For each migration of an ordered plan, the earlier ones it must wait for so that the plan may run in
    parallel and stay safe: the last one sharing its source or its target, so each node takes part in one
    migration at a time and sees its load change as in the plan's order, which never overloads it; with
    ve_of (VM -> VE), also the last one of the same VE, so the VE's rules are checked step by step in the
    plan's order. Migrations with no predecessor in common run side by side."""
    last: dict[tuple[str, str], int] = {}
    out = []
    for i, m in enumerate(migrations):
        keys = [("node", m.source), ("node", m.target)] + ([("ve", ve_of[m.vm])] if ve_of is not None else [])
        out.append({last[k] for k in keys if k in last})
        for k in keys:
            last[k] = i
    return out


# ---------------------------------------------------------------- solve


@dataclass
class _Unit:
    """Movable VMs that go together (an affinity group, or one VM), and where they may go."""

    ve: str
    vms: tuple[VM, ...]
    cpu: int
    memory_mb: int
    home: str | None  # the node all its VMs are on, if they share one
    anchors: frozenset[str]  # nodes of the fixed VMs of its affinity group (it must join them)
    domain: list[str]  # nodes it may go to, considering it alone (in a large problem: the best few)

    @cached_property
    def names(self) -> frozenset[str]:
        return frozenset(vm.name for vm in self.vms)


class _Problem:
    """The input, checked and put in the shape both engines use; `impossible` says why nothing can work."""

    def __init__(self, nodes: Sequence[Node], vms: Sequence[VM], rules: Iterable[Rules], fixed: Sequence[VM],
                 sites: Mapping[str, str] | None, evacuate: Collection[str]) -> None:
        self.nodes = {n.name: n for n in nodes}
        self.site_of = _site_map(nodes, sites)
        self.vms, self.fixed = list(vms), list(fixed)
        self.rules: dict[str, Rules] = {}
        for r in rules:
            if r.ve in self.rules:
                raise ValueError(f"solve: two sets of rules for ve {r.ve}")
            self.rules[r.ve] = r
        names = Counter(vm.name for vm in [*self.vms, *self.fixed])
        if len(self.nodes) != len(nodes) or any(n > 1 for n in names.values()):
            raise ValueError("solve: node and VM names must be unique")
        if any(vm.node not in self.nodes for vm in self.vms):
            raise ValueError("solve: every movable VM must run on a node of the partition")
        if any(vm.node not in self.site_of for vm in self.fixed):
            raise ValueError("solve: every fixed VM's node needs a site (nodes or sites)")
        self.evacuate = frozenset(evacuate)
        if not self.evacuate <= set(self.nodes):
            raise ValueError("solve: evacuate names nodes outside the partition")
        self.impossible: str | None = None
        cpu, memory = _loads([*self.vms, *self.fixed])  # pruning moves VMs between the lists: totals hold
        if self.large:
            self._fix_healthy(cpu, memory)
        self.fixed_by_ve = _by_ve(self.fixed)
        self.fixed_at: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))  # ve -> node -> VMs
        for vm in self.fixed:
            self.fixed_at[vm.ve][vm.node].add(vm.name)
        self.base_cpu, self.base_memory = _loads(vm for vm in self.fixed if vm.node in self.nodes)
        free = sorted(self.nodes.values(), key=lambda n: (cpu[n.name] - n.cpu, n.name))
        self.by_free = [n.name for n in free]  # the nodes, most free CPU first
        self.by_site: dict[str, list[str]] = defaultdict(list)
        for n in free:
            self.by_site[n.site].append(n.name)
        self.units = self._units()
        self._precheck()

    @property
    def large(self) -> bool:
        """Too many movable VMs × nodes for a full model. Read before pruning (prune?) and after it (cut the
        domains too, if what is left is still large)."""
        return len(self.vms) * len(self.nodes) > LARGE

    def _fix_healthy(self, cpu: Mapping[str, int], memory: Mapping[str, int]) -> None:
        """A large problem moves only the VMs of the nodes in trouble (over capacity, to evacuate) and of the
        VEs that break a rule, with their affinity peers; the others join the fixed VMs. The model then has
        the size of the trouble, not of the cluster, at the price of never making room by moving a VM of a
        healthy node (a small problem may). cpu, memory: the load of every node."""
        hot = {n.name for n in self.nodes.values() if cpu[n.name] > n.cpu or memory[n.name] > n.memory_mb}
        everything = [*self.vms, *self.fixed]
        by_name, by_ve = {vm.name: vm for vm in everything}, _by_ve(everything)
        broken = {ve for ve, r in self.rules.items() if _rule_violations(r, by_ve.get(ve, []), by_name, self.site_of)}
        moving = {vm.name for vm in self.vms if vm.node in hot | self.evacuate or vm.ve in broken}
        movable = {vm.name for vm in self.vms}
        grown = True
        while grown:  # an affinity group moves whole
            grown = False
            for vm in self.vms:
                for g in self.rules.get(vm.ve, Rules(vm.ve)).affinity if vm.name in moving else ():
                    peers = g & movable
                    if vm.name in g and not peers <= moving:
                        moving |= peers
                        grown = True
        self.fixed += [vm for vm in self.vms if vm.name not in moving]
        self.vms = [vm for vm in self.vms if vm.name in moving]

    def _units(self) -> list[_Unit]:
        parent = {vm.name: vm.name for vm in [*self.vms, *self.fixed]}

        def root(name: str) -> str:
            while parent[name] != name:
                parent[name] = parent[parent[name]]
                name = parent[name]
            return name

        for r in self.rules.values():
            for g in r.affinity:
                present = sorted(n for n in g if n in parent)
                for name in present[1:]:
                    parent[root(name)] = root(present[0])
        movable: dict[str, list[VM]] = defaultdict(list)
        anchors: dict[str, set[str]] = defaultdict(set)
        for vm in self.vms:
            movable[root(vm.name)].append(vm)
        for vm in self.fixed:
            anchors[root(vm.name)].add(vm.node)
        units = []
        large = self.large
        for key, members in sorted(movable.items()):
            homes = {vm.node for vm in members}
            unit = _Unit(members[0].ve, tuple(members), sum(vm.cpu for vm in members),
                         sum(vm.memory_mb for vm in members), homes.pop() if len(homes) == 1 else None,
                         frozenset(anchors[key]), [])
            unit.domain = list(islice(self.candidates(unit), 1 + CANDIDATES) if large else self.candidates(unit))
            units.append(unit)
        return units

    def candidates(self, unit: _Unit) -> Iterator[str]:
        """The nodes unit may go to, considering it alone, best first: its home, then its site's nodes, then
        the other sites' nodes, each by decreasing free CPU (the emptiest first: the least likely to overload
        next)."""
        home = unit.home
        origin = self.site_of[home or unit.vms[0].node]
        order = chain([home] if home in self.nodes else [], (n for n in self.by_site[origin] if n != home),
                      (n for n in self.by_free if self.site_of[n] != origin))
        return (n for n in order if self.allowed(unit, self.nodes[n]))

    def allowed(self, unit: _Unit, node: Node) -> bool:
        """Whether unit alone may go to node: room next to the fixed VMs, and its VE's rules towards them."""
        r = self.rules.get(unit.ve) or Rules(unit.ve)
        here = self.fixed_at[unit.ve].get(node.name, set())
        names = unit.names
        return (node.name not in self.evacuate
                and (not unit.anchors or unit.anchors == {node.name})
                and (r.site is None or node.site == r.site)
                and (not r.same_site or all(self.site_of[vm.node] == node.site for vm in self.fixed_by_ve[unit.ve]))
                and (r.max_per_node is None or len(here) + len(unit.vms) <= r.max_per_node)
                and unit.cpu <= node.cpu - self.base_cpu[node.name]
                and unit.memory_mb <= node.memory_mb - self.base_memory[node.name]
                and all(len(g & names) + len(g & here) <= 1 for g in r.anti_affinity if g & names))

    def _precheck(self) -> None:
        """Cheap necessary conditions, so that hopeless partitions are told at once (and why)."""
        room = [n for n in self.nodes.values() if n.name not in self.evacuate]
        for n in self.nodes.values():
            if self.base_cpu[n.name] > n.cpu or self.base_memory[n.name] > n.memory_mb:
                self.impossible = f"node {n.name}: its fixed VMs alone exceed its capacity"
                return
        for unit in self.units:
            if not unit.domain:
                self.impossible = f"{', '.join(vm.name for vm in unit.vms)}: no node of the partition can take it"
                return
        for dim, free in (("CPU", sum(n.cpu - self.base_cpu[n.name] for n in room)),
                          ("memory", sum(n.memory_mb - self.base_memory[n.name] for n in room))):
            need = sum(u.cpu if dim == "CPU" else u.memory_mb for u in self.units)
            if need > free:
                self.impossible = f"the VMs demand {need} {dim}, the partition has {free}"
                return
        fixed = {vm.name: vm for vm in self.fixed}
        for r in self.rules.values():
            clash = _rule_violations(r, self.fixed_by_ve.get(r.ve, []), fixed, self.site_of)
            clash = [c for c in clash if "spread_sites" not in c]  # movable VMs may cover more sites, not the rest
            if clash:
                self.impossible = f"the fixed VMs break a rule: {clash[0]}"
                return

    def placement(self, assignment: Mapping[int, str]) -> list[VM]:
        """Every VM, movable and fixed, after units go to the nodes of assignment (unit index -> node)."""
        moved = {vm.name: node for i, node in assignment.items() for vm in self.units[i].vms}
        return [replace(vm, node=moved.get(vm.name, vm.node)) for vm in self.vms] + self.fixed

    def total_cost(self, assignment: Mapping[int, str], weight: float) -> int:
        return sum(self.cost(self.units[i], n, weight) for i, n in assignment.items())

    def cost(self, unit: _Unit, node: str, weight: float) -> int:
        """What sending unit to node costs: memory moved (scaled, inter-site weighted) plus one per VM moved."""
        inter = round(_SCALE * weight)
        return sum(vm.memory_mb * (_SCALE if self.site_of[vm.node] == self.site_of[node] else inter) + 1
                   for vm in unit.vms if vm.node != node)


def solve(nodes: Sequence[Node], vms: Sequence[VM], rules: Iterable[Rules] = (), time_limit: float = 1.0, *,
          fixed: Sequence[VM] = (), sites: Mapping[str, str] | None = None, evacuate: Collection[str] = (),
          engine: str = "auto", inter_site_weight: float = INTER_SITE_WEIGHT, workers: int = 1,
          seed: int = 0) -> Plan | None:
    """An ordered plan after which the partition's nodes fit and the VEs keep their rules; None if none exists.

    nodes: the partition; vms: the VMs running on them, which may move; fixed: VMs that may not (other
    VMs of the same VEs, outside the partition or not), with `sites` giving the site of their nodes
    outside the partition; evacuate: nodes to empty (an underloaded node being consolidated away).
    engine "auto": the greedy repair first (milliseconds), then CP-SAT, hinted with it, for what is left
    of time_limit seconds; the cheaper plan wins, so the greedy one when CP-SAT finds nothing in time
    (time_limit <= 0: greedy only). "cp-sat": CP-SAT alone; "greedy": greedy alone. workers and seed go
    to CP-SAT. Returns an empty plan (solver "") when nothing breaks; None when the partition is too
    small: CP-SAT proved it, or neither engine found a placement in time, or no placement found can be
    reached without overloading a node or breaking a VE's rule on the way (`order`).
    """
    if engine not in ("auto", "cp-sat", "greedy"):
        raise ValueError(f"solve: unknown engine {engine!r}")
    start = time.monotonic()
    p = _Problem(nodes, vms, rules, fixed, sites, evacuate)
    if not any(vm.node in p.evacuate for vm in p.vms) and not check(nodes, [*p.vms, *p.fixed], p.rules.values(),
                                                                     sites=sites):
        return Plan(seconds=time.monotonic() - start)
    if p.impossible is not None:
        log.debug("no plan in %d nodes: %s", len(nodes), p.impossible)
        return None
    found: list[tuple[int, str, dict[int, str]]] = []  # (cost, engine, assignment)
    greedy = None
    if engine != "cp-sat":
        greedy = _greedy(p)
        if greedy is not None and not check(nodes, p.placement(greedy), p.rules.values(), sites=sites):
            found.append((p.total_cost(greedy, inter_site_weight), "greedy", greedy))
        else:
            greedy = None  # a heuristic: it can miss what a rule needs, the check has the last word
    if engine == "cp-sat" or (engine == "auto" and time.monotonic() < start + time_limit):
        loading = _load_cp_sat()  # the first solve's import is not taken from CP-SAT's time
        status, assignment = _cp_sat(p, start + loading + time_limit, inter_site_weight, workers, seed, greedy)
        from ortools.sat.python import cp_model

        if status == cp_model.INFEASIBLE:
            if not found:
                log.debug("no plan in %d nodes: CP-SAT proved it", len(nodes))
                return None
            log.warning("CP-SAT refused a partition that greedy solved (a modelling bug): %s", nodes)
        if assignment is not None:
            broken = check(nodes, p.placement(assignment), p.rules.values(), sites=sites)
            if broken:
                raise RuntimeError(f"solve: CP-SAT plan breaks {broken[0]}")
            found.append((p.total_cost(assignment, inter_site_weight), "cp-sat", assignment))
    for _, used, assignment in sorted(found, key=lambda f: (f[0], f[1] != "cp-sat")):  # cheapest orderable one
        moves = [Migration(vm.name, vm.node, new.node, vm.memory_mb)
                 for vm, new in zip(p.vms, p.placement(assignment), strict=False) if vm.node != new.node]
        try:
            plan = order(Plan(moves, used), nodes, p.vms, fixed=p.fixed, pivots=set(p.nodes) - p.evacuate,
                         rules=p.rules.values(), sites=p.site_of)
        except Unorderable as e:
            log.debug("%s placement unreachable: %s", used, e)
            continue
        plan.seconds = time.monotonic() - start
        return plan
    log.debug("no plan in %d nodes within %.2f s", len(nodes), time_limit)
    return None


def _load_cp_sat() -> float:
    """Import OR-Tools' CP-SAT if it is not yet; the seconds that took. OR-Tools costs a process ~76 MiB and
    most agents never solve a problem that breaks anything (docs/benchmarks.md: an idle agent's footprint),
    so no module imports it at start."""
    if "ortools.sat.python.cp_model" in sys.modules:
        return 0.0
    begin = time.monotonic()
    from ortools.sat.python import cp_model  # noqa: F401 - loaded for `_cp_sat`

    return time.monotonic() - begin


def _cp_sat(p: _Problem, deadline: float, weight: float, workers: int, seed: int,
            hint: Mapping[int, str] | None) -> tuple[cp_model.CpSolverStatus, dict[int, str] | None]:
    """Builds and solves the model by deadline (time.monotonic()); hint (unit -> node, default: where the
    units are) gives CP-SAT its first solution."""
    from ortools.sat.python import cp_model

    model = cp_model.CpModel()
    for i, n in (hint or {}).items():  # a large problem's short domains may lack greedy's choice
        if n not in p.units[i].domain:
            p.units[i].domain.append(n)
    x = {(i, n): model.new_bool_var(f"x{i}_{n}") for i, u in enumerate(p.units) for n in u.domain}
    on: dict[str, list[tuple[int, cp_model.IntVar]]] = defaultdict(list)  # node -> (unit, x)
    for (i, n), var in x.items():
        on[n].append((i, var))
    for i, u in enumerate(p.units):
        model.add_exactly_one(x[i, n] for n in u.domain)
        start = (hint or {}).get(i, u.home)
        for n in u.domain:
            model.add_hint(x[i, n], n == start)
    for n, terms in on.items():
        node, units = p.nodes[n], [p.units[i] for i, _ in terms]
        xs = [v for _, v in terms]
        model.add(cp_model.LinearExpr.weighted_sum(xs, [u.cpu for u in units]) <= node.cpu - p.base_cpu[n])
        model.add(cp_model.LinearExpr.weighted_sum(xs, [u.memory_mb for u in units])
                  <= node.memory_mb - p.base_memory[n])
    by_ve: dict[str, list[tuple[int, str, cp_model.IntVar]]] = defaultdict(list)
    for (i, n), var in x.items():
        by_ve[p.units[i].ve].append((i, n, var))
    for r in p.rules.values():
        _ve_constraints(model, p, r, by_ve.get(r.ve, []))
    model.minimize(cp_model.LinearExpr.weighted_sum(list(x.values()),
                                                    [p.cost(p.units[i], n, weight) for i, n in x]))
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(0.0, deadline - time.monotonic())  # building took some
    solver.parameters.num_workers = workers
    solver.parameters.random_seed = seed
    status = solver.solve(model)
    if status == cp_model.MODEL_INVALID:
        raise RuntimeError(f"solve: invalid CP-SAT model: {model.validate()}")
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return status, None
    return status, {i: n for (i, n), var in x.items() if solver.boolean_value(var)}


def _ve_constraints(model: cp_model.CpModel, p: _Problem, r: Rules,
                    mine: list[tuple[int, str, cp_model.IntVar]]) -> None:
    """A VE's rules on the x of its units (mine: unit, node, x); affinity is in the units, pins in the domains."""
    from ortools.sat.python import cp_model

    fixed = p.fixed_by_ve.get(r.ve, [])
    per_node: dict[str, list[tuple[int, cp_model.IntVar]]] = defaultdict(list)
    per_site: dict[str, list[cp_model.IntVar]] = defaultdict(list)
    for i, n, var in mine:
        per_node[n].append((i, var))
        per_site[p.site_of[n]].append(var)
    for g in r.anti_affinity:
        for terms in per_node.values():
            apart = [v for i, v in terms if any(vm.name in g for vm in p.units[i].vms)]
            if len(apart) > 1:
                model.add_at_most_one(apart)
    if r.max_per_node is not None:
        for n, terms in per_node.items():
            here = sum(1 for vm in fixed if vm.node == n)
            model.add(cp_model.LinearExpr.weighted_sum([v for _, v in terms], [len(p.units[i].vms) for i, _ in terms])
                      <= r.max_per_node - here)
    if r.same_site and not fixed:  # with fixed VMs, the domains already keep the units in their site
        chosen = {s: model.new_bool_var(f"site_{r.ve}_{s}") for s in per_site}
        model.add_at_most_one(chosen.values())
        for s, vars_ in per_site.items():
            for var in vars_:
                model.add_implication(var, chosen[s])
    covered = {p.site_of[vm.node] for vm in fixed}
    if r.spread_sites is not None and len(covered) < r.spread_sites:
        reach = []
        for s, vars_ in per_site.items():
            if s not in covered:
                reach.append(model.new_bool_var(f"cover_{r.ve}_{s}"))
                model.add(reach[-1] <= sum(vars_))
        model.add(sum(reach) >= r.spread_sites - len(covered))


class _Greedy:
    """The partial placement the greedy repair works on, with the counts its rule tests need."""

    def __init__(self, p: _Problem) -> None:
        self.p = p
        self.at: dict[int, str | None] = {}
        self.cpu, self.memory = Counter(p.base_cpu), Counter(p.base_memory)
        self.ve_nodes: dict[str, Counter[str]] = defaultdict(Counter)  # VMs of a VE per node (fixed too)
        self.ve_sites: dict[str, Counter[str]] = defaultdict(Counter)
        self.unplaced: Counter[str] = Counter()  # units of a VE waiting for a node
        self.anti: dict[tuple[str, frozenset[str]], Counter[str]] = defaultdict(Counter)  # group -> node -> members
        self.units_on: dict[str, set[int]] = defaultdict(set)
        for vm in p.fixed:
            self._count(vm, vm.node, 1)
        for i, u in enumerate(p.units):
            self.at[i] = None
            self.unplaced[u.ve] += 1
            if u.home in u.domain:
                self.place(i, u.home)

    def _count(self, vm: VM, node: str, sign: int) -> None:
        self.ve_nodes[vm.ve][node] += sign
        self.ve_sites[vm.ve][self.p.site_of[node]] += sign
        for g in self.p.rules.get(vm.ve, Rules(vm.ve)).anti_affinity:
            if vm.name in g:
                self.anti[vm.ve, g][node] += sign

    def _move(self, i: int, node: str, sign: int) -> None:
        u = self.p.units[i]
        self.cpu[node] += sign * u.cpu
        self.memory[node] += sign * u.memory_mb
        self.unplaced[u.ve] -= sign
        for vm in u.vms:
            self._count(vm, node, sign)

    def place(self, i: int, node: str) -> None:
        self._move(i, node, 1)
        self.at[i] = node
        self.units_on[node].add(i)

    def evict(self, i: int) -> None:
        node = self.at[i]
        if node is not None:
            self._move(i, node, -1)
            self.at[i] = None
            self.units_on[node].discard(i)

    def on(self, node: str) -> list[int]:
        return sorted(self.units_on[node])

    def over(self, node: str) -> tuple[int, int]:
        n = self.p.nodes[node]
        return self.cpu[node] - n.cpu, self.memory[node] - n.memory_mb

    def fits(self, i: int, node: str) -> bool:
        """Whether unit i, allowed on node (`_Problem.candidates`), may go there now: room, and every rule of
        its VE still reachable."""
        u, n = self.p.units[i], self.p.nodes[node]
        r = self.p.rules.get(u.ve, Rules(u.ve))
        if (self.cpu[node] + u.cpu > n.cpu
                or self.memory[node] + u.memory_mb > n.memory_mb):
            return False
        if r.max_per_node is not None and self.ve_nodes[u.ve][node] + len(u.vms) > r.max_per_node:
            return False
        if any(self.anti[u.ve, g][node] for vm in u.vms for g in r.anti_affinity if vm.name in g):
            return False
        sites = {s for s, k in self.ve_sites[u.ve].items() if k > 0}
        if r.same_site and not sites <= {n.site}:
            return False
        return r.spread_sites is None or len(sites | {n.site}) + self.unplaced[u.ve] - 1 >= r.spread_sites


def _greedy(p: _Problem) -> dict[int, str] | None:
    """First-fit-decreasing repair (see the module's doc); None when an evictee finds no node."""
    state = _Greedy(p)
    _evict_rule_breakers(state)
    for node in sorted(p.nodes):
        while max(over := state.over(node)) > 0:
            here = state.on(node)
            if not here:
                return None
            enough = [i for i in here if p.units[i].cpu >= over[0] and p.units[i].memory_mb >= over[1]]
            if enough:
                state.evict(min(enough, key=lambda i: (p.units[i].memory_mb, -p.units[i].cpu, i)))
            else:
                key = (lambda i: p.units[i].cpu) if over[0] > 0 else (lambda i: p.units[i].memory_mb)
                state.evict(max(here, key=key))
    evicted = sorted((i for i, n in state.at.items() if n is None),
                     key=lambda i: (-p.units[i].cpu, -p.units[i].memory_mb, i))
    for i in evicted:
        for node in p.candidates(p.units[i]):
            if state.fits(i, node):
                state.place(i, node)
                break
        else:
            return None
    return {i: n for i, n in state.at.items() if n is not None}


def _evict_rule_breakers(state: _Greedy) -> None:
    """Evicts the units that stand where their VE's rules forbid, cheapest memory first where there is a choice."""
    p = state.p
    units_of: dict[str, list[int]] = defaultdict(list)
    for i, u in enumerate(p.units):
        units_of[u.ve].append(i)
    for ve, units in units_of.items():
        r = p.rules.get(ve)
        if r is None:
            continue
        mine = sorted((i for i in units if state.at[i] is not None), key=lambda i: (p.units[i].memory_mb, i))
        for g in r.anti_affinity:
            for i in mine:
                node = state.at[i]
                if node is not None and state.anti[r.ve, g][node] > 1 and any(vm.name in g for vm in p.units[i].vms):
                    state.evict(i)
        if r.max_per_node is not None:
            for i in mine:
                node = state.at[i]
                if node is not None and state.ve_nodes[r.ve][node] > r.max_per_node:
                    state.evict(i)
        sites = state.ve_sites[r.ve]
        if r.same_site and sum(1 for k in sites.values() if k > 0) > 1:
            fixed_sites = {p.site_of[vm.node] for vm in p.fixed_by_ve.get(r.ve, [])}
            keep = min(fixed_sites) if fixed_sites else min(sites, key=lambda s: (-sites[s], s))
            for i in mine:
                node = state.at[i]
                if node is not None and p.site_of[node] != keep:
                    state.evict(i)
        if r.spread_sites is not None:
            for i in mine:
                node = state.at[i]
                covered = sum(1 for k in sites.values() if k > 0)
                if covered + state.unplaced[r.ve] >= r.spread_sites:
                    break
                if node is not None and sites[p.site_of[node]] > len(p.units[i].vms):
                    state.evict(i)


# ---------------------------------------------------------------- helpers


def _site_map(nodes: Sequence[Node], sites: Mapping[str, str] | None) -> dict[str, str]:
    return {**(sites or {}), **{n.name: n.site for n in nodes}}


def _loads(vms: Iterable[VM]) -> tuple[Counter[str], Counter[str]]:
    """(CPU demand, reserved memory) per node."""
    cpu: Counter[str] = Counter()
    memory: Counter[str] = Counter()
    for vm in vms:
        cpu[vm.node] += vm.cpu
        memory[vm.node] += vm.memory_mb
    return cpu, memory


def _by_ve(vms: Iterable[VM]) -> dict[str, list[VM]]:
    out: dict[str, list[VM]] = defaultdict(list)
    for vm in vms:
        out[vm.ve].append(vm)
    return out


def _by_node(vms: Iterable[VM]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for vm in vms:
        out[vm.node].append(vm.name)
    return {node: sorted(names) for node, names in sorted(out.items())}
