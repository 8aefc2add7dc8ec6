"""Vivaldi campaign: the production `vivaldi.coordinate.Client`, one per node, over a measured RTT matrix.

Methodology of the Vivaldi paper: every node has a fixed random set of measured neighbours and, each
round, takes one sample from one of them, in a shuffled node order: the matrix value in its own direction,
raw[i, j], no jitter. A node learns only from its own neighbours; accuracy is judged on every measured pair
against the symmetrised matrix. Only the evaluation is vectorized: the updates are the agents' own code.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import random
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from vivaldi.coordinate import MAX_RTT, Client, Config, Coordinate

BASELINE_STEP = 0.25  # best constant delta of {0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5} on PlanetLab: a fair baseline
BASELINE = Config(dimensionality=2, use_height=False, fixed_step=BASELINE_STEP, adjustment_window=0, latency_filter=1,
                  gravity_rho=math.inf)
# Each removes one ingredient from the default Config; the last is the Vivaldi paper's rule as published.
ABLATIONS: dict[str, dict[str, Any]] = {
    "no_height": {"use_height": False},
    "no_adjustment": {"adjustment_window": 0},
    "no_filter": {"latency_filter": 1},
    "no_gravity": {"gravity_rho": math.inf},
    "paper_rule_2d_height": {"dimensionality": 2, "adjustment_window": 0, "latency_filter": 1, "gravity_rho": math.inf},
}


UNITS = {"ms": 1000.0, "s": 1.0}
"""The units a matrix file may be in, and how many of each make a second."""
PLAUSIBLE_MEDIAN = {"ms": (0.01, math.inf), "s": (0.0, 10.0)}
"""Where a matrix's median RTT may lie in each unit: under 10 µs is no network, over 10 s Vivaldi refuses."""


def default_unit(path: str | Path, m: np.ndarray) -> str:
    """The data README's rule: PlanetLab files are in milliseconds, Seattle files in seconds; a file that
    names neither is judged by its magnitude (NaN where not measured): a median above 10 cannot be seconds."""
    name = Path(path).name.lower()
    if "planetlab" in name:
        return "ms"
    if "seattle" in name:
        return "s"
    return "ms" if np.nanmedian(m) > PLAUSIBLE_MEDIAN["s"][1] else "s"


def unit_warning(m: np.ndarray, unit: str) -> str | None:
    """One line saying that the matrix's median (NaN where not measured) is implausible in `unit`, or None."""
    median = float(np.nanmedian(m))
    low, high = PLAUSIBLE_MEDIAN[unit]
    if low <= median <= high:
        return None
    other = next(u for u in UNITS if u != unit)
    bound = f"below {low:g}" if median < low else f"above {high:g}"
    return f"median RTT {median:g} {unit} is {bound} {unit}; is the file in {other}? (--unit {other})"


def load_matrix(path: str | Path, unit: str | None = None) -> np.ndarray:
    """RTT matrix in seconds, NaN where not measured (diagonal, zeros off the diagonal, non-finite).

    `unit` ("ms" or "s") is the file's; None takes the data README's rule (`default_unit`). A median
    that `unit` makes implausible is warned about on stderr in one line, and the file read as told.
    Gzip is recognised by the `.gz` suffix.
    """
    return _load(path, unit)[0]


def _load(path: str | Path, unit: str | None) -> tuple[np.ndarray, str]:
    """`load_matrix`, and the unit it read the file in."""
    if unit is not None and unit not in UNITS:
        raise ValueError(f"unit must be one of {', '.join(UNITS)}, not {unit!r}")
    path = Path(path)
    with gzip.open(path, "rt") if path.suffix == ".gz" else open(path) as f:
        m = np.loadtxt(f, dtype=float, ndmin=2)
    if m.shape[0] != m.shape[1]:
        raise ValueError(f"RTT matrix is {m.shape[0]}x{m.shape[1]}, not square")
    if m.shape[0] < 3:
        raise ValueError(f"RTT matrix has {m.shape[0]} nodes; an embedding needs at least 3")
    m[~np.isfinite(m) | (m <= 0)] = np.nan
    np.fill_diagonal(m, np.nan)
    if np.isnan(m).all():
        raise ValueError("RTT matrix has no measured pair")
    unit = unit or default_unit(path, m)
    warning = unit_warning(m, unit)
    if warning:
        print(f"warning: {path.name}: {warning}", file=sys.stderr)
    return m / UNITS[unit], unit


def symmetrise(m: np.ndarray) -> np.ndarray:
    """One RTT per pair for the evaluation: the mean of the measured directions (an RTT is a round trip,
    so the Seattle asymmetry is measurement noise); NaN if neither direction was measured."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pairs stay NaN
        return np.nanmean(np.stack([m, m.T]), axis=0)


def estimates(coords: list[Coordinate]) -> np.ndarray:
    """All-pairs `Coordinate.distance_to`, vectorized (same formula; the unit tests check they agree)."""
    x = np.array([c.vec for c in coords])
    h = np.array([c.height for c in coords])
    a = np.array([c.adjustment for c in coords])
    sq = (x * x).sum(1)
    d = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0)) + h[:, None] + h[None, :]
    adjusted = d + a[:, None] + a[None, :]
    return np.where(adjusted > 0, adjusted, d)


def _pairs(meas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices and RTTs of the measured pairs i < j."""
    n = len(meas)
    rows, cols = np.triu_indices(n, 1)
    keep = ~np.isnan(meas[rows, cols])
    return np.ravel_multi_index((rows[keep], cols[keep]), (n, n)), meas[rows[keep], cols[keep]]


