"""`discovery agent run` and what one agent knows of the cluster: members, status, coordinates, RTT,
the spiral search."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from discovery.cli.app import JsonOpt, app, emit, fail, make_table, rpc, with_agent

agent_app = typer.Typer(no_args_is_help=True, help="Run an agent.")


@agent_app.command("run")
def agent_run(config: Annotated[str, typer.Option(help="agent.toml")],  # str: typer's Path loads pydantic
              log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "info") -> None:
    """Run this node's agent until SIGTERM (`python -m discovery.agent` does the same in less memory)."""
    from discovery import agent  # the whole agent: loaded only to run one

    why = agent.serve(Path(config), log_level)
    if why is not None:
        raise fail(why)


@app.command()
def members(as_json: JsonOpt = False) -> None:
    """Members of the cluster as this agent sees them (like `consul members`)."""
    rows = rpc("agent.members")
    emit(rows, as_json, make_table(["node", "site", "address", "status", "rtt ms"],
                                   [[m["name"], m["site"], m["addr"], m["status"], m["rtt_ms"]] for m in rows]))


@app.command()
def status(as_json: JsonOpt = False) -> None:
    """This agent's own view: ring neighbours, records held, restarts, the protocol versions it speaks."""

    async def ask(transport: Any, addr: str) -> tuple[dict[str, Any], int]:
        return await transport.call(addr, "agent.status", {}), await transport.peer_version(addr)

    info, version = with_agent(ask)
    info["protocol_version"] = version  # of this connection
    rows = [[k, v] for k, v in info.items() if k not in ("protocol", "protocol_version")]
    emit(info, as_json, make_table(["field", "value"], [*rows, ["protocol", protocol_line(info)]]))


def protocol_line(info: dict[str, Any]) -> str:
    """What `agent.status` says of protocol versions, on one line: spoken, used here, used with each peer."""
    spoken = info.get("protocol")
    if spoken is None:  # an agent of version 1 only, which predates version ranges
        return f"speaks {info['protocol_version']} only; with this client {info['protocol_version']}"
    peers = ", ".join(f"{name} {v}" for name, v in sorted(spoken["peers"].items())) or "none connected"
    return (f"speaks {spoken['oldest']}..{spoken['newest']}; with this client {info['protocol_version']}; "
            f"with peers: {peers}")


@app.command()
def coords(as_json: JsonOpt = False) -> None:
    """This node's Vivaldi coordinate and those of the nodes it knows, with their error."""
    info = rpc("coord.list")
    rows = [[("* " if n["self"] else "") + n["name"], n["site"], n["status"], f"{n['error']:.3f}", n["height_ms"],
             n["estimated_rtt_ms"], n["measured_rtt_ms"]] for n in info["nodes"]]
    emit(info, as_json, make_table(["node", "site", "status", "error", "height ms", "est. rtt ms", "measured ms"],
                                   rows))


@app.command()
def rtt(node: str, node2: Annotated[str | None, typer.Argument(help="Default: the agent itself.")] = None,
        as_json: JsonOpt = False) -> None:
    """Estimated (from coordinates) vs measured RTT between NODE and NODE2, like `consul rtt`."""
    answer = rpc("coord.rtt", {"a": node, "b": node2})
    if as_json:
        emit(answer, True)
    else:
        measured = "-" if answer["measured_ms"] is None else f"{answer['measured_ms']:.3f} ms"
        print(f"Estimated {answer['a']} <-> {answer['b']} rtt: {answer['estimated_ms']:.3f} ms "
              f"(± {answer['bound_ms']:.3f} ms), measured: {measured}")


@app.command()
def spiral(count: Annotated[int, typer.Option(help="How many nodes to find.")] = 5,
           site: Annotated[str | None, typer.Option(help="Only nodes of this site.")] = None,
           as_json: JsonOpt = False) -> None:
    """The nearest nodes to the agent, found by the spiral search (nearest first), and what it cost."""
    info = rpc("spiral.search", {"count": count, "site": site})
    rows = [[n["name"], n["site"], n["rtt_ms"], n["free"]["vcpus"], n["free"]["memory_mb"]] for n in info["nodes"]]
    emit(info, as_json, make_table(["node", "site", "rtt ms", "free vcpus", "free MiB"], rows))
    if not as_json:
        print(f"from {info['origin']}: {info['hops']} hops, {info['messages']} messages, {info['failures']} failed")
