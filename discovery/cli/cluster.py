"""`discovery cluster`: a local multi-site cluster of agent processes (`discovery.cli.local_cluster`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from discovery.cli.app import JsonOpt, emit, fail, make_table

cluster_app = typer.Typer(no_args_is_help=True, help="A local multi-site cluster of agent processes.")


@cluster_app.command("up")
def cluster_up(
    directory: Annotated[Path, typer.Option("--dir", help="Where the cluster keeps everything.")],
    nodes: Annotated[int, typer.Option(help="How many agents.")] = 6,
    sites: Annotated[int, typer.Option(help="How many sites (latency emulated between them).")] = 3,
    vcpus: Annotated[int, typer.Option(help="vCPUs per node.")] = 16,
    memory_mb: Annotated[int, typer.Option(help="Memory per node, MiB.")] = 32768,
    local_rtt_ms: Annotated[float, typer.Option(help="Emulated RTT between two nodes of one site, ms.")] = 0.0,
    hypervisor: Annotated[str, typer.Option(help="test (libvirt's embedded test driver), qemu (real tiny "
                                                 "guests, a libvirtd per node, live migration) or qemu-embed "
                                                 "(real guests, QEMU driver inside each agent).")] = "test",
    dvms: Annotated[list[str] | None, typer.Option(help="KEY=VALUE of every agent.toml's dvms table, e.g. "
                                                        "injector_rate=0.05 or underload=0.2; repeatable.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Start NODES agent processes on loopback, spread over SITES sites."""
    from discovery.cli import local_cluster  # TLS, trio, the agents' config: only for these commands
    from overlay.wire import tls

    try:
        state = local_cluster.up(directory, nodes, sites, vcpus=vcpus, memory_mb=memory_mb,
                                 local_rtt_ms=local_rtt_ms, hypervisor=hypervisor,
                                 dvms=local_cluster.dvms_table(dvms or []))
    except (local_cluster.ClusterError, tls.TLSError) as err:
        raise fail(str(err)) from None
    emit(state, as_json, make_table(["node", "site", "address", "metrics", "pid"],
                                    [[n["name"], n["site"], n["addr"], f"http://{n['metrics']}/metrics", n["pid"]]
                                     for n in state["nodes"]]))
    if not as_json:
        print(f"client config: {state['client_config']} (also the default for this user)")


@cluster_app.command("status")
def cluster_status(directory: Annotated[Path, typer.Option("--dir")], as_json: JsonOpt = False) -> None:
    """Process and ring state of each agent of the local cluster."""
    from discovery.cli import local_cluster

    try:
        rows = local_cluster.status(directory)
    except local_cluster.ClusterError as err:
        raise fail(str(err)) from None
    emit(rows, as_json, make_table(["node", "site", "address", "pid", "process", "answers", "successor", "records"],
                                   [[r["name"], r["site"], r["addr"], r["pid"], r["process"], r["answers"],
                                     r["successor"], r["records"]] for r in rows]))


@cluster_app.command("down")
def cluster_down(directory: Annotated[Path, typer.Option("--dir")]) -> None:
    """Stop every agent of the local cluster."""
    from discovery.cli import local_cluster

    try:
        stopped = local_cluster.down(directory)
    except local_cluster.ClusterError as err:
        raise fail(str(err)) from None
    print(f"stopped {len(stopped)} agents")


@cluster_app.command("kill")
def cluster_kill(node: Annotated[str, typer.Argument(help="The node to power off, e.g. node3.")],
                 directory: Annotated[Path, typer.Option("--dir")]) -> None:
    """Power NODE off: kill -9 its agent and, with real guests, its libvirtd and guests (its disk stays). What
    its VEs' HA policies do about it shows in `ve show` and `discovery ha status`; `cluster start` brings it back."""
    _fault("kill", node, directory)


@cluster_app.command("crash")
def cluster_crash(node: Annotated[str, typer.Argument(help="The node whose agent to kill, e.g. node3.")],
                  directory: Annotated[Path, typer.Option("--dir")]) -> None:
    """kill -9 NODE's agent alone: with real guests, its libvirtd and guests live on, and `cluster start` gives
    them back to a new agent. Protected VEs' watchers may also start them elsewhere meanwhile: an agent is its
    host's only watchdog (docs/architecture.md, the HA limits)."""
    _fault("crash", node, directory)


def _fault(kind: str, node: str, directory: Path) -> None:
    from discovery.cli import local_cluster

    try:
        done = local_cluster.kill(directory, node) if kind == "kill" else local_cluster.crash(directory, node)
    except local_cluster.ClusterError as err:
        raise fail(str(err)) from None
    print(f"{'killed' if kind == 'kill' else 'crashed'} {node} (pid {done['pid']})")


@cluster_app.command("start")
def cluster_start(node: Annotated[str, typer.Argument(help="The node whose agent to start again.")],
                  directory: Annotated[Path, typer.Option("--dir")]) -> None:
    """Start NODE's agent again after `cluster kill` or `cluster crash`, with its config and data."""
    from discovery.cli import local_cluster

    try:
        started = local_cluster.start(directory, node)
    except local_cluster.ClusterError as err:
        raise fail(str(err)) from None
    print(f"started {node} (pid {started['pid']})")