def run(matrix: str | Path | np.ndarray, rounds: int = 200, neighbours: int = 32, seed: int = 1,
        config: Config | None = None, unit: str | None = None) -> dict:
    """One simulation on a matrix file (in `unit`, see `load_matrix`) or on a matrix `load_matrix` returned.
    Relative error |est - meas| / meas over all measured pairs i < j of the symmetrised matrix;
    `convergence` holds its median after every round; `coordinates` are wire-format coordinates."""
    raw = matrix if isinstance(matrix, np.ndarray) else load_matrix(matrix, unit)
    return _simulate(raw, rounds, neighbours, seed, config or Config(), trace=True)


def _simulate(raw: np.ndarray, rounds: int, neighbours: int, seed: int, config: Config, trace: bool) -> dict:
    """`run`; without `trace` the per-round evaluation (most of the numpy time) is skipped: ablations."""
    meas = symmetrise(raw)
    n = len(raw)
    rng = random.Random(seed)
    peers = []
    for i in range(n):
        usable = np.flatnonzero(raw[i] <= MAX_RTT).tolist()  # measured, and a sample the client accepts
        peers.append(rng.sample(usable, min(neighbours, len(usable))))
    clients = [Client(config, random.Random(rng.random())) for _ in range(n)]
    flat, truth = _pairs(meas)

    def relative_errors() -> np.ndarray:
        return np.abs(np.take(estimates([c.coordinate for c in clients]), flat) - truth) / truth

    order = [i for i in range(n) if peers[i]]
    convergence = []
    for _ in range(rounds):
        rng.shuffle(order)
        for i in order:
            j = rng.choice(peers[i])
            clients[i].update(str(j), clients[j].coordinate, float(raw[i, j]))
        if trace:
            convergence.append(float(np.median(relative_errors())))
    rel = relative_errors()
    flat_pairs = np.full(n * n, np.nan)
    flat_pairs[flat] = rel
    per_pair = flat_pairs.reshape(n, n)
    per_pair = np.fmin(per_pair, per_pair.T)  # both halves: fmin ignores the NaN side
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a node without any measured pair
        per_node = np.nanmedian(per_pair, axis=1)
    return {
        "nodes": n,
        "pairs": int(len(rel)),
        "rounds": rounds,
        "neighbours": neighbours,
        "seed": seed,
        "median_relative_error": float(np.median(rel)),
        "p90_relative_error": float(np.percentile(rel, 90)),
        "p99_relative_error": float(np.percentile(rel, 99)),
        "convergence": convergence,
        "coordinates": [c.coordinate.to_wire() for c in clients],
        "per_node_error": [None if math.isnan(e) else float(e) for e in per_node],
        "resets": sum(c.resets for c in clients),
    }


def _best_detours(m: np.ndarray) -> np.ndarray:
    """min over k of m[i, k] + m[k, j]: the best one-hop detour of every pair (unmeasured sides excluded)."""
    filled = np.where(np.isnan(m), np.inf, m)
    return np.array([np.min(filled[i][:, None] + filled, axis=0) for i in range(len(m))])


def triangle_violations(matrix: np.ndarray, samples: int = 200_000, seed: int = 1) -> dict:
    """How far the matrix is from any metric space, i.e. the error floor of every embedding.

    Sampled triples (seeded, distinct nodes, all three sides measured): share where the longest side
    exceeds the sum of the other two, and the median of longest / (sum of the others) among those.
    All pairs: share whose RTT exceeds the best one-hop detour through a third node, and the median
    of RTT / detour among those.
    """
    m = symmetrise(matrix)
    n = len(m)
    rng = np.random.default_rng(seed)
    t = rng.integers(0, n, size=(samples, 3))
    t = t[(t[:, 0] != t[:, 1]) & (t[:, 1] != t[:, 2]) & (t[:, 0] != t[:, 2])]
    sides = np.stack([m[t[:, 0], t[:, 1]], m[t[:, 1], t[:, 2]], m[t[:, 0], t[:, 2]]], axis=1)
    sides = np.sort(sides[~np.isnan(sides).any(axis=1)], axis=1)
    ratio = sides[:, 2] / (sides[:, 0] + sides[:, 1])
    violating = ratio > 1
    flat, direct = _pairs(m)
    detour = np.take(_best_detours(m), flat)
    shorter = direct > detour
    return {
        "triples": int(len(ratio)),
        "violating_share": float(violating.mean()),
        "median_violation_ratio": float(np.median(ratio[violating])) if violating.any() else 1.0,
        "pairs": int(len(direct)),
        "pairs_with_shorter_detour_share": float(shorter.mean()),
        "median_rtt_over_detour": float(np.median(direct[shorter] / detour[shorter])) if shorter.any() else 1.0,
    }


