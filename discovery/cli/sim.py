"""`discovery sim`: simulation campaigns that run the production cores; each module sits beside its core."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from discovery.cli.app import JsonOpt, console, emit, fail, make_table

sim_app = typer.Typer(no_args_is_help=True, help="Simulation campaigns that run the production code.")


UnitOpt = Annotated[str | None, typer.Option(
    "--unit", help="The matrix's unit, ms or s (default: the data README's rule: planetlab files ms, seattle "
                   "files s, others by magnitude).")]


def check_unit(unit: str | None) -> None:
    if unit not in (None, "ms", "s"):
        raise fail(f"--unit must be ms or s, not {unit!r}")


@sim_app.command("vivaldi")
def sim_vivaldi(
    matrix: Annotated[Path, typer.Option(help="Measured RTT matrix (see shared/data/rtt).")],
    rounds: Annotated[int, typer.Option(min=1, help="Rounds; one sample per node per round.")] = 200,
    neighbours: Annotated[int, typer.Option(min=1, help="Peers each node samples from.")] = 32,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 1,
    ablations: Annotated[bool, typer.Option(help="Also run with each ingredient switched off.")] = False,
    plot: Annotated[Path | None, typer.Option(help="Write the map and convergence curves to this PNG.")] = None,
    unit: UnitOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Run the production Vivaldi code on every node of a measured RTT matrix, beside the 2-D baseline."""
    from vivaldi import sim as sim_vivaldi

    check_unit(unit)
    try:
        result = sim_vivaldi.campaign(str(matrix), rounds, neighbours, seed, ablations=ablations, unit=unit)
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
    unit: UnitOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Recall of the true nearest nodes found by the spiral search, before and after learning."""
    from overlay.sim import spiral as sim

    check_unit(unit)
    try:
        result = sim.run(str(matrix), count, view, far, spirals, learning_rounds, seed,
                         initial_view=initial_view, view_probes=view_probes, unit=unit)
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


@sim_app.command("ha")
def sim_ha(
    trials: Annotated[int, typer.Option(min=1, help="Random fault schedules to run.")] = 20,
    nodes: Annotated[int, typer.Option(min=4, max=32, help="Simulated agents.")] = 6,
    sites: Annotated[int, typer.Option(min=1, help="Sites.")] = 2,
    ves: Annotated[int, typer.Option(min=1, help="Protected VEs (one VM each).")] = 4,
    loss: Annotated[float, typer.Option(min=0, max=0.5, help="Share of messages lost while faults last.")] = 0.0,
    faults: Annotated[int, typer.Option(min=1, max=10, help="At most this many faults per schedule.")] = 3,
    kinds: Annotated[str, typer.Option(help="Comma-separated fault kinds drawn from: crash, isolate, "
                                            "isolate_site, cut_out, cut_in, flap.")] = "all",
    seed: Annotated[int, typer.Option(help="Seed of the first trial (trial i: seed + i).")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """The HA protocol (leases, watchers, fencing) on production SWIM and the directory, under virtual time:
    crashes, partitions (one way too), flapping links and loss; counts double runs and VEs left down."""
    from discovery.ha import sim

    if sites > nodes:
        raise fail("--sites must not exceed --nodes")
    chosen = sim.KINDS if kinds == "all" else tuple(k.strip() for k in kinds.split(","))
    if unknown := [k for k in chosen if k not in sim.KINDS]:
        raise fail(f"--kinds: unknown {', '.join(unknown)}; choose from {', '.join(sim.KINDS)}")
    result = sim.campaign(trials, seed, nodes, sites, ves, loss, faults, kinds=chosen)
    keys = ("trials", "double_run_trials", "not_running_trials", "revocations", "recoveries")
    emit(result, as_json, make_table(["metric", "value"], [[k, result[k]] for k in keys]
                                     + [[f"outage {k} (s)", v] for k, v in result["outage_s"].items()]))


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
    unit: UnitOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Run the production Chord code on NODES simulated agents (virtual clock, in-memory network)."""
    from overlay.sim import ring as sim

    check_unit(unit)
    try:
        result = sim.simulate(nodes, duration, str(matrix) if matrix else None, churn, seed, lookups, pns=pns,
                              fingers=fingers, learning=learning, unit=unit)
    except (OSError, ValueError) as err:
        raise fail(f"{matrix}: {err}") from None
    if plot is not None:
        sim.plot(result, str(plot))
    emit(result, as_json, make_table(["metric", "value"], [[k, v] for k, v in result.items() if k != "hop_histogram"]))


@sim_app.command("pull", context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                           "help_option_names": []})
def sim_pull(ctx: typer.Context) -> None:
    """Run the production pull scheduler (`images.pulling`) against simulated holders on a virtual clock; its
    options are `python -m images.sim`'s (--size-mib, --holders MB/s,..., --kill I@S, --liar I, --json; -h)."""
    from images import sim

    sim.main(ctx.args)
