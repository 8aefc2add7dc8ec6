"""DVMS vs the centralized scheduler as the cluster grows: a table and a plot from `discovery sim dvms --json` runs.

The runs are the expensive part (an hour of simulated time at 5,000 nodes takes tens of minutes), so they are
made by the campaign command, one JSON file per size, and this script only lines them up:

    discovery sim dvms --nodes 1000 --duration 3600 --rate 0.0033333 --scheduler both --json > runs/1000.json
    python benchmarks/dvms_scale.py runs/*.json --plot docs/dvms-scale.png

Prints one JSON row per (nodes, run): mean and p90 solve time, overload node·seconds (total and per node),
migrations and their inter-site share, mean partition size. The plot: mean solve time against the number of
nodes (log-log) and overload node·seconds per node, one line per run: DVMS by route, centralized by period.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def rows(paths: list[Path]) -> list[dict]:
    """One row per run in the files (a file holds one run, or a dict of runs by name)."""
    out = []
    for path in paths:
        data = json.loads(path.read_text())
        for r in [data] if "scheduler" in data else data.values():
            c = r["config"]
            name = f"dvms ({c['route']})" if r["scheduler"] == "dvms" else f"centralized (every {c['period']:g} s)"
            out.append({
                "nodes": c["nodes"], "vms": c["vms"], "run": name, "duration": c["duration"], "rate": c["rate"],
                "solves": r["solves"], "solve_mean_s": r["solve_seconds"].get("mean"),
                "solve_p90_s": r["solve_seconds"].get("p90"), "overload_node_s": r["overload_node_seconds"],
                "overload_s_per_node": round(r["overload_node_seconds"] / c["nodes"], 3),
                "migrations": r["migrations"], "inter_site_share": r["inter_site_share"],
                "mean_partition": r.get("partition_sizes", {}).get("mean"),
                "check_failures": len(r["check_failures"]), "wall_s": r["wall_seconds"],
            })
    return sorted(out, key=lambda row: (row["run"], row["nodes"]))


def plot(table: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (solve, overload) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in sorted({row["run"] for row in table}):
        mine = [row for row in table if row["run"] == name and row["solve_mean_s"] is not None]
        sizes = [row["nodes"] for row in mine]
        solve.plot(sizes, [row["solve_mean_s"] for row in mine], marker="o", label=name)
        overload.plot(sizes, [row["overload_s_per_node"] for row in mine], marker="o", label=name)
    solve.set(xscale="log", yscale="log", xlabel="nodes", ylabel="mean time to solve an event (s)")
    overload.set(xscale="log", xlabel="nodes", ylabel="overload per node (s, over the run)")
    for ax in (solve, overload):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="`discovery sim dvms --json` outputs")
    parser.add_argument("--plot", help="write the solve-time and overload curves to this PNG")
    args = parser.parse_args()
    try:
        table = rows(args.results)
    except (OSError, ValueError, KeyError) as err:
        sys.exit(f"dvms_scale: {err}")
    for row in table:
        print(json.dumps(row))
    if args.plot:
        plot(table, args.plot)


if __name__ == "__main__":
    main()