def _error_breakdown(matrix: np.ndarray, result: dict) -> dict:
    """Where a run's error is: share of pairs and their median relative error, by how much the RTT
    exceeds the best one-hop detour (above 1: a triangle violation) and by RTT band."""
    m = symmetrise(matrix)
    decoded = [Coordinate.from_wire(c) for c in result["coordinates"]]
    coords = [c for c in decoded if c is not None]
    if len(coords) < len(decoded):
        raise ValueError("run result holds an invalid coordinate")
    flat, rtt = _pairs(m)
    rel = np.abs(np.take(estimates(coords), flat) - rtt) / rtt
    over_detour = rtt / np.take(_best_detours(m), flat)

    def bands(values: np.ndarray, edges: list[float], unit: str) -> dict:
        out = {}
        for lo, hi in zip([0.0, *edges], [*edges, math.inf], strict=True):
            inside = (values > lo) & (values <= hi)
            name = f"<={hi:g}{unit}" if lo == 0 else f">{lo:g}{unit}" if hi == math.inf else f"{lo:g}-{hi:g}{unit}"
            out[name] = {"share": float(inside.mean()),
                         "median_error": float(np.median(rel[inside])) if inside.any() else None}
        return out

    return {"rtt_over_best_detour": bands(over_detour, [1.0, 1.5], ""),
            "rtt": bands(rtt * 1000, [25.0, 50.0, 100.0, 200.0], "ms")}


def _summary(result: dict) -> dict:
    keys = ("median_relative_error", "p90_relative_error", "p99_relative_error", "resets")
    return {k: result[k] for k in keys}


def campaign(matrix_path: str, rounds: int = 200, neighbours: int = 32, seed: int = 1, ablations: bool = False,
             unit: str | None = None) -> dict:
    """Discovery's Vivaldi (default Config) against plain 2-D constant-step Vivaldi, on one matrix file
    (read once, in `unit`: see `load_matrix`)."""
    matrix, unit = _load(matrix_path, unit)
    discovery = run(matrix, rounds, neighbours, seed)
    out = {
        "matrix": str(matrix_path),
        "unit": unit,
        "config": dataclasses.asdict(Config()),
        "discovery": discovery,
        "baseline_2d_fixed_step": run(matrix, rounds, neighbours, seed, BASELINE),
        "triangle_violations": triangle_violations(matrix, seed=seed) | {
            "discovery_error_by_pair": _error_breakdown(matrix, discovery)},
    }
    if ablations:
        out["ablations"] = {
            name: _summary(_simulate(matrix, rounds, neighbours, seed, dataclasses.replace(Config(), **kw), False))
            for name, kw in ABLATIONS.items()
        }
    return out


def summary(result: dict) -> dict:
    """A campaign for printing: without the bulky per-node lists, plus `runs`, every run's summary numbers."""
    bulky = ("coordinates", "per_node_error")
    out = {k: ({kk: vv for kk, vv in v.items() if kk not in bulky} if k in ("discovery", "baseline_2d_fixed_step")
               else v) for k, v in result.items()}
    out["runs"] = {name: _summary(result[name]) for name in ("discovery", "baseline_2d_fixed_step")}
    out["runs"] |= result.get("ablations", {})
    return out


def plot(result: dict, path: str) -> None:
    """Left: the map (PCA of the vectors) coloured by each node's median error. Right: convergence curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    disc, base = result["discovery"], result["baseline_2d_fixed_step"]
    x = np.array([c[0] for c in disc["coordinates"]]) * 1000
    x -= x.mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    xy = x @ vt[:2].T if len(vt) >= 2 else np.column_stack([x[:, 0], np.zeros(len(x))])
    err = np.array([np.nan if e is None else e for e in disc["per_node_error"]])
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.5))
    sc = left.scatter(xy[:, 0], xy[:, 1], c=err, cmap="viridis_r", s=14, vmin=0, vmax=np.nanpercentile(err, 95))
    fig.colorbar(sc, ax=left, label="node's median relative error")
    left.set(title=f"{Path(result['matrix']).name}: Vivaldi map (PCA of {x.shape[1]}-D vectors)",
             xlabel="PC1 (ms)", ylabel="PC2 (ms)")
    left.set_aspect("equal", adjustable="datalim")
    rounds = np.arange(1, len(disc["convergence"]) + 1)
    right.plot(rounds, disc["convergence"], label=f"discovery (median {disc['median_relative_error']:.3f})")
    right.plot(rounds, base["convergence"], label=f"2-D constant step (median {base['median_relative_error']:.3f})")
    right.set(yscale="log", xlabel="round (one sample per node)", ylabel="median relative error (all pairs)",
              title=f"convergence, {disc['neighbours']} neighbours per node")
    right.grid(True, which="both", alpha=0.3)
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
