"""Sans-IO Vivaldi network coordinates, after HashiCorp Serf's `coordinate` package.

Pure Python (it runs inside every agent): no sockets, clocks or event loop. Units are seconds.
References: [1] Dabek et al., "Vivaldi", SIGCOMM 2004; [2] Ledlie et al., "Network Coordinates in the
Wild", NSDI 2007; [3] Lee et al., "On suitability of Euclidean embedding...", ToN 2010.

Where this differs from Serf, on purpose: heights move as the height vectors of [1] (see `_apply_force`);
the latency filter takes the lower middle of an even window; a zero RTT is refused like any sample outside
(0, 10] s; the error never drops to zero; a reset also clears the adjustment window, whose samples came
from the invalid state.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass
from typing import Any

ZERO_THRESHOLD = 1.0e-6  # seconds: two coordinates closer than this are "on top of each other" (Serf)
ERROR_MIN = 1.0e-6  # a zero error would give the node zero weight: it would never move again
MAX_RTT = 10.0  # seconds: anything longer is a broken measurement, not a latency (Serf)


@dataclass(frozen=True)
class Config:
    """Tuning of the update rule: Serf's DefaultConfig, which meets the PlanetLab-490 target (median relative
    error <= 0.11 after 200 rounds; `discovery sim vivaldi --ablations` measures each ingredient).

    gravity_rho is Serf's too, and like Serf's the pull is (distance / rho)^2 seconds: inert at millisecond
    scale, it only reins in runaway coordinates seconds from the origin. A rho near the map's scale holds
    the centroid but distorts the map (1 s wrecks a 10 ms grid), so no single smaller value is safe.
    """

    dimensionality: int = 8
    error_max: float = 1.5  # initial error of a fresh node, and the cap on error
    ce: float = 0.25  # maximum weight of one sample on the error estimate [1]
    cc: float = 0.25  # maximum fraction of the spring force one sample applies [1]
    adjustment_window: int = 20  # samples in the non-Euclidean adjustment term [3]; 0 disables it
    height_min: float = 10e-6  # seconds; heights model access links [1] and stay positive
    latency_filter: int = 3  # median of the last N RTTs per peer (lower median if even) [2]; 1 disables it
    gravity_rho: float = 150.0  # seconds; pull towards the origin against drift [2]; math.inf disables it
    use_height: bool = True
    fixed_step: float | None = None  # plain Vivaldi (constant delta, no error weighting): the old baseline

    def __post_init__(self) -> None:
        checks = {
            "dimensionality must be >= 1": self.dimensionality >= 1,
            "error_max must be > 0": self.error_max > 0,
            "ce must be in (0, 1]": 0 < self.ce <= 1,
            "cc must be > 0": self.cc > 0,
            "adjustment_window must be >= 0": self.adjustment_window >= 0,
            "height_min must be >= 0": self.height_min >= 0,
            "latency_filter must be >= 1": self.latency_filter >= 1,
            "gravity_rho must be > 0 (math.inf disables gravity)": self.gravity_rho > 0,
            "fixed_step must be > 0": self.fixed_step is None or self.fixed_step > 0,
        }
        for message, ok in checks.items():
            if not ok:
                raise ValueError(f"vivaldi config: {message}")


def _finite(x: object) -> bool:
    return isinstance(x, float | int) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class Coordinate:
    """A node's position: Euclidean `vec`, non-Euclidean `height` and `adjustment` (seconds), and
    `error`, the node's own estimate of its relative error (dimensionless)."""

    vec: tuple[float, ...]
    error: float
    adjustment: float
    height: float

    @classmethod
    def origin(cls, config: Config) -> Coordinate:
        height = config.height_min if config.use_height else 0.0
        return cls((0.0,) * config.dimensionality, config.error_max, 0.0, height)

    def is_valid(self) -> bool:
        """Finite everywhere, non-negative error and height: anything else would poison our distances."""
        try:
            return (
                len(self.vec) >= 1
                and self.error >= 0
                and self.height >= 0
                and all(map(math.isfinite, (*self.vec, self.error, self.adjustment, self.height)))
            )
        except TypeError:
            return False

    def raw_distance_to(self, other: Coordinate) -> float:
        """Vivaldi distance without the adjustment terms."""
        return math.dist(self.vec, other.vec) + self.height + other.height

    def distance_to(self, other: Coordinate) -> float:
        """Estimated RTT in seconds; the adjustments apply only while the sum stays positive (Serf)."""
        dist = self.raw_distance_to(other)
        adjusted = dist + self.adjustment + other.adjustment
        return adjusted if adjusted > 0 else dist

    def to_wire(self) -> list[Any]:
        return [list(self.vec), self.error, self.adjustment, self.height]

    @staticmethod
    def from_wire(data: object, dimensionality: int | None = None) -> Coordinate | None:
        """Decode a peer's coordinate; None for anything malformed, non-finite or of the wrong dimension."""
        if not isinstance(data, list | tuple) or len(data) != 4 or not isinstance(data[0], list | tuple):
            return None
        vec, error, adjustment, height = data
        if not all(_finite(x) for x in (*vec, error, adjustment, height)):
            return None
        if dimensionality is not None and len(vec) != dimensionality:
            return None
        coord = Coordinate(tuple(float(x) for x in vec), float(error), float(adjustment), float(height))
        return coord if coord.is_valid() else None


