"""`discovery`: the command line, shaped like `virsh`/`openstack`/`consul`.

Every failure a user can cause or meet (bad file, bad argument, unreachable agent, refused request)
ends in one `error: ...` line on stderr and exit status 1; usage errors exit 2 (typer's convention).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from discovery.cli import local_cluster
from discovery.cli.client import call
from discovery.cli.config import load_client_config
from discovery.toml_config import ConfigError
from discovery.ve.spec import SpecError, load_spec
from overlay.wire import tls
from overlay.wire.rpc import RpcError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Discovery: a decentralized peer-to-peer manager of virtual environments.")
agent_app = typer.Typer(no_args_is_help=True, help="Run an agent.")
ca_app = typer.Typer(no_args_is_help=True, help="Cluster certificate authority.")
ve_app = typer.Typer(no_args_is_help=True, help="Virtual environments, from any agent.")
cluster_app = typer.Typer(no_args_is_help=True, help="A local multi-site cluster of agent processes.")
sim_app = typer.Typer(no_args_is_help=True, help="Simulation campaigns that run the production code.")
overlay_app = typer.Typer(no_args_is_help=True, help="The overlays (Chord, Kademlia) and which one holds the records.")
kv_app = typer.Typer(no_args_is_help=True, help="Key/value records under kv/, on the bound overlay or a named one.")
for sub, name in ((agent_app, "agent"), (ca_app, "ca"), (ve_app, "ve"), (cluster_app, "cluster"), (sim_app, "sim"),
                  (overlay_app, "overlay"), (kv_app, "kv")):
    app.add_typer(sub, name=name)

console = Console(width=None if sys.stdout.isatty() else 160)  # pipes and logs: do not wrap at 80
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


def rpc(method: str, args: dict[str, Any] | None = None, timeout: float = 60.0) -> Any:
    try:
        return call(load_client_config(Options.config), Options.agent, method, args, timeout)
    except (RpcError, ConfigError, tls.TLSError) as err:  # RemoteError included: the agent's refusal
        raise fail(str(err)) from None


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


# -- agent ----------------------------------------------------------------------------------------

@agent_app.command("run")
def agent_run(config: Annotated[Path, typer.Option(help="agent.toml")],
              log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "info") -> None:
    """Run this node's agent until SIGTERM."""
    from agents.hypervisor.actor import HypervisorError
    from discovery import agent  # the whole agent: loaded only to run one

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if log_level.lower() != "debug":
        logging.getLogger("kademlia").setLevel(logging.WARNING)  # it logs every datagram at INFO
    try:
        agent.run(config)
    except (ConfigError, tls.TLSError, HypervisorError) as err:
        raise fail(str(err)) from None
    except OSError as err:  # e.g. the listen address is taken
        raise fail(f"{config}: {err.strerror or err}") from None


@app.command()
def members(as_json: JsonOpt = False) -> None:
    """Members of the cluster as this agent sees them (like `consul members`)."""
    rows = rpc("agent.members")
    emit(rows, as_json, make_table(["node", "site", "address", "status", "rtt ms"],
                                   [[m["name"], m["site"], m["addr"], m["status"], m["rtt_ms"]] for m in rows]))


@app.command()
def status(as_json: JsonOpt = False) -> None:
    """This agent's own view: ring neighbours, records held, restarts."""
    info = rpc("agent.status")
    emit(info, as_json, make_table(["field", "value"], [[k, v] for k, v in info.items()]))


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


# -- overlay and kv --------------------------------------------------------------------------------

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
    """Write VALUE under KEY (a new version)."""
    info = rpc("overlay.put", {"key": key, "value": value, "overlay": overlay})
    emit(info, as_json, make_table(["field", "value"], [[k, v] for k, v in info.items()]))


@kv_app.command("get")
def kv_get(key: str, overlay: OverlayOpt = None, as_json: JsonOpt = False) -> None:
    """Read KEY; exits 1 if it is absent."""
    info = rpc("overlay.get", {"key": key, "overlay": overlay})
    if not info["found"]:
        raise fail(f"no record under {key!r} on {info['overlay']}")
    if as_json:
        emit(info, True)
    else:
        print(info["value"])


# -- ca -------------------------------------------------------------------------------------------

@ca_app.command("init")
def ca_init(directory: Path) -> None:
    """Create a cluster CA in DIRECTORY."""
    try:
        print(tls.init_ca(directory))
    except tls.TLSError as err:
        raise fail(str(err)) from None


