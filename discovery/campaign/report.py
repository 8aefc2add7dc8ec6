"""A campaign's results folder: `raw.json` (what the runner recorded), `figures.json` (`results.figures`), five
plots and `summary.md`, which a reader opens first.

- `ves.png`: VEs by state over time, and the guests whose web server answers when they were probed, the
  actions marked;
- `latency.png`: each operation's latency when it started (failures marked at the bottom);
- `nodes.png`: nodes answering their /metrics, nodes DVMS saw overloaded, DVMS migrations done;
- `cpu.png`: each node's CPU demand over the capacity DVMS counts (above 1: overloaded);
- `recovery.png`: each VE's recovery time after each fault that hit it (and when it served again, if probed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from discovery.campaign.results import figures

PLOTS = ("ves.png", "latency.png", "nodes.png", "cpu.png", "recovery.png")


def write(raw: dict[str, Any], out: Path) -> dict[str, Any]:
    """Write the results folder `out` from `raw`; returns the figures."""
    out.mkdir(parents=True, exist_ok=True)
    found = figures(raw)
    (out / "raw.json").write_text(json.dumps(raw, indent=1))
    (out / "figures.json").write_text(json.dumps(found, indent=1))
    plot(found, raw["operations"], out)
    (out / "summary.md").write_text(summary(raw, found))
    return found


def plot(found: dict[str, Any], operations: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def marks(ax: Any) -> None:
        for action in found["actions"]:
            ax.axvline(action["started"], color="grey", linestyle=":", linewidth=1)
            ax.annotate(f"{action['kind']} {action['target']}".strip(), (action["started"], 1.0),
                        xycoords=("data", "axes fraction"), rotation=90, va="top", ha="right", fontsize=7)

    fig, ax = plt.subplots(figsize=(9, 4))
    states = sorted({k for row in found["ves"] for k in row if k != "at"})
    for state in states:
        ax.plot([r["at"] for r in found["ves"]], [r.get(state, 0) for r in found["ves"]], label=state)
    if found["serving"]:
        ax.plot([r["at"] for r in found["serving"]], [r["answering"] for r in found["serving"]], "k--",
                label="guests answering (VMs)")
    marks(ax)
    ax.set(xlabel="time (s)", ylabel="VEs", title="VEs by state")
    if states or found["serving"]:
        ax.legend(loc="upper left")
    _save(fig, out / "ves.png")

    fig, ax = plt.subplots(figsize=(9, 4))
    for op, points in _latency_points(found, operations).items():
        ax.scatter([p[0] for p in points], [p[1] for p in points], s=10, label=op)
    marks(ax)
    ax.set(xlabel="operation start (s)", ylabel="latency (s)", title="Operation latency (x at 0: failed)")
    ax.legend(loc="upper left")
    _save(fig, out / "latency.png")

    fig, ax = plt.subplots(figsize=(9, 4))
    for key, label in (("answering", "nodes answering /metrics"), ("overloaded", "overloaded nodes (DVMS)"),
                       ("migrations", "DVMS migrations done")):
        ax.plot([n["at"] for n in found["nodes"]], [n[key] for n in found["nodes"]], label=label)
    marks(ax)
    ax.set(xlabel="time (s)", ylabel="count", title="Nodes")
    ax.legend(loc="upper left")
    _save(fig, out / "nodes.png")

    fig, ax = plt.subplots(figsize=(9, 4))
    for node, points in sorted(found["cpu"].items()):
        ax.plot([p[0] for p in points], [float("nan") if p[1] is None else p[1] for p in points], label=node)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    marks(ax)
    ax.set(xlabel="time (s)", ylabel="demand / capacity", title="CPU demand per node (DVMS; above 1: overloaded)")
    if found["cpu"]:
        ax.legend(loc="upper left")
    _save(fig, out / "cpu.png")

    fig, ax = plt.subplots(figsize=(9, 4))
    hits = [r for r in found["recoveries"] if not r["gone"]]
    labels = [f"{r['ve']}\n{r['action']} {r['target']}" for r in hits]
    ax.bar(range(len(hits)), [r["seconds"] if r["seconds"] is not None else 0 for r in hits],
           color=["tab:blue" if r["seconds"] is not None else "tab:red" for r in hits], label="running elsewhere")
    if any(r["serving_s"] is not None for r in hits):
        ax.scatter(range(len(hits)), [float("nan") if r["serving_s"] is None else r["serving_s"] for r in hits],
                   marker="_", s=200, color="k",
                   label="serving again")
        ax.legend(loc="upper left")
    ax.set_xticks(range(len(hits)), labels, rotation=90, fontsize=6)
    ax.set(ylabel="seconds", title="Recovery after each fault (red: not within the campaign)")
    _save(fig, out / "recovery.png")
    plt.close("all")


def _latency_points(found: dict[str, Any], operations: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """Per operation kind, (start, latency) of each; a failed or unfinished one at latency 0."""
    return {op: [(o["at"], o["seconds"] if o["ok"] else 0.0) for o in operations if o["op"] == op]
            for op in found["operations"]}


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def summary(raw: dict[str, Any], found: dict[str, Any]) -> str:
    """The markdown a reader opens first: what ran, what happened, the figures, the plots."""
    c = raw["campaign"]
    nodes = raw["nodes"]
    lines = [f"# Campaign {c['name']}", "",
             f"{len(nodes)} nodes on {len({n['site'] for n in nodes})} sites, {c['duration']:g} s, sampled every "
             f"{c['sample_every']:g} s.", "", "## Operations", "",
             "| operation | count | ok | failed | unfinished | p50 (s) | p90 (s) | max (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for op, row in found["operations"].items():
        lines.append(f"| {op} | {row['count']} | {row['ok']} | {row['failed']} | {row['unfinished']} | "
                     f"{_num(row['p50_s'])} | {_num(row['p90_s'])} | {_num(row['max_s'])} |")
    lines += ["", "## Actions", "", "| at (s) | action | target | outcome |", "|---|---|---|---|"]
    for action in found["actions"]:
        lines.append(f"| {action['started']:g} | {action['kind']} | {action['target'] or '-'} | "
                     f"{'ok' if action['ok'] else action['error']} |")
    rec = found["recovery"]
    lines += ["", "## Recovery", "",
              f"{rec['count']} VEs recovered after the faults that hit them, p50 {_num(rec['p50_s'])} s, max "
              f"{_num(rec['max_s'])} s (to {c['sample_every']:g} s); {rec['not_recovered']} not within the campaign.",
              *([f"Their guests served again (every VM's web server answering) p50 {_num(rec['serving_p50_s'])} s, "
                 f"max {_num(rec['serving_max_s'])} s after the fault ({rec['serving_count']} VEs)."]
                if found["serving"] else []),
              "", "## Images", "", _pulled(found["image_pulled_bytes"]),
              "", "## Load", "",
              f"At most {found['max_overloaded']} nodes overloaded at once (DVMS's monitor); {found['migrations']:g} "
              "DVMS migrations done.", "", *(f"![{name}]({name})" for name in PLOTS), ""]
    return "\n".join(lines)


def _pulled(pulled: dict[str, float]) -> str:
    if not pulled:
        return "No node reported image pulls."
    moved = {node: value for node, value in pulled.items() if value}
    if not moved:
        return f"No image chunk was pulled ({len(pulled)} nodes reporting): every VM found its image at its host."
    return (f"{sum(moved.values()) / 2**20:.1f} MiB of image chunks pulled from holders, by "
            + ", ".join(f"{node} ({value / 2**20:.1f} MiB)" for node, value in moved.items()) + ".")


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
