"""`discovery campaign run`: a scenario on a real deployment (the testbed, or hosts an inventory lists), from
bring-up to teardown, and its results folder (`discovery.campaign`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from discovery.cli.app import JsonOpt, Options, emit, fail, make_table

campaign_app = typer.Typer(no_args_is_help=True,
                           help="Campaigns on a real deployment: workload, faults, results with plots.")


@campaign_app.command("run")
def campaign_run(
    file: Annotated[Path, typer.Argument(help="The campaign (YAML; see examples/campaigns/).")],
    out: Annotated[Path, typer.Option("--out", help="The results folder: raw.json, figures.json, plots, "
                                                    "summary.md.")],
    testbed: Annotated[Path | None, typer.Option(
        "--testbed", help="Run on the testbed in this directory (brought up as the file says if it is not).")] = None,
    hosts: Annotated[Path | None, typer.Option(
        "--hosts", help="Run on the hosts this Ansible inventory (YAML) lists, their agents already running.")] = None,
    keep: Annotated[bool, typer.Option(help="Leave up a testbed this run brought up.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Run campaign FILE: its workload and timed faults on the deployment, sampling the cluster throughout;
    then write the results folder and print the main figures."""
    import trio

    from discovery.campaign import report
    from discovery.campaign.runner import Runner
    from discovery.campaign.spec import check_targets, load_campaign
    from discovery.campaign.targets import Hosts, Target, TargetError, Testbed
    from discovery.toml_config import ConfigError
    from discovery.yamlfields import FieldError

    if (testbed is None) == (hosts is None):
        raise fail("give --testbed DIR or --hosts INVENTORY")
    try:
        campaign = load_campaign(file)
        target: Target = (Hosts(hosts, Options.config) if hosts is not None
                          else Testbed(testbed or Path("."), campaign.testbed, keep))
    except (FieldError, TargetError, ConfigError) as err:
        raise fail(str(err)) from None
    try:
        check_targets(campaign, [(node.name, node.site) for node in target.nodes])
        raw = trio.run(Runner(campaign, target, lambda line: print(line, file=sys.stderr)).run)
    except FieldError as err:
        raise fail(f"{file}: {err}") from None
    finally:
        target.close()
    found = report.write(raw, out)
    rows = [[op, row["count"], row["ok"], row["failed"], row["p50_s"], row["max_s"]]
            for op, row in found["operations"].items()]
    emit({k: found[k] for k in ("operations", "recovery", "max_overloaded", "migrations")}, as_json,
         make_table(["operation", "count", "ok", "failed", "p50 (s)", "max (s)"], rows))
    if not as_json:
        rec = found["recovery"]
        serving = (f"; serving again p50 {rec['serving_p50_s']} s, max {rec['serving_max_s']} s"
                   if found["serving"] else "")
        print(f"recovered: {rec['count']} VEs, p50 {rec['p50_s']} s, max {rec['max_s']} s{serving}; "
              f"not within the campaign: {rec['not_recovered']}; results in {out}/summary.md")
