"""The figures of a campaign, from its raw record (`discovery.campaign.runner`), sans-IO: operation latencies,
VEs by state over time, overloaded nodes over time, DVMS migrations, and recovery times after each fault.

A *recovery*, for a `kill`, `poweroff` or `partition` action: the VEs that had a VM on a node it took down (in the last
sample before it) are recovered at the first sample where each of their VMs is placed on a node outside it,
no operation is under way on it, and the VE is running. Its time is that sample's less the action's start,
so it is known to `sample_every` seconds; a VE never seen so is reported with None (not within the campaign),
unless the workload destroyed it first (`gone`: a destroy that succeeded began before). A VE missing from a
sample is not taken for gone: a listing read during a partition may lack what the unreachable replicas hold.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

OVERLOADED = 'discovery_dvms_load_state{state="overload"}'
MIGRATED = 'discovery_dvms_migrations_total{outcome="done"}'
CPU_RATIO = "discovery_dvms_cpu_demand_ratio"
PULLED = "discovery_image_pulled_bytes_total"


def percentile(values: list[float], q: float) -> float | None:
    """The `q` quantile (0..1) by the nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def latencies(operations: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per operation kind: how many, how many succeeded, failed or did not finish, and the successful ones'
    latency p50, p90 and max in seconds."""
    kinds: dict[str, dict[str, Any]] = {}
    for op in sorted({o["op"] for o in operations}):
        mine = [o for o in operations if o["op"] == op]
        times = [o["seconds"] for o in mine if o["ok"]]
        kinds[op] = {"count": len(mine), "ok": len(times),
                     "unfinished": sum(o["error"] == "unfinished" for o in mine),
                     "failed": sum(not o["ok"] and o["error"] != "unfinished" for o in mine),
                     "p50_s": percentile(times, 0.5), "p90_s": percentile(times, 0.9),
                     "max_s": max(times) if times else None}
    return kinds


def ves_over_time(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each sample that read the directory: its time and how many VEs were in each state."""
    return [{"at": s["at"], **Counter(ve["state"] for ve in s["ves"])} for s in samples if s["ves"] is not None]


def nodes_over_time(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each sample: how many nodes answered their /metrics, how many were overloaded (DVMS's monitor), and
    DVMS migrations done since the campaign began (`increases`: a node cut off still counts its own)."""
    migrated = increases(samples, MIGRATED)
    return [{"at": s["at"], "answering": sum(m is not None for m in s["metrics"].values()),
             "overloaded": sum(m is not None and m.get(OVERLOADED, 0) == 1 for m in s["metrics"].values()),
             "migrations": sum(grown.values())} for s, grown in zip(samples, migrated, strict=True)]


def increases(samples: list[dict[str, Any]], series: str) -> list[dict[str, float]]:
    """For each sample, per node, how much counter `series` grew since the node's first answer, as far as its
    last answer: a drop counts as a restart from 0 (a killed agent starts its counters again)."""
    grown: dict[str, float] = {}
    last: dict[str, float] = {}
    rows = []
    for s in samples:
        for node, m in s["metrics"].items():
            if m is None or series not in m:
                continue
            value = m[series]
            if node in last:
                grown[node] = grown[node] + (value - last[node] if value >= last[node] else value)
            else:
                grown[node] = 0.0
            last[node] = value
        rows.append(dict(grown))
    return rows


def cpu_over_time(samples: list[dict[str, Any]]) -> dict[str, list[tuple[float, float | None]]]:
    """Per node that ever reported it, (time, CPU demand over capacity as DVMS counts them) in each sample; None
    where the node did not answer (a gap in the plot, not a line across its downtime)."""
    nodes = sorted({node for s in samples for node, m in s["metrics"].items() if m is not None and CPU_RATIO in m})
    return {node: [(s["at"], (s["metrics"].get(node) or {}).get(CPU_RATIO)) for s in samples] for node in nodes}


def pulled_bytes(samples: list[dict[str, Any]]) -> dict[str, float]:
    """Per node, the image bytes it pulled from holders during the campaign (`increases`)."""
    return dict(sorted(increases(samples, PULLED)[-1].items())) if samples else {}


def serving_over_time(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each sample that probed the guests' web servers: how many were probed and how many answered."""
    return [{"at": s["at"], "probed": len(s["web"]),
             "answering": sum(page is not None for page in s["web"].values())} for s in samples if "web" in s]


def recoveries(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """For each kill, poweroff or partition action, each VE it hit and its recovery time (module docstring)."""
    sites = {n["name"]: n["site"] for n in raw["nodes"]}
    read = [s for s in raw["samples"] if s["ves"] is not None]
    destroyed = {}  # VE -> when the workload began destroying it (a destroy that failed left it there)
    for op in sorted(raw["operations"], key=lambda o: -o["at"]):
        if op["op"] == "destroy" and op["ok"]:
            destroyed[op["ve"]] = op["at"]
    found = []
    for action in raw["actions"]:
        if action["kind"] not in ("kill", "poweroff", "partition") or not action["ok"]:
            continue
        hit_nodes = {n for n, site in sites.items() if action["target"] in (n, site)}
        before = [s for s in read if s["at"] <= action["started"]]
        if not before:
            continue
        hit = sorted(ve["name"] for ve in before[-1]["ves"]
                     if any(vm["node"] in hit_nodes for vm in ve["vms"].values()))
        for name in hit:
            serving = _serving_again(raw["samples"], name, action)
            seconds, gone = None, False
            for s in read:
                if s["at"] <= action["started"]:
                    continue
                if destroyed.get(name, s["at"] + 1) <= s["at"]:  # destroyed by the workload first
                    gone = True
                    break
                ve = next((v for v in s["ves"] if v["name"] == name), None)
                if ve is not None and ve["state"] == "running" and all(
                        vm["node"] not in hit_nodes and not vm["busy"] for vm in ve["vms"].values()):
                    seconds = round(s["at"] - action["started"], 3)
                    break
            found.append({"action": action["kind"], "target": action["target"], "at": action["started"],
                          "ve": name, "seconds": seconds, "gone": gone, "serving_s": None if gone else serving})
    return found


def _serving_again(samples: list[dict[str, Any]], ve: str, action: dict[str, Any]) -> float | None:
    """Seconds from `action`'s start to the first sample after it ended in which each of `ve`'s VMs answered
    (module docstring); None without probes or if it never did."""
    for s in samples:
        mine = [page is not None for vm, page in s.get("web", {}).items() if vm.split("/")[0] == ve]
        if s["at"] > action["ended"] and mine and all(mine):
            return round(float(s["at"]) - float(action["started"]), 3)
    return None


def figures(raw: dict[str, Any]) -> dict[str, Any]:
    """Everything the report shows, from the raw record."""
    found = recoveries(raw)
    recovered = [r["seconds"] for r in found if r["seconds"] is not None]
    serving = [r["serving_s"] for r in found if r["serving_s"] is not None]
    nodes = nodes_over_time(raw["samples"])
    return {"operations": latencies(raw["operations"]), "ves": ves_over_time(raw["samples"]), "nodes": nodes,
            "cpu": cpu_over_time(raw["samples"]), "serving": serving_over_time(raw["samples"]),
            "image_pulled_bytes": pulled_bytes(raw["samples"]),
            "recoveries": found,
            "recovery": {"count": len(recovered), "p50_s": percentile(recovered, 0.5),
                         "max_s": max(recovered) if recovered else None,
                         "not_recovered": sum(r["seconds"] is None and not r["gone"] for r in found),
                         "serving_count": len(serving), "serving_p50_s": percentile(serving, 0.5),
                         "serving_max_s": max(serving) if serving else None},
            "max_overloaded": max((n["overloaded"] for n in nodes), default=0),
            "migrations": max((n["migrations"] for n in nodes), default=0),
            "actions": [{k: a[k] for k in ("kind", "target", "started", "ok", "error")} for a in raw["actions"]]}
