"""`discovery ca`: the cluster's certificate authority (a CA, and certificates with a role in them)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from discovery.cli.app import fail

ca_app = typer.Typer(no_args_is_help=True, help="Cluster certificate authority.")


@ca_app.command("init")
def ca_init(directory: Path) -> None:
    """Create a cluster CA in DIRECTORY."""
    from overlay.wire import tls
    from overlay.wire.ca import init_ca  # cryptography: only for these commands

    try:
        print(init_ca(directory))
    except tls.TLSError as err:
        raise fail(str(err)) from None


@ca_app.command("issue")
def ca_issue(directory: Path, name: str,
             role: Annotated[str, typer.Option(help="node, client or operator")] = "node",
             out: Annotated[Path | None, typer.Option(help="where to write NAME.pem/NAME.key")] = None) -> None:
    """Issue a certificate for NAME signed by the CA in DIRECTORY."""
    from overlay.wire import tls
    from overlay.wire.ca import issue

    try:
        identity = issue(directory, name, role, out_dir=out)
    except tls.TLSError as err:
        raise fail(str(err)) from None
    print(f"{identity.cert}\n{identity.key}")
