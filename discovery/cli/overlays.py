"""`discovery overlay` and `discovery kv`: which overlay holds the records, and records under kv/."""

from __future__ import annotations

from typing import Annotated

import typer

from discovery.cli.app import JsonOpt, emit, fail, make_table, rpc

overlay_app = typer.Typer(no_args_is_help=True, help="The overlays (Chord, Kademlia) and which one holds the records.")
kv_app = typer.Typer(no_args_is_help=True, help="Key/value records under kv/, on the bound overlay or a named one.")


OverlayOpt = Annotated[str | None, typer.Option("--overlay", help="chord or kademlia (default: the bound one).")]


@overlay_app.command("status")
def overlay_status(as_json: JsonOpt = False) -> None:
    """Which overlay holds the records, at which epoch, and this agent's Kademlia contacts."""
    info = rpc("overlay.status")
    emit(info, as_json, make_table(["field", "value"], [[k, v] for k, v in info.items()]))


@overlay_app.command("bind")
def overlay_bind(overlay: Annotated[str, typer.Argument(help="chord or kademlia")], as_json: JsonOpt = False) -> None:
    """Move every agent's records (the VE directory included) to OVERLAY, at run time, losing none."""
    info = rpc("overlay.bind", {"overlay": overlay}, timeout=300)
    emit(info, as_json, make_table(["field", "value"], [[k, v] for k, v in info.items()]))


@kv_app.command("put")
def kv_put(key: str, value: str, overlay: OverlayOpt = None, as_json: JsonOpt = False) -> None:
    """Write VALUE under KEY (a new version). Keys belong to their writer: KEY is yours (your certificate's
    name), and nobody else can overwrite it."""
    info = rpc("overlay.put", {"key": key, "value": value, "overlay": overlay})
    emit(info, as_json, make_table(["field", "value"], [[k, v] for k, v in info.items()]))


@kv_app.command("get")
def kv_get(key: str, overlay: OverlayOpt = None,
           owner: Annotated[str | None, typer.Option(help="Whose KEY (a certificate name); default: yours.")] = None,
           as_json: JsonOpt = False) -> None:
    """Read KEY; exits 1 if it is absent."""
    info = rpc("overlay.get", {"key": key, "overlay": overlay, "owner": owner})
    if not info["found"]:
        raise fail(f"no record under {key!r} on {info['overlay']}")
    if as_json:
        emit(info, True)
    else:
        print(info["value"])
