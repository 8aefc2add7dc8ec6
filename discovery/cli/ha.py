"""`discovery ha`: the hosts' HA leases and the watchers that recover their VEs (`discovery.ha`)."""

from __future__ import annotations

from typing import Annotated

import typer

from discovery.cli.app import JsonOpt, emit, fail, make_table, rpc

ha_app = typer.Typer(no_args_is_help=True, help="HA: each host's lease on running its protected VMs, and the "
                                                 "watchers that recover them when it dies.")


@ha_app.command("status")
def ha_status(every: Annotated[bool, typer.Option("--all", help="Ask every live member, not only the agent.")] = False,
              as_json: JsonOpt = False) -> None:
    """Each node's lease (epoch, the protected VEs it lists, seconds left, frozen) and the hosts it watches."""
    if every:
        alive = [m["addr"] for m in rpc("agent.members") if m["status"] == "alive"]
        answers = [rpc("ha.status", at=addr) for addr in alive]
    else:
        answers = [rpc("ha.status")]
    rows = [[a["node"], a["epoch"], _left(a), ", ".join(a["listed"]) or "-",
             ", ".join(f"{h} ({s})" for h, s in a["watching"].items()) or "-", a["recovered"]]
            for a in sorted(answers, key=lambda a: a["node"])]
    emit(answers if every else answers[0], as_json,
         make_table(["node", "epoch", "lease left", "lists", "watches", "recovered"], rows))


def _left(status: dict) -> str:
    """What is left of a node's lease: seconds, frozen (and what the freeze paused), or - (not held)."""
    if status["frozen"]:
        return f"frozen ({', '.join(status['frozen_vms']) or 'nothing ran'})"
    return "-" if status.get("expires_in") is None else f"{status['expires_in']:.1f} s"


@ha_app.command("lease")
def ha_lease(node: Annotated[str, typer.Argument(help="The host whose lease to read.")],
             as_json: JsonOpt = False) -> None:
    """NODE's lease record as a majority of its replicas hold it (what its watchers read); exits 1 if NODE
    never held one."""
    info = rpc("ha.lease", {"node": node})
    if info is None:
        raise fail(f"{node} has no HA lease record (it never ran a protected VM)")
    lease = info["lease"]
    rows = [["holder", lease["holder"] or f"none (revoked by {lease.get('revoked_by', '?')})"],
            ["epoch", lease["epoch"]], ["term", f"{lease['term']:g} s"], ["lists", ", ".join(lease["ves"]) or "-"],
            ["version", info["version"]], ["written by", info["writer"]]]
    emit(info, as_json, make_table(["field", "value"], rows))
