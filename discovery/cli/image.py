"""`discovery image`: disk images, stored once across the cluster (`images/`), from any agent."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from discovery.cli.app import JsonOpt, emit, fail, make_table, rpc, with_agent

image_app = typer.Typer(no_args_is_help=True, help="Disk images, deduplicated and replicated across sites.")


def _size(n: int) -> str:
    """Bytes for a person: B, KiB, MiB or GiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def image_table(entries: list[dict[str, Any]]) -> Any:
    rows = []
    for e in entries:
        sites: dict[str, list[str]] = {}
        for node, site in sorted(e["holders"].items()):
            sites.setdefault(site, []).append(node)
        rows.append([e["name"], _size(e["size"]), e["chunks"], _size(e["stored"]), e["owner"], e["digest"][:16],
                     "; ".join(f"{site}: {', '.join(nodes)}" for site, nodes in sorted(sites.items()))])
    return make_table(["image", "size", "chunks", "stored", "owner", "digest", "holders per site"], rows)


@contextlib.contextmanager
def progress_bar(what: str, as_json: bool) -> Iterator[Any]:
    """A rich progress bar on a terminal (nothing with --json or in a pipe); yields the callback."""
    if as_json or not sys.stderr.isatty():
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  transient=True) as bar:
        task = bar.add_task(what, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


@image_app.command("import")
def image_import(
    file: Path,
    name: Annotated[str, typer.Option("--name", help="NAME[:TAG] (tag: latest).")],
    copies: Annotated[int, typer.Option(min=1, max=16, help="Live holders to keep, over the sites.")] = 3,
    as_json: JsonOpt = False,
) -> None:
    """Import a raw or qcow2 FILE: chunked here, only the chunks the agent lacks are sent. JSON: size,
    chunks, new_chunks, new_bytes (what the agent's store grew by)."""
    from images.importing import ImageFileError
    from images.messages import check_image_name
    from images.store import StoreError
    from images.transfer import upload
    from overlay.wire.rpc import RequestError

    try:
        check_image_name(name)
        with progress_bar(f"importing {file.name}", as_json) as progress:
            done = with_agent(lambda transport, addr: upload(transport, addr, file, name, copies, progress=progress))
    except (ImageFileError, StoreError, RequestError) as err:
        raise fail(str(err)) from None
    view = {f: getattr(done, f) for f in done.__dataclass_fields__}
    emit(view, as_json, make_table(["image", "digest", "size", "chunks", "new chunks", "new bytes"],
                                   [[done.name, done.digest[:16], _size(done.size), done.chunks, done.new_chunks,
                                     _size(done.new_bytes)]]))


@image_app.command("list")
def image_list(as_json: JsonOpt = False) -> None:
    """Every image of the catalogue, with its holders per site."""
    entries = rpc("image.list", {})
    emit(entries, as_json, image_table(entries))


@image_app.command("show")
def image_show(name: str, as_json: JsonOpt = False) -> None:
    """One image: size, chunks, stored bytes, holders per site."""
    entry = rpc("image.show", {"name": name})
    emit(entry, as_json, image_table([entry]))


@image_app.command("export")
def image_export(name: str, file: Path, as_json: JsonOpt = False) -> None:
    """Write NAME's raw content to FILE (byte-identical to what was imported), from the agent, which must
    hold it (`discovery --agent X image pull NAME` first otherwise)."""
    from images.store import StoreError
    from images.transfer import download
    from overlay.wire.rpc import RequestError

    try:
        with progress_bar(f"exporting {name}", as_json) as progress:
            digest = with_agent(lambda transport, addr: download(transport, addr, name, file, progress))
    except (StoreError, RequestError, OSError) as err:
        raise fail(str(err)) from None
    emit({"name": name, "file": str(file), "digest": digest}, as_json,
         make_table(["image", "file", "digest"], [[name, str(file), digest[:16]]]))


@image_app.command("pull")
def image_pull(name: str, as_json: JsonOpt = False) -> None:
    """Make the agent (--agent) a holder of NAME: its missing chunks from several holders at once."""
    pulled = rpc("image.pull", {"name": name}, timeout=3600.0)
    emit(pulled, as_json, make_table(
        ["image", "node", "fetched", "duplicates", "from", "seconds"],
        [[pulled["name"], pulled["node"], _size(pulled["fetched_bytes"]), _size(pulled["duplicate_bytes"]),
          ", ".join(f"{n}: {_size(b)}" for n, b in sorted(pulled["sources"].items())) or "-", pulled["seconds"]]]))


@image_app.command("replicate")
def image_replicate(
    name: str,
    copies: Annotated[int, typer.Option(min=1, max=16, help="Live holders wanted, over as many sites as can be.")] = 3,
    as_json: JsonOpt = False,
) -> None:
    """Have nodes pull NAME until it has COPIES live holders, new ones first in sites that hold none."""
    entry = rpc("image.replicate", {"name": name, "copies": copies}, timeout=3600.0)
    emit(entry, as_json, image_table([entry]))


@image_app.command("rm")
def image_rm(name: str, as_json: JsonOpt = False) -> None:
    """Remove NAME from the catalogue and from every holder; refused while a VE uses it."""
    entry = rpc("image.rm", {"name": name})
    emit(entry, as_json, make_table(["removed", "digest"], [[entry["name"], entry["digest"][:16]]]))


@image_app.command("verify")
def image_verify(name: str, as_json: JsonOpt = False) -> None:
    """Read back every chunk of NAME on the agent; corrupt ones are fetched again from other holders."""
    done = rpc("image.verify", {"name": name}, timeout=3600.0)
    emit(done, as_json, make_table(["image", "chunks", "corrupt", "refetched"],
                                   [[done["name"], done["chunks"], done["corrupt"], done["refetched"]]]))


@image_app.command("gc")
def image_gc(as_json: JsonOpt = False) -> None:
    """Free the agent's store of chunks no held image uses, and the boot bases no VM of its node uses."""
    done = rpc("image.gc", {}, timeout=3600.0)
    emit(done, as_json, make_table(list(done), [list(done.values())]))
