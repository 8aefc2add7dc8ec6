"""How fast the `discovery` command starts: `--help`, and `ve list` against a running cluster, as JSON.

    python benchmarks/cli_start.py [--exe PATH] [--runs 20] [--config client.toml]

Each run is a fresh process, timed by wall clock and by the CPU it used (user + system, from the
kernel's accounting of children), so that a loaded machine shows in the wall time but not much in the
CPU time. `--exe` compares another build (e.g. an older checkout's `.venv/bin/discovery`). Without
`--config`, a 2-node local cluster is started for `ve list` and stopped afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def measure(argv: list[str], runs: int, env: dict[str, str]) -> dict[str, float]:
    samples = [timed(argv, env) for _ in range(runs)]
    return {"wall_ms_p50": round(statistics.median(w for w, _ in samples) * 1000, 1),
            "cpu_ms_p50": round(statistics.median(c for _, c in samples) * 1000, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exe", default=str(Path(sys.executable).parent / "discovery"))
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--config", help="client.toml of a running cluster (default: start one)")
    args = parser.parse_args()
    env = dict(os.environ)
    result = {"exe": args.exe, "runs": args.runs, "help": measure([args.exe, "--help"], args.runs, env)}
    with tempfile.TemporaryDirectory() as tmp:
        config = args.config
        if config is None:
            env["DISCOVERY_HOME"] = f"{tmp}/home"
            subprocess.run([sys.executable, "-m", "discovery", "cluster", "up", "--dir", f"{tmp}/c", "--nodes", "2",
                            "--sites", "1"], check=True, capture_output=True, env=env)
            config = f"{tmp}/c/client.toml"
        try:
            result["ve_list"] = measure([args.exe, "--config", config, "ve", "list"], args.runs, env)
        finally:
            if args.config is None:
                subprocess.run([sys.executable, "-m", "discovery", "cluster", "down", "--dir", f"{tmp}/c"],
                               capture_output=True, env=env)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
