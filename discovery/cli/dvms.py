"""`discovery dvms`: the partitions that relieve overloaded nodes, seen from the agents; test hooks to load them."""

from __future__ import annotations

import sys
import time
from typing import Annotated

import typer

from discovery.cli.app import JsonOpt, console, emit, fail, make_table, rpc

dvms_app = typer.Typer(no_args_is_help=True, help="DVMS: the partitions that relieve overloaded nodes (and, "
                                                   "when configured, empty underloaded ones).")


@dvms_app.command("status")
def dvms_status(every: Annotated[bool, typer.Option("--all", help="Ask every member, not only the agent.")] = False,
                events: Annotated[int, typer.Option(help="Also show this many recent events (problem, created, "
                                                         "plan, migrated, ended...), per node.")] = 0,
                as_json: JsonOpt = False) -> None:
    """The agent's DVMS view: its load, the partition it is in, the partitions it led (with the problem that
    started each: overload or underload, and how it ended; the last three in the table) and recent events."""
    from rich.markup import escape  # event details name rule groups, [a, b], which rich reads as markup

    if every:
        alive = [m["addr"] for m in rpc("agent.members") if m["status"] == "alive"]
        answers = [rpc("dvms.status", timeout=30.0, at=addr) for addr in alive]
    else:
        answers = [rpc("dvms.status")]
    rows, happened = [], []
    for a in answers:
        p, problems = a["partition"], a.get("problems", {})
        details = [p["role"], p["state"], p.get("problem")] if p is not None else []
        where = "-" if p is None else f"{p['id']} ({', '.join(d for d in details if d)})"
        ended = ", ".join(f"{pid}: {reason}" + (f" ({problems[pid]})" if pid in problems else "")
                          for pid, reason in list(a["ended"].items())[-3:]) or "-"
        rows.append([a["node"], a["load"]["state"], a["load"]["cpu"], a["load"].get("cpu_capacity"), where, ended])
        happened += [[time.strftime("%H:%M:%S", time.localtime(e["time"])), a["node"], e["kind"],
                      escape(" ".join(f"{k}={v}" for k, v in e.items() if k not in ("time", "kind") and v is not None))]
                     for e in a["events"][-events:]] if events > 0 else []
    emit(answers if every else answers[0], as_json,
         make_table(["node", "load", "cpu", "capacity", "partition", "ended partitions"], rows))
    if happened and not as_json:
        console.print(make_table(["time", "node", "event", "details"], happened))


@dvms_app.command("load")
def dvms_load(vm: Annotated[str, typer.Argument(help="The VM, as VE:VM (e.g. web-shop:db).")],
              cpu: Annotated[int | None, typer.Argument(help="Its CPU demand, percent of one vCPU.", min=0)] = None,
              unpin: Annotated[bool, typer.Option("--unpin", help="Drop its pin instead.")] = False,
              as_json: JsonOpt = False) -> None:
    """Pin a VM's CPU demand (a test hook; real guests are measured otherwise), on whichever node hosts it.
    The pin is part of the VM's definition: it follows the VM when it is relocated."""
    ve, sep, name = vm.partition(":")
    if not (sep and ve and name) or (cpu is None) != unpin:
        print("error: give VE:VM and either CPU or --unpin", file=sys.stderr)
        raise typer.Exit(2)
    slot = rpc("ve.locate", {"name": ve})["vms"].get(name)
    if slot is None:
        raise fail(f"VE {ve!r} has no VM {name!r}")
    answer = rpc("dvms.load", {"vm": vm, "cpu": cpu}, 30.0, at=slot["addr"])
    emit(answer, as_json, make_table(["vm", "node", "cpu"], [[vm, answer["node"], "-" if unpin else cpu]]))


@dvms_app.command("capacity")
def dvms_capacity(cpu: Annotated[int, typer.Argument(help="Percent of one vCPU (16 vCPUs: 1600).", min=1)],
                  as_json: JsonOpt = False) -> None:
    """Set the CPU capacity DVMS counts for the agent's node (a test hook: a node made to look smaller, so
    that pinned demand can overload it)."""
    answer = rpc("dvms.load", {"cpu_capacity": cpu})
    emit(answer, as_json, make_table(["node", "cpu capacity"], [[answer["node"], answer["cpu_capacity"]]]))