def estimate(a: Coordinate, b: Coordinate) -> tuple[float, float]:
    """(RTT, error bound) in seconds. The bound is rtt * min(a.error + b.error, 1): each node's error is its
    moving average of |estimate - measured| / measured and a pair's estimate inherits both; the cap keeps
    the bound within the estimate. After the PlanetLab-490 and Seattle-99 campaigns the measured RTT lies
    within the bound for 88% of the pairs."""
    rtt = a.distance_to(b)
    return rtt, rtt * min(a.error + b.error, 1.0)


class Client:
    """One node's Vivaldi state: its coordinate, the adjustment window and per-peer latency filters.

    The state is kept in plain mutable fields (one update runs per RPC in every agent, and 10^5 per
    simulated campaign); `coordinate` publishes it as an immutable `Coordinate`.
    """

    def __init__(self, config: Config = Config(), rng: random.Random | None = None) -> None:
        self.config = config
        self._rng = rng or random.Random()
        self._filters: dict[str, deque[float]] = {}
        self.resets = 0
        self._reset()

    def _reset(self) -> None:
        origin = Coordinate.origin(self.config)
        self._vec, self._error, self._adjustment, self._height = list(origin.vec), origin.error, 0.0, origin.height
        self._adjustment_samples = [0.0] * self.config.adjustment_window
        self._adjustment_index = 0
        self._coord = origin

    @property
    def coordinate(self) -> Coordinate:
        return self._coord

    def set_coordinate(self, c: Coordinate) -> None:
        """Restore a persisted coordinate, so that a restarted agent does not start from the origin."""
        self._check(c)
        self._vec, self._error, self._adjustment, self._height = list(c.vec), c.error, c.adjustment, c.height
        self._coord = c

    def forget(self, node: str) -> None:
        self._filters.pop(node, None)

    def distance_to(self, other: Coordinate) -> float:
        return self._coord.distance_to(other)

    def update(self, node: str, other: Coordinate, rtt: float) -> Coordinate:
        """Fold one RTT sample (seconds) to `node`, whose coordinate is `other`; returns our new coordinate."""
        if not _finite(rtt) or not 0 < rtt <= MAX_RTT:
            raise ValueError(f"vivaldi: RTT sample {rtt!r} s to {node!r} is not in (0, {MAX_RTT:g}] s")
        self._check(other)
        rtt = self._latency_filter(node, float(rtt))
        self._update_vivaldi(other, rtt)
        self._update_adjustment(other, rtt)
        self._update_gravity()
        coord = Coordinate(tuple(self._vec), self._error, self._adjustment, self._height)
        if coord.is_valid():
            self._coord = coord
        else:
            self.resets += 1
            self._reset()
        return self._coord

    def _check(self, c: object) -> None:
        if not isinstance(c, Coordinate) or not c.is_valid():
            raise ValueError(f"vivaldi: invalid coordinate {c!r}")
        if len(c.vec) != self.config.dimensionality:
            raise ValueError(f"vivaldi: coordinate has {len(c.vec)} dimensions, expected {self.config.dimensionality}")

    def _latency_filter(self, node: str, rtt: float) -> float:
        """Median of the last few samples to this peer: rides out one-off spikes (queueing, GC pauses) [2].
        With an even count the lower middle (Serf takes the upper): delays only ever add to an RTT."""
        samples = self._filters.get(node)
        if samples is None:
            samples = self._filters[node] = deque(maxlen=self.config.latency_filter)
        samples.append(rtt)
        return sorted(samples)[(len(samples) - 1) // 2]

    def _raw_distance(self, vec: tuple[float, ...] | list[float], height: float) -> float:
        return math.dist(self._vec, vec) + self._height + height

    def _update_vivaldi(self, other: Coordinate, rtt: float) -> None:
        cfg = self.config
        dist = self._raw_distance(other.vec, other.height)
        adjusted = dist + self._adjustment + other.adjustment
        if adjusted > 0:
            dist = adjusted
        rtt = max(rtt, ZERO_THRESHOLD)
        wrongness = abs(dist - rtt) / rtt
        weight = self._error / max(self._error + other.error, ZERO_THRESHOLD)
        error = cfg.ce * weight * wrongness + self._error * (1.0 - cfg.ce * weight)
        self._error = min(max(error, ERROR_MIN), cfg.error_max)
        delta = cfg.fixed_step if cfg.fixed_step is not None else cfg.cc * weight
        self._apply_force(delta * (rtt - dist), other.vec, other.height)

    def _update_adjustment(self, other: Coordinate, rtt: float) -> None:
        """Half the mean residual over a window: the part of the RTT no Euclidean position explains [3]."""
        window = self.config.adjustment_window
        if window == 0:
            return
        self._adjustment_samples[self._adjustment_index] = rtt - self._raw_distance(other.vec, other.height)
        self._adjustment_index = (self._adjustment_index + 1) % window
        self._adjustment = sum(self._adjustment_samples) / (2.0 * window)

    def _update_gravity(self) -> None:
        """A pull towards the origin growing with the square of the distance, so the map does not drift [2]."""
        origin_height = self.config.height_min if self.config.use_height else 0.0
        dist = math.hypot(*self._vec) + self._height + origin_height
        if dist + self._adjustment > 0:
            dist += self._adjustment
        pull = dist / self.config.gravity_rho
        force = -pull * pull  # not `** 2`: that raises OverflowError where a product gives inf (then a reset)
        self._apply_force(force, (0.0,) * len(self._vec), origin_height)

    def _apply_force(self, force: float, vec: tuple[float, ...], height: float) -> None:
        """Move `force` seconds away from (`vec`, `height`), towards it if negative.

        Height vectors as in [1]: the direction is (x_i - x_j, h_i + h_j) over its norm |x_i - x_j| + h_i + h_j,
        so the modelled distance changes by `force`, shared between position and height. Serf divides the
        height share by |x_i - x_j| alone: the move then overshoots by (h_i + h_j) / |x_i - x_j|, without
        bound as positions meet, which on a hub-and-spoke topology is worse than no height at all.
        """
        diff = [a - b for a, b in zip(self._vec, vec, strict=True)]
        mag = math.hypot(*diff)
        if mag > ZERO_THRESHOLD:
            heights = self._height + height if self.config.use_height else 0.0
            scale = force / (mag + heights)
            self._vec = [a + d * scale for a, d in zip(self._vec, diff, strict=True)]
            if self.config.use_height:
                self._height = max(self._height + heights * scale, self.config.height_min)
            return
        unit = [self._rng.random() - 0.5 for _ in diff]  # on top of each other: push in a random direction
        norm = math.hypot(*unit)
        if norm <= ZERO_THRESHOLD:
            unit, norm = [1.0] + [0.0] * (len(diff) - 1), 1.0
        self._vec = [a + u * force / norm for a, u in zip(self._vec, unit, strict=True)]