@ca_app.command("issue")
def ca_issue(directory: Path, name: str,
             role: Annotated[str, typer.Option(help="node, client or operator")] = "node",
             out: Annotated[Path | None, typer.Option(help="where to write NAME.pem/NAME.key")] = None) -> None:
    """Issue a certificate for NAME signed by the CA in DIRECTORY."""
    try:
        identity = tls.issue(directory, name, role, out_dir=out)
    except tls.TLSError as err:
        raise fail(str(err)) from None
    print(f"{identity.cert}\n{identity.key}")


# -- ve -------------------------------------------------------------------------------------------

def ve_table(ves: list[dict[str, Any]]) -> Table:
    """One row per VM; the live domain state appears when the agent looked it up (`ve show`), and the
    standby copies (with whether their node holds them, for `ve show`) when the VE has some."""
    live = any("domain_state" in slot for ve in ves for slot in ve["placement"].values())
    copies = any(ve.get("replicas") for ve in ves)
    rows = []
    for ve in ves:
        for vm, slot in sorted(ve["placement"].items()):
            row = [ve["name"], ve["state"], vm, slot["node"], slot["site"]]
            why = slot["why"]
            if slot.get("moving_to"):  # an interrupted relocation, settled by the next command on the VE
                why = f"moving to {slot['moving_to']['node']} ({slot['moving_to']['phase']}); {why}"
            if slot.get("failing_over"):  # an interrupted failover, likewise
                why = f"failing over to {slot['failing_over']['node']}; {why}"
            standbys = ", ".join(e["node"] + (f" ({e['standby']})" if e.get("standby", "held") != "held" else "")
                                 for e in ve.get("replicas", {}).get(vm, []))
            rows.append(row + ([slot.get("domain_state")] if live else []) + ([standbys] if copies else []) + [why])
    columns = (["ve", "state", "vm", "node", "site"] + (["domain"] if live else [])
               + (["standby copies"] if copies else []) + ["why there"])
    return make_table(columns, rows)


@ve_app.command("create")
def ve_create(spec_file: Path, as_json: JsonOpt = False) -> None:
    """Create and start the VE described by SPEC_FILE (YAML)."""
    try:
        spec = load_spec(spec_file)
    except SpecError as err:
        raise fail(str(err)) from None
    ve = rpc("ve.create", {"spec": spec.to_dict()})
    emit(ve, as_json, ve_table([ve]))


