"""`discovery`: the command line, shaped like `virsh`/`openstack`/`consul`; what every command group shares.

Every failure a user can cause or meet (bad file, bad argument, unreachable agent, refused request)
ends in one `error: ...` line on stderr and exit status 1; usage errors exit 2 (typer's convention).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Discovery: a decentralized peer-to-peer manager of virtual environments.")

console = Console(width=None if sys.stdout.isatty() else 160)  # pipes and logs: do not wrap at 80
T = TypeVar("T")
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


class Options:
    agent: str | None = None
    config: str | None = None


@app.callback()
def main_options(
    agent: Annotated[str | None, typer.Option(help="Agent to talk to: HOST:PORT or a node name.")] = None,
    config: Annotated[str | None, typer.Option(help="Client config (default $DISCOVERY_CONFIG or "
                                                    "~/.config/discovery/client.toml).")] = None,
) -> None:
    Options.agent, Options.config = agent, config


def fail(message: str) -> typer.Exit:
    print(f"error: {message}", file=sys.stderr)
    return typer.Exit(1)


def rpc(method: str, args: dict[str, Any] | None = None, timeout: float = 60.0, at: str | None = None) -> Any:
    """Call `method` on the agent (--agent, else the client config's), or on the agent at address `at`."""
    return with_agent(lambda transport, addr: transport.call(addr, method, args or {}, timeout=timeout), at)


def with_agent(session: Callable[[Any, str], Awaitable[T]], at: str | None = None) -> T:
    """Run `session(transport, agent address)` over one connection to the agent (--agent, else the client
    config's; or the agent at address `at`): one call, or several for commands that stream (`image
    import`/`export`). Loads TLS and trio only when a command talks to an agent, not for --help."""
    import trio

    from discovery.cli.config import load_client_config
    from discovery.toml_config import ConfigError
    from overlay.wire import tls
    from overlay.wire.rpc import RpcError, Transport

    async def run() -> T:
        config = load_client_config(Options.config)
        addr = config.resolve(at or Options.agent)
        async with Transport(config.identity, node="cli") as transport:
            return await session(transport, addr)

    try:
        return trio.run(run)
    except (RpcError, ConfigError, tls.TLSError) as err:  # RemoteError included: the agent's refusal
        raise fail(f"{at}: {err}" if at else str(err)) from None


def emit(data: Any, as_json: bool, table: Table | None = None) -> None:
    if as_json or table is None:
        print(json.dumps(data, indent=2, default=str))
    else:
        console.print(table)


def make_table(columns: list[str], rows: list[list[Any]]) -> Table:
    table = Table(*columns, box=None, pad_edge=False)
    for row in rows:
        table.add_row(*("-" if v is None else str(v) for v in row))
    return table
