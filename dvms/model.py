"""What DVMS reasons about: nodes and their capacity, VMs and their demand, VEs' placement rules, plans.

Shared by the monitor, the solver, the partition protocol and the simulator, so it holds plain values
only. CPU is counted in percent of one vCPU (a 4-vCPU node has 400; a VM busy at 70 % of one vCPU
demands 70), as VMPlaceS counts it. `dvms/` sits under `discovery/`, so a VE's constraints come here
as `Rules` (built from a `discovery.ve.spec.VESpec` by the layer above), not as the spec itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Node:
    """A node as the scheduler sees it: where it is and what it can hold."""

    name: str
    site: str
    cpu: int  # percent of one vCPU: 100 per vCPU
    memory_mb: int


@dataclass(frozen=True)
class VM:
    """A VM (libvirt domain name `ve:vm`), where it runs, what it reserved and what it demands now."""

    name: str
    ve: str
    node: str
    vcpus: int
    memory_mb: int
    cpu: int  # current demand, percent of one vCPU (at most 100 * vcpus)


@dataclass(frozen=True)
class Rules:
    """A VE's placement rules, by the names of its VMs (`VM.name`): what a plan must keep true."""

    ve: str
    affinity: tuple[frozenset[str], ...] = ()  # each group on one node
    anti_affinity: tuple[frozenset[str], ...] = ()  # each group on pairwise different nodes
    site: str | None = None  # every VM in this site
    same_site: bool = False  # every VM in one site, whichever
    spread_sites: int | None = None  # the VMs cover at least this many sites
    max_per_node: int | None = None  # at most this many of the VE's VMs on one node


@dataclass(frozen=True)
class Migration:
    vm: str
    source: str
    target: str
    memory_mb: int  # what the migration copies: the cost the solver minimises


@dataclass
class Plan:
    """Migrations in an order that never overloads a node on the way (see `dvms.solver`)."""

    migrations: list[Migration] = field(default_factory=list)
    solver: str = ""  # "cp-sat", "greedy" or "" (nothing to do)
    seconds: float = 0.0  # time spent solving

    @property
    def moved_mb(self) -> int:
        return sum(m.memory_mb for m in self.migrations)