@ve_app.command("list")
def ve_list(
    limit: Annotated[int, typer.Option(min=1, max=1000, help="At most this many VEs (one page).")] = 100,
    cursor: Annotated[str | None, typer.Option(help="Start after the previous page: its next cursor.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """The VEs of the cluster (yours; every VE for an operator), a page at a time, from the directory's index.
    JSON: {"ves": [...], "next_cursor": C or null}."""
    page = rpc("ve.list", {"limit": limit, "cursor": cursor})
    emit(page, as_json, ve_table(page["ves"]))
    if not as_json and page["next_cursor"]:
        print(f"more: discovery ve list --cursor {page['next_cursor']}")


@ve_app.command("show")
def ve_show(name: str, as_json: JsonOpt = False) -> None:
    """One VE with the live state of each VM's domain."""
    ve = rpc("ve.show", {"name": name})
    emit(ve, as_json, ve_table([ve]))


@ve_app.command("locate")
def ve_locate(name: str, as_json: JsonOpt = False) -> None:
    """Which node hosts each VM of the VE, from the VE directory."""
    info = rpc("ve.locate", {"name": name})
    emit(info, as_json, make_table(["vm", "node", "site", "address", "standby copies"],
                                   [[vm, s["node"], s["site"], s["addr"],
                                     ", ".join(f"{r['node']} ({r['site']})" for r in s.get("replicas", []))]
                                    for vm, s in info["vms"].items()]))


@ve_app.command("relocate")
def ve_relocate(
    name: str,
    vm: Annotated[str | None, typer.Option("--vm", help="Move only this VM (default: every VM of the VE).")] = None,
    to: Annotated[str | None, typer.Option("--to", help="The node to move to.")] = None,
    site: Annotated[str | None, typer.Option("--site", help="The site to move to; placement picks the node.")] = None,
    method: Annotated[str, typer.Option(help="Real guests: auto (live where possible, else save/ship/restore), "
                                              "live, or ship.")] = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Move a VM (or the whole VE) to another node or site, keeping the VE's constraints; safe to retry."""
    if (to is None) == (site is None):
        print("error: give either --to NODE or --site SITE", file=sys.stderr)
        raise typer.Exit(2)
    ve = rpc("ve.relocate", {"name": name, "vm": vm, "to": to, "site": site, "method": method}, timeout=600)
    emit(ve, as_json, ve_table([ve]))
    if not as_json:
        how = {vm: ve["placement"][vm].get("transfer") for vm in ve["moved"]}
        moved = [f"{vm} ({t['how']}, {t['seconds']:.1f} s)" if t else vm for vm, t in how.items()]
        print(f"moved: {', '.join(moved)}" if moved else "nothing to move: already there")


@ve_app.command("snapshot")
def ve_snapshot(name: str, tag: Annotated[str | None, typer.Option("--tag", help="Default: snap-<UTC time>.")] = None,
                as_json: JsonOpt = False) -> None:
    """Snapshot every VM of the VE at once (running VMs are paused meanwhile)."""
    snap = rpc("ve.snapshot", {"name": name, "tag": tag}, timeout=300)
    emit(snap, as_json, make_table(["ve", "tag", "vm", "node", "state"],
                                   [[snap["name"], snap["tag"], vm, s["node"], s["state"]]
                                    for vm, s in snap["vms"].items()]))


@ve_app.command("snapshots")
def ve_snapshots(name: str, as_json: JsonOpt = False) -> None:
    """The snapshots of the VE, oldest first (each VM's node is where it was when the snapshot was taken)."""
    info = rpc("ve.snapshots", {"name": name})
    rows = [[s["tag"], time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["time"])), s["state"],
             ", ".join(f"{vm}@{v['node']} ({v['state']})" for vm, v in sorted(s["vms"].items()))]
            for s in info["snapshots"]]
    emit(info, as_json, make_table(["tag", "time", "ve state", "vms"], rows))


@ve_app.command("restore")
def ve_restore(name: str, tag: str, as_json: JsonOpt = False) -> None:
    """Bring every VM of the VE back to snapshot TAG."""
    ve = rpc("ve.restore", {"name": name, "tag": tag}, timeout=300)
    emit(ve, as_json, make_table(["ve", "state", "restored"], [[ve["name"], ve["state"], tag]]))


@ve_app.command("snapshot-delete")
def ve_snapshot_delete(name: str, tag: str, as_json: JsonOpt = False) -> None:
    """Delete snapshot TAG of the VE from every VM's host (wherever the VM is now); safe to retry."""
    info = rpc("ve.snapshot_delete", {"name": name, "tag": tag}, timeout=300)
    left = ", ".join(s["tag"] for s in info["snapshots"]) or None
    emit(info, as_json, make_table(["ve", "deleted", "snapshots left"], [[info["name"], info["tag"], left]]))


@ve_app.command("replicate")
def ve_replicate(
    name: str,
    copies: Annotated[int, typer.Option("--copies", help="Standby copies per VM; 0 drops them all.")],
    as_json: JsonOpt = False,
) -> None:
    """Keep COPIES standby copies of each VM on other nodes, other sites first (again: refresh them)."""
    ve = rpc("ve.replicate", {"name": name, "copies": copies}, timeout=300)
    emit(ve, as_json, ve_table([ve]))
    if not as_json:
        for what, nodes in (("added", ve["added"]), ("dropped", ve["dropped"])):
            if nodes:
                print(f"{what}: " + "; ".join(f"{vm} on {', '.join(on)}" for vm, on in sorted(nodes.items())))


@ve_app.command("failover")
def ve_failover(
    name: str,
    vm: Annotated[str | None, typer.Option("--vm", help="Only this VM (default: every VM whose host is down).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Even if the host is alive: its copy is switched off "
                                                         "first.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Bring the VMs whose host is down back up on their nearest standby copy, in the VE's state."""
    ve = rpc("ve.failover", {"name": name, "vm": vm, "force": force}, timeout=300)
    emit(ve, as_json, ve_table([ve]))
    if not as_json:
        print("failed over: " + ", ".join(f"{v} to {node}" for v, node in ve["failed_over"].items()))


@ve_app.command("stop")
def ve_stop(
    name: str,
    timeout: Annotated[float | None, typer.Option(
        "--timeout", help="Seconds each guest has to power off before it is forced (default 30, at most 600).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Force the VMs off at once.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Shut the VE's VMs down gracefully, each forced off after a timeout (or at once with --force)."""
    if force and timeout is not None:
        print("error: give --timeout or --force, not both", file=sys.stderr)
        raise typer.Exit(2)
    wait = 60 + 10 * (timeout or 30)  # the VMs of one host stop one after the other
    ve = rpc("ve.stop", {"name": name, "timeout": timeout, "force": force}, timeout=wait)
    emit(ve, as_json, make_table(["ve", "state"], [[ve["name"], ve["state"]]]))


def _lifecycle(verb: str) -> None:
    def command(name: str, as_json: JsonOpt = False) -> None:
        ve = rpc(f"ve.{verb}", {"name": name})
        emit(ve, as_json, make_table(["ve", "state"], [[ve["name"], ve["state"]]]))

    command.__doc__ = {"start": "Start every VM of the VE.", "suspend": "Pause every VM of the VE (memory kept).",
                       "resume": "Run the VE's paused VMs again.",
                       "destroy": "Remove the VE, its VMs and their standby copies."}[verb]
    ve_app.command(verb)(command)


for _verb in ("start", "suspend", "resume", "destroy"):
    _lifecycle(_verb)


# -- cluster --------------------------------------------------------------------------------------

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
    try:
        state = local_cluster.up(directory, nodes, sites, vcpus=vcpus, memory_mb=memory_mb,
                                 local_rtt_ms=local_rtt_ms, hypervisor=hypervisor,
                                 dvms=local_cluster.dvms_table(dvms or []))
    except (local_cluster.ClusterError, tls.TLSError) as err:
        raise fail(str(err)) from None
    emit(state, as_json, make_table(["node", "site", "address", "pid"],
                                    [[n["name"], n["site"], n["addr"], n["pid"]] for n in state["nodes"]]))
    if not as_json:
        print(f"client config: {state['client_config']} (also the default for this user)")


@cluster_app.command("status")
def cluster_status(directory: Annotated[Path, typer.Option("--dir")], as_json: JsonOpt = False) -> None:
    """Process and ring state of each agent of the local cluster."""
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
    try:
        stopped = local_cluster.down(directory)
    except local_cluster.ClusterError as err:
        raise fail(str(err)) from None
    print(f"stopped {len(stopped)} agents")


# -- sim ------------------------------------------------------------------------------------------

@sim_app.command("vivaldi")
def sim_vivaldi(
    matrix: Annotated[Path, typer.Option(help="Measured RTT matrix (see shared/data/rtt).")],
    rounds: Annotated[int, typer.Option(min=1, help="Rounds; one sample per node per round.")] = 200,
    neighbours: Annotated[int, typer.Option(min=1, help="Peers each node samples from.")] = 32,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 1,
    ablations: Annotated[bool, typer.Option(help="Also run with each ingredient switched off.")] = False,
    plot: Annotated[Path | None, typer.Option(help="Write the map and convergence curves to this PNG.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run the production Vivaldi code on every node of a measured RTT matrix, beside the 2-D baseline."""
    from vivaldi import sim as sim_vivaldi

    try:
        result = sim_vivaldi.campaign(str(matrix), rounds, neighbours, seed, ablations=ablations)
    except (OSError, ValueError) as err:
        raise fail(f"{matrix}: {err}") from None
    if plot is not None:
        sim_vivaldi.plot(result, str(plot))
    summary = sim_vivaldi.summary(result)
    if as_json:
        emit(summary, True)
        return
    rows = [[name, f"{r['median_relative_error']:.4f}", f"{r['p90_relative_error']:.4f}",
             f"{r['p99_relative_error']:.4f}"] for name, r in summary["runs"].items()]
    console.print(make_table(["configuration", "median rel. error", "p90", "p99"], rows))


@sim_app.command("spiral")
def sim_spiral(
    matrix: Annotated[Path, typer.Option(help="Measured RTT matrix (see shared/data/rtt).")],
    count: Annotated[int, typer.Option(min=1, help="Nodes each spiral looks for.")] = 10,
    view: Annotated[int, typer.Option(min=1, help="Near entries in each node's view.")] = 16,
    far: Annotated[int, typer.Option(min=0, help="Random far entries in each view.")] = 4,
    spirals: Annotated[int, typer.Option(min=1, help="Spirals measured per point of the learning curve.")] = 200,
    learning_rounds: Annotated[int, typer.Option(min=0, help="Rounds of one spiral from every node.")] = 4,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 1,
    initial_view: Annotated[str, typer.Option(
        help="coordinates: every member known, the nearest by estimate probed (an agent); random: 32 random "
             "members (the baseline).")] = "coordinates",
    view_probes: Annotated[int, typer.Option(min=0, help="Nearest members by estimate each node probes "
                                                           "(initial view 'coordinates').")] = 40,
    plot: Annotated[Path | None, typer.Option(help="Write the learning curves to this PNG.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Recall of the true nearest nodes found by the spiral search, before and after learning."""
    from overlay.sim import spiral as sim

    try:
        result = sim.run(str(matrix), count, view, far, spirals, learning_rounds, seed,
                         initial_view=initial_view, view_probes=view_probes)
    except (OSError, ValueError) as err:
        raise fail(f"{matrix}: {err}") from None
    if plot is not None:
        sim.plot(result, str(plot))
    rows = [[name, f"{r['without_learning']['recall']:.3f}", f"{r['after_learning']['recall']:.3f}",
             f"{r['messages']['search_without_learning']:.1f}", f"{r['messages']['view_probes_once_per_node']:.1f}",
             f"{r['messages']['search_after_learning']:.1f}"] for name, r in result["oracles"].items()]
    emit(result, as_json, make_table(["distance oracle", "recall, no learning", "recall, after learning",
                                      "messages per spiral", "view probe messages per node (once)",
                                      "messages per spiral, after learning"], rows))


@sim_app.command("dvms")
def sim_dvms(
    nodes: Annotated[int, typer.Option(min=2, help="Simulated nodes (8 vCPUs, 32 GiB each).")] = 64,
    vms_per_node: Annotated[int, typer.Option(min=1, help="VMs per node at the start.")] = 10,
    sites: Annotated[int, typer.Option(min=1, help="Sites (clusters of nodes).")] = 4,
    duration: Annotated[float, typer.Option(min=1, help="Simulated seconds.")] = 600.0,
    scheduler: Annotated[str, typer.Option(help="dvms, centralized or both.")] = "dvms",
    route: Annotated[str, typer.Option(help="DVMS partitions grow along the spiral (then the ring), the ring "
                                            "only, or both (one run each).")] = "spiral",
    rate: Annotated[float, typer.Option(min=0, help="Load changes per VM per second (Poisson λ).")] = 1 / 30,
    mean: Annotated[float, typer.Option(help="Mean VM load, % of a vCPU.")] = 70.0,
    std: Annotated[float, typer.Option(min=0.1, help="Standard deviation of the VM load, % of a vCPU.")] = 30.0,
    underload: Annotated[float, typer.Option(min=0, max=0.89, help="Underload threshold: a node below it is "
                                                                   "emptied (0: no consolidation).")] = 0.0,
    period: Annotated[float, typer.Option(min=1, help="Seconds between two centralized solves.")] = 30.0,
    time_limit: Annotated[float, typer.Option(min=0, help="Solver time limit per partition (s).")] = 0.2,
    central_time_limit: Annotated[float, typer.Option(min=0, help="Solver time limit, centralized (s).")] = 1.0,
    engine: Annotated[str, typer.Option(help="Solver engine: auto, greedy or cp-sat.")] = "auto",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 1,
    plot: Annotated[Path | None, typer.Option(help="Write overloaded nodes over time to this PNG.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Overloads repaired by DVMS partitions (production ISP cores, real solver) or a periodic centralized solver."""
    from dvms import sim

    if scheduler not in (*sim.SCHEDULERS, "both"):
        raise fail(f"--scheduler must be one of {', '.join(sim.SCHEDULERS)} or both, not {scheduler!r}")
    if route not in (*sim.ROUTES, "both"):
        raise fail(f"--route must be one of {', '.join(sim.ROUTES)} or both, not {route!r}")
    routes = sim.ROUTES if route == "both" else (route,)
    runs = {(f"dvms-{r}" if len(routes) > 1 else "dvms") if s == "dvms" else s: (s, r)
            for s in (sim.SCHEDULERS if scheduler == "both" else (scheduler,))
            for r in (routes if s == "dvms" else routes[:1])}
    try:
        results = {name: sim.run(nodes, vms_per_node, sites, duration, s, seed, route=r, rate=rate, mean=mean,
                                 std=std, underload=underload, period=period, time_limit=time_limit,
                                 central_time_limit=central_time_limit, engine=engine)
                   for name, (s, r) in runs.items()}
    except ValueError as err:
        raise fail(str(err)) from None
    if plot is not None:
        sim.plot(results, str(plot))
    keys = ("solves", "migrations", "inter_site_share", "overload_node_seconds")
    rows = [[name, *(r[k] for k in keys), r["solve_seconds"].get("mean"), len(r["check_failures"])]
            for name, r in results.items()]
    emit(results if len(results) > 1 else next(iter(results.values())), as_json,
         make_table(["run", *keys, "mean solve s", "check failures"], rows))


@sim_app.command("overlay")
def sim_overlay(
    nodes: Annotated[int, typer.Option(min=2, help="Simulated agents.")] = 1000,
    matrix: Annotated[Path | None, typer.Option(help="RTT matrix for latencies (default: the site model).")] = None,
    churn: Annotated[float, typer.Option(min=0, max=1, help="Share of nodes replaced per minute.")] = 0.0,
    duration: Annotated[float, typer.Option(min=1, help="Simulated seconds.")] = 600.0,
    lookups: Annotated[float, typer.Option(min=0.1, help="Lookups per simulated second.")] = 20.0,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 1,
    pns: Annotated[bool, typer.Option(help="Fingers prefer the nearest acceptable node (by RTT).")] = False,
    fingers: Annotated[bool, typer.Option(help="Finger tables (off: successor lists only).")] = True,
    learning: Annotated[bool, typer.Option(help="Lookups teach long links to the nodes involved.")] = True,
    plot: Annotated[Path | None, typer.Option(help="Write the hop distribution to this PNG.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run the production Chord code on NODES simulated agents (virtual clock, in-memory network)."""
    from overlay.sim import ring as sim

    try:
        result = sim.simulate(nodes, duration, str(matrix) if matrix else None, churn, seed, lookups, pns=pns,
                              fingers=fingers, learning=learning)
    except (OSError, ValueError) as err:
        raise fail(f"{matrix}: {err}") from None
    if plot is not None:
        sim.plot(result, str(plot))
    emit(result, as_json, make_table(["metric", "value"], [[k, v] for k, v in result.items() if k != "hop_histogram"]))


def main() -> None:
    app()


# -- dvms -----------------------------------------------------------------------------------------

dvms_app = typer.Typer(no_args_is_help=True, help="DVMS: the partitions that relieve overloaded nodes (and, "
                                                   "when configured, empty underloaded ones).")
app.add_typer(dvms_app, name="dvms")


@dvms_app.command("status")
def dvms_status(every: Annotated[bool, typer.Option("--all", help="Ask every member, not only the agent.")] = False,
                events: Annotated[int, typer.Option(help="Also show this many recent events (problem, created, "
                                                         "plan, migrated, ended...), per node.")] = 0,
                as_json: JsonOpt = False) -> None:
    """The agent's DVMS view: its load, the partition it is in, the partitions it led (with the problem that
    started each: overload or underload, and how it ended; the last three in the table) and recent events."""
    from rich.markup import escape  # event details name rule groups, [a, b], which rich reads as markup

    if every:
        answers = [_dvms_at(m["addr"], "dvms.status") for m in rpc("agent.members") if m["status"] == "alive"]
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
    answer = _dvms_at(slot["addr"], "dvms.load", {"vm": vm, "cpu": cpu})
    emit(answer, as_json, make_table(["vm", "node", "cpu"], [[vm, answer["node"], "-" if unpin else cpu]]))


@dvms_app.command("capacity")
def dvms_capacity(cpu: Annotated[int, typer.Argument(help="Percent of one vCPU (16 vCPUs: 1600).", min=1)],
                  as_json: JsonOpt = False) -> None:
    """Set the CPU capacity DVMS counts for the agent's node (a test hook: a node made to look smaller, so
    that pinned demand can overload it)."""
    answer = rpc("dvms.load", {"cpu_capacity": cpu})
    emit(answer, as_json, make_table(["node", "cpu capacity"], [[answer["node"], answer["cpu_capacity"]]]))


def _dvms_at(addr: str, method: str, args: dict[str, Any] | None = None) -> Any:
    try:
        return call(load_client_config(Options.config), addr, method, args, 30.0)
    except (RpcError, ConfigError, tls.TLSError) as err:
        raise fail(f"{addr}: {err}") from None
