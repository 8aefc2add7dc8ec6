"""Figures the benchmark scripts share: percentiles in milliseconds and an agent's resident memory."""

from __future__ import annotations

import statistics
from pathlib import Path


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def summary_ms(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    if not ms:
        return {}
    return {"p50": round(percentile(ms, 50), 2), "p99": round(percentile(ms, 99), 2),
            "mean": round(statistics.fmean(ms), 2), "max": round(max(ms), 2)}


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0
