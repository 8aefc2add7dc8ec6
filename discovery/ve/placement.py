"""Where the VMs of a new VE go: capacity and constraints honoured, nearest candidates first, refusals explained.

Sans-IO: `plan` takes a validated spec and what the caller knows of the candidate nodes (free room,
site, and a rank: its preference order, nearest first, from the spiral search or RTTs) and returns a
`Plan` (VM -> node) or a `Refusal` whose reason is one line in a user's terms. It reserves nothing:
the caller reserves each VM on its node (two-phase) and, if a node refuses, plans again without it
(`exclude`).

The search: VMs bound by affinity form one unit (their needs summed); units go largest first, each
on the first candidate in (rank, node) order that has room and breaks no constraint, backtracking
when a later unit finds no node. The first plan found is therefore the best one in that order: its
vector of candidate positions, read in placement order, is lexicographically smallest among all valid
plans (with `same_site`, over all sites). Pruning: nodes in the same state (site, free room, VMs of
this VE) are interchangeable, so one that failed at a level rules out the others there; a spread
that the remaining units can no longer reach is cut early. The work is bounded (`limit` candidate
tries). Before searching, necessary conditions are checked one by one (each unit fits some node,
anti-affinity groups and spread find enough distinct nodes and sites, per-node limit, total room,
how many units each node could hold given the smallest),
so that the common refusals name their cause; only a conflict of several at once reaches the search.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from discovery.ve.spec import VESpec

DEFAULT_LIMIT = 200_000
_UNITS = ("vCPUs", "MiB memory", "GiB disk")
_SHOWN_SITES = 3


@dataclass(frozen=True)
class Candidate:
    """A node that may host VMs: its free room now, and its rank (lower is preferred, e.g. nearer)."""

    node: str
    site: str
    vcpus: int
    memory_mb: int
    disk_gb: int
    rank: float = 0.0


@dataclass(frozen=True)
class Plan:
    """VM name -> node name, in placement order: largest first, VMs bound by affinity next to each other."""

    assignment: dict[str, str]

    def by_node(self) -> dict[str, list[str]]:
        """Node -> the VMs placed on it, nodes in order of first use."""
        nodes: dict[str, list[str]] = {}
        for vm, node in self.assignment.items():
            nodes.setdefault(node, []).append(vm)
        return nodes


@dataclass(frozen=True)
class Refusal:
    """Why no plan exists, one line fit to show a user."""

    reason: str

    def __str__(self) -> str:
        return self.reason


def plan(spec: VESpec, candidates: Iterable[Candidate], *, exclude: Collection[str] = frozenset(),
         limit: int = DEFAULT_LIMIT) -> Plan | Refusal:
    """Places every VM of spec on candidates (minus the nodes in exclude), or says why it cannot.

    Candidates are tried in (rank, node) order; a node name may appear once (ValueError otherwise).
    A pinned `spec.site` keeps only that site's candidates. At most `limit` candidate tries are made;
    past it the answer is a "search limit" refusal (or, with same_site, the best plan found so far).
    """
    ordered = sorted((c for c in candidates if c.node not in exclude), key=lambda c: (c.rank, c.node))
    position = {c.node: i for i, c in enumerate(ordered)}
    if len(position) != len(ordered):
        raise ValueError("a candidate node appears more than once")
    units = _units(spec)
    if isinstance(units, Refusal):
        return units
    constraints = spec.constraints
    budget = _Budget(limit)
    if spec.site is not None:
        inside = [c for c in ordered if c.site == spec.site]
        if not inside:
            return Refusal(f"no candidate node in site {spec.site}{_elsewhere(ordered)}")
        ordered, where = inside, f" in site {spec.site}"
    else:
        where = ""
    if not ordered:
        return Refusal("no candidate nodes")
    sites = list(dict.fromkeys(c.site for c in ordered))  # by best rank
    if not constraints.same_site or len(sites) == 1:
        scope_where = where or (f" in site {sites[0]}" if constraints.same_site else "")
        found = _Search(units, ordered, constraints.max_per_node, constraints.spread_sites, budget).run(scope_where)
        return found if isinstance(found, Refusal) else _plan(units, ordered, found)
    best: tuple[list[int], list[int], list[Candidate]] | None = None
    reasons: list[str] = []
    for site in sites:
        scope = [c for c in ordered if c.site == site]
        found = _Search(units, scope, constraints.max_per_node, None, budget).run("")
        if isinstance(found, Refusal):
            reasons.append(f"{site}: {found.reason}")
            continue
        positions = [position[scope[i].node] for i in found]
        if best is None or positions < best[0]:
            best = (positions, found, scope)
    if best is not None:
        return _plan(units, best[2], best[1])
    more = f" / and {len(reasons) - _SHOWN_SITES} more sites" if len(reasons) > _SHOWN_SITES else ""
    return Refusal(f"same_site: no site can host all {len(spec.vms)} VMs: "
                   + " / ".join(reasons[:_SHOWN_SITES]) + more)


def check_placement(spec: VESpec, node_of: Mapping[str, str], site_of: Mapping[str, str]) -> str | None:
    """Why VMs placed at `node_of` (VM -> node; `site_of`: node -> site) break the VE's site pin or
    constraints, in one line naming the constraint; None if they break nothing. Relocation checks the
    whole VE with it, as it would be after the move. A placement of only some VMs (a rebuild placing one
    while others wait their turn) is checked for what those VMs can already break: a group counts its
    placed members, and a spread over sites is left for the whole VE."""
    constraints = spec.constraints
    for vm, node in sorted(node_of.items()):
        if spec.site is not None and site_of[node] != spec.site:
            return f"the VE is pinned to site {spec.site}; {vm} would be in {site_of[node]}"
    for group in constraints.together():
        nodes = sorted({node_of[vm] for vm in group if vm in node_of})
        if len(nodes) > 1:
            return f"affinity [{', '.join(group)}] keeps them on one node; they would be on {', '.join(nodes)}"
    for group in constraints.anti_affinity:
        first: dict[str, str] = {}
        for vm in (vm for vm in group if vm in node_of):
            other = first.setdefault(node_of[vm], vm)
            if other != vm:
                return f"anti-affinity [{', '.join(group)}]: {other} and {vm} would share {node_of[vm]}"
    sites = sorted({site_of[node] for node in node_of.values()})
    if constraints.same_site and len(sites) > 1:
        return f"same_site: the VMs would be in {len(sites)} sites ({', '.join(sites)})"
    whole = {vm.name for vm in spec.vms} <= set(node_of)
    if whole and constraints.spread_sites is not None and len(sites) < constraints.spread_sites:
        return (f"spread over {constraints.spread_sites} sites: the VMs would cover only {len(sites)} "
                f"({', '.join(sites)})")
    if constraints.max_per_node is not None and node_of:
        node, count = max(sorted(Counter(node_of.values()).items()), key=lambda item: item[1])
        if count > constraints.max_per_node:
            return f"max_per_node {constraints.max_per_node}: {node} would hold {count} VMs of the VE"
    return None


@dataclass(frozen=True)
class _Unit:
    """VMs that go on one node together (one VM, or an affinity group), with their summed needs."""

    names: tuple[str, ...]
    need: tuple[int, int, int]

    def label(self) -> str:
        return f"vm {self.names[0]}" if len(self.names) == 1 else f"affinity [{', '.join(self.names)}]"


@dataclass
class _Units:
    items: list[_Unit]
    conflicts: list[int]  # per unit, a bit mask of the units it may not share a node with
    groups: list[tuple[tuple[str, ...], list[int]]]  # each anti-affinity group and its units


class _Budget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.left = limit


class _Exhausted(Exception):
    pass


def _units(spec: VESpec) -> _Units | Refusal:
    """The placement units, largest first, and the anti-affinity conflicts between them.

    Specs are validated, but the contradictions are checked again (cheaply) for one built by hand.
    """
    vms = {vm.name: vm for vm in spec.vms}
    constraints = spec.constraints
    for group in constraints.affinity + constraints.anti_affinity:
        unknown = [name for name in group if name not in vms]
        if unknown:
            return Refusal(f"the constraints name vm {unknown[0]}, which the VE does not have")
    together = constraints.together()
    bound = {name for group in together for name in group}
    order = {vm.name: index for index, vm in enumerate(spec.vms)}
    unit_names = [tuple(sorted(group, key=order.__getitem__)) for group in together]
    unit_names += [(vm.name,) for vm in spec.vms if vm.name not in bound]
    items = [_Unit(names, (sum(vms[n].vcpus for n in names), sum(vms[n].memory_mb for n in names),
                           sum(vms[n].disk_gb for n in names))) for names in unit_names]
    items.sort(key=lambda u: (-u.need[0], -u.need[1], -u.need[2], -len(u.names), order[u.names[0]]))
    index = {name: i for i, unit in enumerate(items) for name in unit.names}
    if constraints.max_per_node is not None:
        for unit in items:
            if len(unit.names) > constraints.max_per_node:
                return Refusal(f"{unit.label()} puts {len(unit.names)} VMs on one node, "
                               f"more than max_per_node {constraints.max_per_node}")
    conflicts = [0] * len(items)
    groups: list[tuple[tuple[str, ...], list[int]]] = []
    for group in constraints.anti_affinity:
        members = [index[name] for name in group]
        if len(set(members)) < len(members):
            return Refusal(f"anti-affinity [{', '.join(group)}] names VMs that must share a node")
        mask = sum(1 << i for i in set(members))
        for i in members:
            conflicts[i] |= mask & ~(1 << i)
        groups.append((group, members))
    return _Units(items, conflicts, groups)


def _plan(units: _Units, scope: Sequence[Candidate], choice: list[int]) -> Plan:
    return Plan({name: scope[i].node for unit, i in zip(units.items, choice, strict=True) for name in unit.names})


class _Search:
    """One search over one scope of candidates (all of them, or one site's for same_site)."""

    def __init__(self, units: _Units, scope: Sequence[Candidate], max_per_node: int | None,
                 spread: int | None, budget: _Budget) -> None:
        self.units = units
        self.scope = scope
        self.max_per_node = max_per_node if max_per_node is not None else math.inf
        self.spread = spread if spread is not None and spread > 1 else 0
        self.budget = budget
        # candidate positions where each unit fits on an empty node, in order of preference
        self.fits = [[i for i, c in enumerate(scope) if _fits(c, u.need)] for u in units.items]
        self.sites = list(dict.fromkeys(c.site for c in scope))  # by best rank
        site_ids = {site: bit for bit, site in enumerate(self.sites)}
        self.site_of = [site_ids[c.site] for c in scope]
        self.fit_sites = [_bits(self.site_of[i] for i in fits) for fits in self.fits]
        # the search state, set by run
        self.free: list[list[int]] = []  # free vCPUs, memory and disk, per candidate
        self.count: list[int] = []  # VMs of the VE per candidate
        self.masks: list[int] = []  # units per candidate, as bits
        self.site_count: list[int] = []  # units per site
        self.used_sites = 0  # sites holding a unit, as bits
        self.choice: list[int] = []  # the candidate of each unit placed so far
        self.deepest = 0

    def run(self, where: str) -> list[int] | Refusal:
        """Candidate positions per unit, or why there are none."""
        reason = self._necessary(where)
        if reason:
            return Refusal(reason)
        n = len(self.scope)
        self.free = [[c.vcpus for c in self.scope], [c.memory_mb for c in self.scope], [c.disk_gb for c in self.scope]]
        self.count = [0] * n
        self.masks = [0] * n
        self.site_count = [0] * len(self.sites)
        self.used_sites = 0
        self.choice = []
        self.deepest = 0
        try:
            if self._place(0):
                return self.choice
        except _Exhausted:
            also = f" and constraints {self._active()}" if self._active() else ""
            return Refusal(f"search limit: no placement{where} found in {self.budget.limit} tries; too many "
                           f"combinations of free room{also} to check")
        items = self.units.items
        placed = sum(len(u.names) for u in items[:self.deepest])
        total = sum(len(u.names) for u in items)
        cause = (f"no placement{where} meets capacity and the constraints {self._active()} together"
                 if self._active() else f"the VMs do not fit together on the nodes{where}")
        return Refusal(f"{cause}: largest first, {items[self.deepest].label()} found no node "
                       f"after {placed} of {total} VMs were placed")

    def _place(self, k: int) -> bool:
        items = self.units.items
        if k == len(items):
            return True
        self.deepest = max(self.deepest, k)
        unit, conflicts = items[k], self.units.conflicts[k]
        size = len(unit.names)
        need_v, need_m, need_d = unit.need
        free_v, free_m, free_d = self.free
        failed: set[tuple[int, ...]] = set()
        spread_ok: dict[int, bool] = {}
        budget = self.budget
        for i in self.fits[k]:
            budget.left -= 1
            if budget.left < 0:
                raise _Exhausted
            if (self.masks[i] & conflicts or self.count[i] + size > self.max_per_node
                    or free_v[i] < need_v or free_m[i] < need_m or free_d[i] < need_d):
                continue
            site = self.site_of[i]
            if self.spread:
                ok = spread_ok.get(site)
                if ok is None:
                    ok = spread_ok[site] = self._can_spread(k + 1, self.used_sites | 1 << site)
                if not ok:
                    continue
            state = (site, free_v[i], free_m[i], free_d[i], self.count[i], self.masks[i])
            if state in failed:
                continue
            self._apply(i, k, site, 1)
            self.choice.append(i)
            if self._place(k + 1):
                return True
            self.choice.pop()
            self._apply(i, k, site, -1)
            failed.add(state)
        return False

    def _apply(self, i: int, k: int, site: int, sign: int) -> None:
        unit = self.units.items[k]
        for dim in range(3):
            self.free[dim][i] -= sign * unit.need[dim]
        self.count[i] += sign * len(unit.names)
        self.masks[i] ^= 1 << k
        self.site_count[site] += sign
        if self.site_count[site] == 0:
            self.used_sites &= ~(1 << site)
        else:
            self.used_sites |= 1 << site

    def _can_spread(self, k: int, used: int) -> bool:
        """Whether units k.. can still bring the sites used up to the spread (a bound, never too strict)."""
        missing = self.spread - used.bit_count()
        if missing <= 0:
            return True
        return sum(1 for j in range(k, len(self.fit_sites)) if self.fit_sites[j] & ~used) >= missing

    def _necessary(self, where: str) -> str | None:
        """The first necessary condition that fails, in words; None if all hold."""
        items, scope = self.units.items, self.scope
        for unit, fits in zip(items, self.fits, strict=True):
            if not fits:
                return _no_room(unit, scope, where)
        for group, members in self.units.groups:
            found = _matching([self.fits[u] for u in members])
            if found < len(members):
                return (f"anti-affinity [{', '.join(group)}] needs {len(members)} nodes{where} with room; "
                        f"only {found} have")
        hosts = sorted({i for fits in self.fits for i in fits})
        vm_count = sum(len(u.names) for u in items)
        if len(hosts) * self.max_per_node < vm_count:
            return (f"max_per_node {self.max_per_node} needs at least {math.ceil(vm_count / self.max_per_node)} "
                    f"nodes{where} with room for {vm_count} VMs; only {len(hosts)} have")
        total = [sum(u.need[dim] for u in items) for dim in range(3)]
        room = [sum(max(_room(scope[i])[dim], 0) for i in hosts) for dim in range(3)]
        short = [dim for dim in range(3) if room[dim] < total[dim]]
        if short:
            return (f"the VE needs {_amounts(total, short)} in total; the nodes{where} with room "
                    f"have {_amounts(room, short)} free")
        least = [min(u.need[dim] for u in items) for dim in range(3)]
        slots = sum(min([self.max_per_node, *(_room(scope[i])[dim] // least[dim] for dim in range(3) if least[dim])])
                    for i in hosts)
        if slots < len(items):
            what = "VMs and affinity groups" if len(items) < vm_count else "VMs"
            each = _amounts(least, [0, 1, 2] if least[2] else [0, 1])
            return f"at most {slots} of the {len(items)} {what} fit on the nodes{where} at once (each needs {each})"
        if self.spread:
            return self._spread_reason()
        return None

    def _spread_reason(self) -> str | None:
        names = self.sites
        found = _matching([[s for s in range(len(names)) if fit >> s & 1] for fit in self.fit_sites])
        if found >= self.spread:
            return None
        with_room = [names[s] for s in range(len(names)) if any(fit >> s & 1 for fit in self.fit_sites)]
        reason = (f"spread over {self.spread} sites needs {self.spread} sites with room; "
                  f"sites with room: {', '.join(with_room)}")
        if len(with_room) >= self.spread:
            reason += f" (only {found} can each take a different VM)"
        return reason

    def _active(self) -> str:
        """The constraints in play, as '(affinity, max_per_node 2)'; '' when there is none."""
        parts = []
        if any(len(u.names) > 1 for u in self.units.items):
            parts.append("affinity")
        if self.units.groups:
            parts.append("anti-affinity")
        if self.max_per_node != math.inf:
            parts.append(f"max_per_node {self.max_per_node}")
        if self.spread:
            parts.append(f"spread over {self.spread} sites")
        return f"({', '.join(parts)})" if parts else ""


def _room(c: Candidate) -> tuple[int, int, int]:
    return c.vcpus, c.memory_mb, c.disk_gb


def _fits(c: Candidate, need: tuple[int, int, int]) -> bool:
    return c.vcpus >= need[0] and c.memory_mb >= need[1] and c.disk_gb >= need[2]


def _bits(positions: Iterable[int]) -> int:
    mask = 0
    for position in positions:
        mask |= 1 << position
    return mask


def _amounts(values: Sequence[int], dims: Sequence[int]) -> str:
    """'4 vCPUs', '4 vCPUs and 8192 MiB memory', '4 vCPUs, 8192 MiB memory and 10 GiB disk'."""
    parts = [f"{values[dim]} {_UNITS[dim]}" for dim in dims]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _no_room(unit: _Unit, scope: Sequence[Candidate], where: str) -> str:
    """Why no node of scope has room for unit on its own."""
    most = [max(_room(c)[dim] for c in scope) for dim in range(3)]
    short = [dim for dim in range(3) if most[dim] < unit.need[dim]]
    if len(unit.names) == 1:
        if short:
            return (f"no node{where} has {_amounts(unit.need, short)} free for {unit.label()}; "
                    f"the most free is {_amounts(most, short)}")
        return f"no node{where} has {_amounts(unit.need, range(3))} free at once for {unit.label()}"
    if short:
        need = _amounts(unit.need, [0, 1, 2] if 2 in short else [0, 1])
        return f"{unit.label()} needs one node{where} with {need} free; the most free is {_amounts(most, short)}"
    return f"{unit.label()} needs one node{where} with {_amounts(unit.need, range(3))} free; none has all at once"


def _matching(edges: Sequence[Sequence[int]]) -> int:
    """The size of a maximum matching of the left vertices (edges[u]: right vertices of u), by Kuhn."""
    owner: dict[int, int] = {}

    def augment(u: int, seen: set[int]) -> bool:
        for right in edges[u]:
            if right not in seen:
                seen.add(right)
                if right not in owner or augment(owner[right], seen):
                    owner[right] = u
                    return True
        return False

    return sum(1 for u in range(len(edges)) if augment(u, set()))


def _elsewhere(candidates: Sequence[Candidate]) -> str:
    sites = list(dict.fromkeys(c.site for c in candidates))
    if not sites:
        return ""
    shown = ", ".join(sites[:_SHOWN_SITES])
    if len(sites) > _SHOWN_SITES:
        shown += f" and {len(sites) - _SHOWN_SITES} more"
    return f" (candidates are in {shown})"
