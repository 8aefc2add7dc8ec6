"""Is a node overloaded, underloaded or normal? Sans-IO detector with hysteresis, and libvirt stats helpers.

A node's load is its demand over its capacity in its tighter dimension: max(cpu / node.cpu,
memory / node.memory_mb). Entering a state and leaving it use different thresholds, and a state may
have to hold for a dwell time before it counts, so a node whose load wanders around a threshold emits
one event, not one per sample: each event starts a partition (DVMS), and a partition per sample would
be a storm of them with VMs ping-ponging between nodes. An overload clears when the dimensions that
went over come back below `overload_clear` (memory reserved at 95 % does not hold a CPU overload that
is over).

    NORMAL    -> OVERLOAD   load > overload, held for overload_dwell (0: at once; an overload hurts now)
    OVERLOAD  -> NORMAL     load < overload_clear
    NORMAL    -> UNDERLOAD  load < underload, held for underload_dwell (a consolidation can wait)
    UNDERLOAD -> NORMAL     load >= underload_clear
    UNDERLOAD -> OVERLOAD   as from NORMAL (a spike does not wait for the underload to clear first)
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from dvms.model import VM, Node

_KIB_PER_MB = 1024


class Load(enum.Enum):
    NORMAL = "normal"
    OVERLOAD = "overload"
    UNDERLOAD = "underload"


@dataclass(frozen=True)
class Thresholds:
    """Fractions of capacity, and seconds. The defaults: overload is demand above capacity, cleared 10 %
    below it (the margin); underload below 20 % for a minute, cleared at 30 %."""

    overload: float = 1.0
    overload_clear: float = 0.9
    underload: float = 0.2  # 0 disables underload
    underload_clear: float = 0.3
    overload_dwell: float = 0.0
    underload_dwell: float = 60.0

    def __post_init__(self) -> None:
        checks = {
            "need 0 <= underload <= underload_clear <= overload_clear <= overload":
                0 <= self.underload <= self.underload_clear <= self.overload_clear <= self.overload,
            "overload must be > 0": self.overload > 0,
            "dwell times must be >= 0": self.overload_dwell >= 0 and self.underload_dwell >= 0,
        }
        for message, ok in checks.items():
            if not ok:
                raise ValueError(f"monitor thresholds: {message}")


@dataclass(frozen=True)
class Transition:
    """The node went from `before` to `after` at `time`, with this demand."""

    time: float
    node: str
    before: Load
    after: Load
    cpu: float
    memory_mb: float


class Monitor:
    """One node's state, fed its total demand over time (`observe`); emits a `Transition` on each change."""

    def __init__(self, node: Node, thresholds: Thresholds | None = None) -> None:
        if node.cpu <= 0 or node.memory_mb <= 0:
            raise ValueError(f"monitor: node {node.name} has no capacity")
        self.node = node
        self.thresholds = thresholds or Thresholds()
        self.state = Load.NORMAL
        self.load = 0.0  # of the last sample
        self._time = -math.inf
        self._over_since: float | None = None  # start of the current run of samples above `overload`
        self._under_since: float | None = None  # same, below `underload`
        self._hot: set[str] = set()  # dimensions that went over `overload` in the current overload

    def observe(self, time: float, cpu: float, memory_mb: float) -> Transition | None:
        """Takes the node's total demand at `time` (non-decreasing); returns the transition it causes, if any."""
        if time < self._time:
            raise ValueError(f"monitor: sample at {time} comes after one at {self._time}")
        self._time = time
        th = self.thresholds
        ratios = {"cpu": cpu / self.node.cpu, "memory": memory_mb / self.node.memory_mb}
        self.load = max(ratios.values())
        over = {dim for dim, ratio in ratios.items() if ratio > th.overload}
        self._over_since = (time if self._over_since is None else self._over_since) if over else None
        under = self.load < th.underload
        self._under_since = (time if self._under_since is None else self._under_since) if under else None
        after = self.state
        if self.state is Load.OVERLOAD:
            self._hot |= over
        if self._over_since is not None and time - self._over_since >= th.overload_dwell:
            after = Load.OVERLOAD
            if self.state is not Load.OVERLOAD:
                self._hot = over
        elif self.state is Load.OVERLOAD:  # per dimension: full memory does not hold a CPU overload that cleared
            after = Load.NORMAL if all(ratios[dim] < th.overload_clear for dim in self._hot) else Load.OVERLOAD
        elif self.state is Load.UNDERLOAD:
            after = Load.NORMAL if self.load >= th.underload_clear else Load.UNDERLOAD
        elif self._under_since is not None and time - self._under_since >= th.underload_dwell:
            after = Load.UNDERLOAD
        if after is self.state:
            return None
        before, self.state = self.state, after
        return Transition(time, self.node.name, before, after, cpu, memory_mb)

    def plan_node(self) -> Node:
        """The node as a plan must leave it. While overloaded, the dimensions that went over must come below
        `overload_clear`, or the monitor stays in OVERLOAD and asks again (a plan that fills the node to
        exactly 100 % clears nothing); otherwise the node must only stay within its capacity."""
        if self.state is not Load.OVERLOAD:
            return self.node
        clear = self.thresholds.overload_clear
        cpu, memory_mb = self.node.cpu, self.node.memory_mb
        if "cpu" in self._hot:
            cpu = math.ceil(cpu * clear) - 1
        if "memory" in self._hot:
            memory_mb = math.ceil(memory_mb * clear) - 1
        return replace(self.node, cpu=cpu, memory_mb=memory_mb)

    def observe_vms(self, time: float, vms: Iterable[VM]) -> Transition | None:
        """`observe` with the demand of the VMs in vms that run on this node."""
        cpu, memory_mb = demand(vms, self.node.name)
        return self.observe(time, cpu, memory_mb)


