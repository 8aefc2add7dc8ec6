"""The VMPlaceS load injector: every VM changes its CPU demand at the events of a Poisson process.

Sans-IO, so the simulator (virtual clock) and the test driver of an agent (real clock) run the same code:
the caller says how far time has gone (`next_events(until)`) and applies what comes back.

Each VM has its own stream, a function of (seed, VM name) only: its k-th change comes at
start + E_1 + ... + E_k with E_i ~ Exp(rate), to a demand drawn from N(mean, std) percent of one vCPU,
clipped to [0, 100 * vcpus] and rounded (VMPlaceS clips too). So the events do not depend on how the
caller slices time, on which other VMs exist, nor on when a VM is added: `add(vm, now)` replays the VM's
stream from `start`, which lets whichever agent hosts a VM after a migration carry on its trajectory.

RNG: one `random.Random` per VM, seeded with the string "seed:name" and read only through `random()`.
Python guarantees that pair (string seeding, `random()`) gives the same sequence across versions, while
its `gauss`/`expovariate` and numpy's `Generator` distributions may change between releases; the draws
are shaped here by inverse transform (-log1p(-u) / rate, `NormalDist.inv_cdf`). It is also ~2.5x faster
than numpy per scalar draw, which is how events are drawn. Cost: about 2.9 KB of state per VM.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from statistics import NormalDist

from dvms.model import VM

MEAN = 70.0  # percent of one vCPU (VMPlaceS)
STD = 30.0
_U_MIN = 2.0**-60  # inv_cdf needs 0 < u: random() may return 0.0


@dataclass(frozen=True, order=True)
class LoadChange:
    """VM `vm` demands `cpu` (percent of one vCPU) from `time` on."""

    time: float
    vm: str
    cpu: int


class _Stream:
    """One VM's changes, drawn lazily in the only order that exists: interval, then demand."""

    __slots__ = ("rng", "ceiling", "time", "cpu")

    def __init__(self, seed: int, vm: VM, start: float) -> None:
        self.rng = random.Random(f"{seed}:{vm.name}")
        self.ceiling = 100 * vm.vcpus
        self.time = start  # of the last change drawn
        self.cpu = vm.cpu  # demand until the first change

    def advance(self, rate: float, normal: NormalDist) -> None:
        self.time += -math.log1p(-self.rng.random()) / rate
        demand = normal.inv_cdf(max(self.rng.random(), _U_MIN))
        self.cpu = round(min(max(demand, 0.0), self.ceiling))


class Injector:
    """Load changes of a set of VMs, in (time, VM name) order, from `start` on.

    `rate` is λ, the changes per VM per second (0: none). The VMs' current demand (`load`) is their
    `VM.cpu` until their first change.
    """

    def __init__(self, vms: Iterable[VM], rate: float, *, seed: int = 0, mean: float = MEAN, std: float = STD,
                 start: float = 0.0) -> None:
        if not (rate >= 0 and math.isfinite(rate)):
            raise ValueError(f"injector: rate must be finite and >= 0, not {rate}")
        if not std > 0:
            raise ValueError(f"injector: std must be > 0, not {std}")
        self.rate = rate
        self.seed = seed
        self.start = start
        self._normal = NormalDist(mean, std)
        self._streams: dict[str, _Stream] = {}
        self._heap: list[tuple[float, str, _Stream]] = []  # the next change of each VM, drawn ahead
        self._now = start  # every change up to here has been returned
        for vm in vms:
            self.add(vm, start)

    def add(self, vm: VM, now: float) -> int:
        """Follows vm from now on, on its own stream (replayed from `start`); returns its demand at now."""
        if vm.name in self._streams:
            raise ValueError(f"injector: {vm.name} is already followed")
        if now < self._now:
            raise ValueError(f"injector: cannot add {vm.name} at {now}, events up to {self._now} are out")
        stream = _Stream(self.seed, vm, self.start)
        self._streams[vm.name] = stream
        if self.rate == 0:
            return stream.cpu
        cpu = stream.cpu
        stream.advance(self.rate, self._normal)
        while stream.time <= now:  # changes before now happened before we followed it: only the last counts
            cpu = stream.cpu
            stream.advance(self.rate, self._normal)
        heapq.heappush(self._heap, (stream.time, vm.name, stream))
        return cpu

    def remove(self, name: str) -> None:
        """Stops following a VM (its pending change is dropped lazily)."""
        del self._streams[name]

    def next_time(self) -> float | None:
        """When the next change comes (None: never), so a virtual clock can jump there."""
        self._drop_removed()
        return self._heap[0][0] if self._heap else None

    def next_events(self, until: float) -> list[LoadChange]:
        """The changes in (previous until, until], in (time, VM) order; each is returned once."""
        out = []
        while (t := self.next_time()) is not None and t <= until:
            _, name, stream = heapq.heappop(self._heap)
            out.append(LoadChange(t, name, stream.cpu))
            stream.advance(self.rate, self._normal)
            heapq.heappush(self._heap, (stream.time, name, stream))
        self._now = max(self._now, until)
        return out

    def __iter__(self) -> Iterator[LoadChange]:
        """Every change from here on, for ever (or none with rate 0)."""
        while (t := self.next_time()) is not None:
            yield from self.next_events(t)

    def _drop_removed(self) -> None:
        while self._heap and self._streams.get(self._heap[0][1]) is not self._heap[0][2]:
            heapq.heappop(self._heap)
