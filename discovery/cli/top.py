"""`discovery top`: a live view of the whole cluster, like `top` or `nomad status`, usable over a slow link.

Each refresh is one `top.cluster` request on one kept connection: the agent gathers from every member
(`discovery.top`), so the link carries one small answer per refresh, not a call per node and metric. The
answer is drawn as it came (plain maps): the CLI loads no agent code.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Annotated, Any

import typer
from rich.console import Group, RenderableType
from rich.markup import escape
from rich.text import Text

from discovery.cli.app import JsonOpt, console, make_table, rpc, with_agent

STATE_STYLE = {"alive": "green", "suspect": "yellow", "dead": "red", "left": "dim"}


def top(interval: Annotated[float, typer.Option(help="Seconds between two refreshes.", min=0.2)] = 2.0,
        once: Annotated[bool, typer.Option("--once", help="Print one frame and exit (scripts, tests).")] = False,
        events: Annotated[int, typer.Option(help="Recent events shown.", min=0, max=64)] = 12,
        migrations: Annotated[int, typer.Option(help="DVMS migrations shown.", min=0, max=50)] = 8,
        deadline: Annotated[float, typer.Option(help="Seconds members have to answer; the silent are shown so.",
                                                min=0.1, max=30.0)] = 2.0,
        as_json: JsonOpt = False) -> None:
    """The whole cluster, refreshing: nodes by site (SWIM state, load, VMs, DVMS partition), recent events,
    DVMS migrations. One request per refresh to the agent (--agent), which asks every member at once;
    `--json` prints the agent's answer once."""
    query = {"events": events, "migrations": migrations, "deadline": deadline}
    timeout = deadline + 10.0  # the agent answers within the deadline and a second: the rest is the link
    if once or as_json:
        summary = rpc("top.cluster", query, timeout)
        if as_json:
            print(json.dumps(summary, indent=2))
        else:
            console.print(frame(summary, interval=None))
        return
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: the way out of a live view, not an error
        with_agent(lambda transport, addr: _watch(transport, addr, query, timeout, interval))


async def _watch(transport: Any, addr: str, query: dict[str, Any], timeout: float, interval: float) -> None:
    """Draw a frame every `interval` seconds until interrupted; while the agent fails to answer, the last frame
    stays under a banner saying why, and the requests go on."""
    import trio
    from rich.live import Live

    from overlay.wire.rpc import RpcError

    summary: dict[str, Any] | None = None
    with Live(Text(f"asking {addr}..."), console=console, screen=True, auto_refresh=False) as live:
        while True:
            started = trio.current_time()
            banner = None
            try:
                summary = await transport.call(addr, "top.cluster", query, timeout=timeout)
            except RpcError as err:
                banner = f"agent {addr} unreachable: {err}; retrying every {interval:g} s"
            live.update(frame(summary, interval, banner) if summary else Text(banner or "", style="bold red"),
                        refresh=True)
            await trio.sleep_until(started + interval)


def frame(summary: dict[str, Any], interval: float | None, banner: str | None = None) -> RenderableType:
    """One screen: a banner if the last refresh failed, a header line, then the nodes by site, the events and
    the migrations."""
    parts: list[RenderableType] = [Text(banner, style="bold red")] if banner else []
    parts += [_header(summary, interval), _nodes(summary["nodes"])]
    if summary["events"]:
        parts.append(_titled("events", make_table(
            ["time", "node", "event", "subject", "detail"],
            [[_clock(e["time"]), e["node"], e["kind"], escape(e["subject"]), escape(e["detail"])]
             for e in summary["events"]])))
    if summary["migrations"]:
        parts.append(_titled("DVMS migrations", make_table(
            ["vm", "from", "to", "state", "when", "partition"],
            [[escape(m["vm"]), m["source"], m["target"], m["state"], _ago(summary["time"] - m["time"]),
              m["partition"]] for m in summary["migrations"]])))
    return Group(*parts)


def _header(summary: dict[str, Any], interval: float | None) -> Text:
    nodes = summary["nodes"]
    counts = {s: sum(n["state"] == s for n in nodes) for s in STATE_STYLE}
    silent = sum("silent" in n and n["state"] in ("alive", "suspect") for n in nodes)
    text = Text.assemble(("discovery top", "bold"), f"  via {summary['by']} at {_clock(summary['time'])}  "
                         f"{len(nodes)} nodes: ")
    text.append(", ".join(f"{k} {v}" for k, v in counts.items() if v) or "none")
    text.append(f"  ({silent} silent)" if silent else "", style="yellow")
    text.append(f"  gathered in {summary['seconds'] * 1000:.0f} ms" + (f", every {interval:g} s" if interval else ""))
    return text


def _nodes(nodes: list[dict[str, Any]]) -> RenderableType:
    rows, site = [], None
    for n in nodes:
        u, p = n.get("usage"), n.get("partition")
        first = n["site"] != site
        site = n["site"]
        state = f"[{STATE_STYLE.get(n['state'], '')}]{n['state']}[/]"
        if u is None:  # silent: why, unless gossip already says (dead, left)
            why = f"[red]{escape(n['silent'])}[/]" if n["state"] in ("alive", "suspect") else None
            rows.append([site if first else "", n["name"], state, None, None, None, None, why, None])
            continue
        cpu = f"{100 * u['cpu'] // max(u['cpu_capacity'], 1)}%"
        rows.append([site if first else "", n["name"], state, cpu, f"{u['vcpus']}/{u['vcpus_total']}",
                     f"{u['memory_mb'] / 1024:.1f}/{u['memory_mb_total'] / 1024:.1f}",
                     f"{u['running']}/{u['vms']}", _load(u["load"]), _partition(p)])
    return _titled("nodes", make_table(["site", "node", "state", "cpu", "vcpus", "mem GiB", "vms run/all", "load",
                                        "partition"], rows))


def _load(state: str) -> str:
    return {"overload": "[bold red]overload[/]", "underload": "[cyan]underload[/]"}.get(state, state)


def _partition(p: dict[str, Any] | None) -> str | None:
    if p is None:
        return None
    size = f", {len(p['members'])} nodes" if p.get("members") else f", leader {p['leader']}"
    return escape(f"{p['id']} {p['role']}" + (f" {p['state']}" if p.get("state") else "") + size)


def _titled(title: str, table: Any) -> Any:
    table.title, table.title_justify, table.title_style = title, "left", "bold"
    return table


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t))


def _ago(seconds: float) -> str:
    return f"{max(seconds, 0):.0f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"