def demand(vms: Iterable[VM], node: str) -> tuple[int, int]:
    """(CPU, memory) that the VMs running on node demand."""
    here = [vm for vm in vms if vm.node == node]
    return sum(vm.cpu for vm in here), sum(vm.memory_mb for vm in here)


def cpu_demand(cpu_ns_before: int, cpu_ns_after: int, seconds_before: float, seconds_after: float,
               vcpus: int) -> int | None:
    """A VM's CPU demand, percent of one vCPU, between two samples of its CPU time and of a wall clock.

    cpu_ns is libvirt's `cpu.time` (virConnectGetAllDomainStats, all vCPUs, nanoseconds) or the cpuTime
    of virDomainGetInfo; seconds come from a monotonic clock. Clipped to [0, 100 * vcpus] (the counter
    includes emulator threads, which can add a little). None when the counter went back: the domain was
    restarted or migrated in between, and the interval measures nothing.
    """
    wall = seconds_after - seconds_before
    if not wall > 0:
        raise ValueError(f"cpu_demand: samples {seconds_before} and {seconds_after} are not in time order")
    used = cpu_ns_after - cpu_ns_before
    if used < 0:
        return None
    return min(round(100 * used / (wall * 1e9)), 100 * vcpus)


def memory_demand_mb(stats: Mapping[str, int], reserved_mb: int) -> int:
    """A VM's memory demand, MB, from libvirt's `balloon.*` domain stats (KiB), at most what it reserved.

    What the guest uses (available - unused) when its balloon driver reports it; else what QEMU holds
    resident (rss, which counts pages the guest touched once and freed since); else the reservation.
    """
    if "balloon.available" in stats and "balloon.unused" in stats:
        kib = stats["balloon.available"] - stats["balloon.unused"]
    elif "balloon.rss" in stats:
        kib = stats["balloon.rss"]
    else:
        return reserved_mb
    return max(0, min(math.ceil(kib / _KIB_PER_MB), reserved_mb))

