"""`discovery testbed`: a multi-site cluster of agents in network namespaces, with real latency, bandwidth
limits and partitions (`discovery.testbed`). Needs root."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from discovery.cli.app import JsonOpt, emit, fail, make_table
from discovery.cli.sim import UnitOpt, check_unit

testbed_app = typer.Typer(no_args_is_help=True, help="A multi-site testbed of agents in network namespaces (root).")
DirOpt = Annotated[Path, typer.Option("--dir", help="Where the testbed keeps everything.")]


@testbed_app.command("up")
def testbed_up(
    directory: DirOpt,
    nodes: Annotated[int, typer.Option(help="How many agents, each in a network namespace.")] = 6,
    sites: Annotated[int, typer.Option(help="How many sites (bridges joined by the router).")] = 3,
    site_rtt: Annotated[float | None, typer.Option(help="The same RTT between every two sites, ms.")] = None,
    rtt: Annotated[Path | None, typer.Option(help="A measured RTT matrix (see shared/data/rtt): its first "
                                                  "SITES rows are the sites' RTTs.")] = None,
    unit: UnitOpt = None,
    bandwidth: Annotated[float, typer.Option(help="Each node's link, both ways, Mbit/s.")] = 100.0,
    hypervisor: Annotated[str, typer.Option(
        help="test (libvirt's test driver) or qemu (real guests: each node a host, its agent on the host's "
             "system libvirtd, qemu:///system, listening on its address).")] = "test",
    image_copies: Annotated[int, typer.Option(help="With qemu: how many nodes hold the tiny guest's image (`tiny`) "
                                                   "at first; the others pull it when they need it.")] = 3,
    wait: Annotated[float, typer.Option(help="Seconds to wait for the agents to converge.")] = 60.0,
    bare: Annotated[bool, typer.Option(help="No agents: each node a host with its own sshd and /etc/discovery, "
                                            "/var/lib/discovery..., listed in DIR/hosts.yml (an Ansible inventory) "
                                            "for deploying agents with deploy/ansible.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Build the namespaces, router, links and delay relay; start one agent per node (or an sshd: --bare)."""
    from discovery.cli import local_cluster
    from discovery.testbed import bed, hosts, net, plan

    check_unit(unit)
    if site_rtt is not None and rtt is not None:
        raise fail("--site-rtt or --rtt, not both")
    try:
        names = plan.site_names(sites)
        if site_rtt is not None:
            matrix = plan.uniform_rtt(sites, site_rtt)
        elif rtt is not None:
            from vivaldi.sim import load_matrix  # numpy: only for a matrix file

            try:
                matrix = plan.matrix_rtt((load_matrix(rtt, unit) * 1000).tolist(), sites)  # it reads seconds
            except (OSError, ValueError) as err:
                raise fail(f"{rtt}: {err}") from None
        else:
            matrix = plan.default_rtt(names)
        state = bed.up(directory, plan.make_plan(nodes, names, matrix, bandwidth), hypervisor=hypervisor, wait=wait,
                       bare=bare, image_copies=image_copies)
    except (plan.SpecError, bed.TestbedError, net.NetError, local_cluster.ClusterError, hosts.HostsError) as err:
        raise fail(str(err)) from None
    emit(state["nodes"], as_json, make_table(["node", "site", "address", "pid"],
                                             [[n["name"], n["site"], n["address"], n["pid"]] for n in state["nodes"]]))
    if as_json:
        return
    if bare:
        print(f"inventory: {state['inventory']}")
    else:
        print(f"client config: {state['client_config']} (also the default for this user)")


def _run(what: str, directory: Path, *args: Any) -> Any:
    from discovery.testbed import bed, net

    try:
        return getattr(bed, what)(directory, *args)
    except (bed.TestbedError, net.NetError) as err:
        raise fail(str(err)) from None


@testbed_app.command("status")
def testbed_status(directory: DirOpt, as_json: JsonOpt = False) -> None:
    """Namespaces, the relay and its packets (forwarded, dropped), partitions, each agent's process and answer."""
    state = _run("status", directory)
    emit(state, as_json, make_table(
        ["node", "site", "address", "pid", "namespace", "process", "answers"],
        [[n["name"], n["site"], n["address"], n["pid"], n["namespace_up"], n["process"], n["answers"]]
         for n in state["nodes"]]))
    if not as_json:
        cuts = ", ".join(p["target"] + (" (one way)" if p["oneway"] else "") for p in state["partitions"])
        router = 'up' if state['router_up'] else 'gone'
        print(f"router: {router}, relay: {state['relay']}, partitions: {cuts or 'none'}")
        if (packets := state["relay_packets"]) is not None:
            dropped = packets["dropped"]
            reasons = ", ".join(f"{reason} {n}" for reason, n in dropped.items())
            print(f"relay packets: forwarded {packets['forwarded']}, held {packets['held']}, "
                  f"dropped {sum(n or 0 for n in dropped.values())} ({reasons})")


@testbed_app.command("partition")
def testbed_partition(
    target: Annotated[str, typer.Argument(help="A node (node3) or a site (lyon).")],
    directory: DirOpt,
    oneway: Annotated[bool, typer.Option(help="Drop only what TARGET sends (it still hears the others).")] = False,
) -> None:
    """Cut TARGET off from the rest of the testbed (the root namespace included), in the router."""
    rules = _run("partition", directory, target, oneway)
    print(f"{target} partitioned{' one way' if oneway else ''} ({len(rules)} rules)")


@testbed_app.command("heal")
def testbed_heal(directory: DirOpt) -> None:
    """Remove every partition."""
    print(f"healed ({_run('heal', directory)} rules removed)")


@testbed_app.command("validate")
def testbed_validate(
    directory: DirOpt,
    seconds: Annotated[float, typer.Option(help="Seconds of each bandwidth probe.")] = 2.0,
    as_json: JsonOpt = False,
) -> None:
    """Measure RTT and bandwidth between the sites and compare them with the spec (±10 %)."""
    report = _run("validate", directory, seconds)
    emit(report, as_json, make_table(
        ["from", "to", "rtt ms", "spec", "ok", "Mbit/s", "spec", "ok"],
        [[p["from"], p["to"], p["rtt_ms"], p["spec_rtt_ms"], p["rtt_ok"], p["mbit"], p["spec_mbit"], p["mbit_ok"]]
         for p in report["pairs"]]))
    if not report["ok"]:
        raise typer.Exit(1)


@testbed_app.command("down")
def testbed_down(
    directory: Annotated[Path | None, typer.Option("--dir", help="The testbed's directory; without it, remove "
                                                                 "whatever a crashed testbed left.")] = None,
) -> None:
    """Stop the agents and relay; remove every namespace, bridge and veth of the testbed."""
    from discovery.testbed import bed, net

    try:
        removed = bed.down(directory) if directory is not None else bed.teardown(None)
    except (bed.TestbedError, net.NetError) as err:
        raise fail(str(err)) from None
    print(f"removed {len(removed)} namespaces and links")
