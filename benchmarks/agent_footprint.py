"""What an idle agent costs its host: resident memory and CPU, on a local cluster that does nothing; JSON out.

    python benchmarks/agent_footprint.py --nodes 12 --sites 4 [--seconds 60] [--settle 20]

The cluster (test driver, emulated WAN between sites, `discovery cluster up`) is left to settle after its
members agree (`--settle`: first coordinates, ring and DHT repair passes), then each agent's CPU time (utime +
stime in /proc/PID/stat) is counted over `--seconds` and its memory read at the end: VmRSS, with its anonymous
part (RssAnon: the heap, Python's objects; what only the process can give back) and its file-backed part
(RssFile: the mapped code of Python, the libraries and extension modules, which the kernel may drop and read
again, and which the agents of one machine share), and Pss (the shared pages divided among the processes that
map them: what one more agent costs the machine). Idle CPU is that time over the window, in percent of
one core. What "idle" keeps doing is the agents' own upkeep (gossip probes, Vivaldi samples, Chord
stabilization, DHT anti-entropy, DVMS's monitor). Each agent's `/metrics` is scraped at both ends of the window:
the requests it served meanwhile, per method and second (mean over the agents: the upkeep's RPCs), and, at the
end, its size and latency, so the exporter's cost shows too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from harness import local_cluster  # benchmarks/harness.py, beside this script

TICKS = os.sysconf("SC_CLK_TCK")
SERVED = re.compile(r'^discovery_rpc_server_duration_seconds_count\{method="([^"]+)"\} (\S+)$', re.MULTILINE)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime: fields 14 and 15 of proc(5)


def memory_mib(pid: int) -> dict[str, float]:
    """The process's resident memory (VmRSS), its anonymous and file-backed parts, and its proportional share
    (Pss: pages shared with the other agents, the libraries' code, divided among them), in MiB."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    pss = next(int(line.split()[1]) for line in rollup if line.startswith("Pss:"))
    return {"rss": int(status["VmRSS"].split()[0]) / 1024, "anon": int(status["RssAnon"].split()[0]) / 1024,
            "file": int(status["RssFile"].split()[0]) / 1024, "pss": pss / 1024}


def scrape(address: str) -> tuple[bytes, float]:
    """One `/metrics` answer at `address` (host:port) and the seconds it took."""
    start = time.perf_counter()
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as answer:
        body = answer.read()
    return body, time.perf_counter() - start


def served(body: bytes) -> dict[str, float]:
    """Requests served so far, by method, as a `/metrics` answer counts them."""
    return {method: float(count) for method, count in SERVED.findall(body.decode())}


def measure(state: dict[str, Any], seconds: float) -> dict[str, Any]:
    pids = [n["pid"] for n in state["nodes"]]
    exporters = [n["metrics"] for n in state["nodes"] if n.get("metrics")]
    counted = [served(scrape(address)[0]) for address in exporters]
    before = {p: cpu_seconds(p) for p in pids}
    start = time.monotonic()
    time.sleep(seconds)  # the measurement window itself, not a wait for a condition
    elapsed = time.monotonic() - start
    cpu = [100 * (cpu_seconds(p) - before[p]) / elapsed for p in pids]
    memory = [memory_mib(p) for p in pids]
    rss = [m["rss"] for m in memory]
    result: dict[str, Any] = {
        "agent_rss_mib": {"mean": round(statistics.fmean(rss), 1), "max": round(max(rss), 1),
                          "min": round(min(rss), 1),
                          **{f"{part}_mean": round(statistics.fmean(m[part] for m in memory), 1)
                             for part in ("anon", "file", "pss")}},
        "agent_idle_cpu_percent": {"mean": round(statistics.fmean(cpu), 2), "max": round(max(cpu), 2)},
        "window_s": round(elapsed, 1),
    }
    scrapes = [scrape(address) for address in exporters]
    if scrapes:
        rates: dict[str, float] = {}
        for then, (body, _) in zip(counted, scrapes, strict=True):
            for method, count in served(body).items():
                rates[method] = rates.get(method, 0.0) + (count - then.get(method, 0.0)) / elapsed / len(scrapes)
        result["rpc_served_per_s"] = {"total": round(sum(rates.values()), 2),
                                      **{m: round(r, 2) for m, r in sorted(rates.items(), key=lambda i: -i[1])
                                         if r >= 0.005}}
        result["metrics_scrape"] = {"bytes_mean": round(statistics.fmean(len(b) for b, _ in scrapes)),
                                    "ms_max": round(1000 * max(s for _, s in scrapes), 1)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=12)
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=60.0, help="the measurement window")
    parser.add_argument("--settle", type=float, default=20.0, help="seconds left to the converged cluster first")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="discovery-bench-") as tmp, \
            local_cluster(Path(tmp), args.nodes, args.sites) as (state, _):
        time.sleep(args.settle)
        result = {"benchmark": "agent_footprint", "nodes": args.nodes, "sites": args.sites,
                  "load": round(os.getloadavg()[0], 2), **measure(state, args.seconds)}
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
