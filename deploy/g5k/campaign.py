"""A Discovery campaign on Grid'5000 with EnOSlib: reserve nodes over several sites (or take machines already
up: EnOSlib's Static provider), deploy the agents with the `discovery_agent` Ansible role, run a campaign file
with `discovery campaign run --hosts`, and bring back its results folder and every agent's log.

    python deploy/g5k/campaign.py g5k --site rennes:paravance:2 --site lyon:nova:2 --site nancy:gros:2 \\
        --walltime 01:30:00 --campaign examples/campaigns/ci.yaml --out results/
    python deploy/g5k/campaign.py static --machines machines.yaml --campaign examples/campaigns/ci.yaml \\
        --out results/

`machines.yaml` (static) lists `{alias, address, site, user, keyfile, port}` per machine. EnOSlib is optional
and its pins are older than Discovery's (rich 12, ansible-core 2.17): it lives in a venv of its own
(`pip install -r deploy/g5k/requirements.txt`), and the `discovery` CLI this script calls (`--discovery`, a
command line) lives in another.

What it does, in order: EnOSlib provisions (G5k: a job with one `prod` network per site, nodes tagged with
their site's role; Static: the machines given); the script writes one YAML inventory, used both by the role
(`en.run_ansible` on deploy/ansible/site.yml, with the role's variables per host: site, address, metrics on
that address) and by the campaign (`--hosts`); it runs the campaign with the operator's client config the
role wrote beside its CA on this machine; it fetches /var/log/discovery/agent.log
of every node into OUT/logs/; a G5k job is released unless `--keep`.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
SITE_PLAYBOOK = ROOT / "deploy" / "ansible" / "site.yml"
GROUP = "discovery_agents"
METRICS_PORT = 9464


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="provider", required=True)
    g5k = sub.add_parser("g5k", help="reserve nodes on Grid'5000")
    g5k.add_argument("--site", action="append", required=True, metavar="SITE:CLUSTER:NODES",
                     help="nodes to reserve on one site's cluster (repeat per site)")
    g5k.add_argument("--walltime", default="01:00:00")
    g5k.add_argument("--job-name", default="discovery")
    g5k.add_argument("--keep", action="store_true", help="leave the job running at the end")
    static = sub.add_parser("static", help="machines already up (EnOSlib's Static provider)")
    static.add_argument("--machines", type=Path, required=True, help="YAML list of {alias, address, site, user, "
                                                                     "keyfile, port}")
    for each in (g5k, static):
        each.add_argument("--campaign", type=Path, required=True)
        each.add_argument("--out", type=Path, required=True)
        each.add_argument("--discovery", default="discovery", help="the discovery CLI to run (a command line)")
        each.add_argument("--var", action="append", default=[], metavar="KEY=VALUE",
                          help="a variable for every host (the role's, or the campaign's fault commands)")
    return parser.parse_args(argv)


def provision(args: argparse.Namespace) -> tuple[list[dict[str, Any]], Any]:
    """The hosts as {alias, address, site, user, port, keyfile}, and the provider (to release a G5k job)."""
    import enoslib as en

    if args.provider == "g5k":
        provider = en.G5k(g5k_conf(args.site, args.job_name, args.walltime))
        sites = [entry.split(":")[0] for entry in args.site]
    else:
        machines = yaml.safe_load(args.machines.read_text())
        conf = en.StaticConf.from_settings()
        for m in machines:
            conf.add_machine(address=m["address"], alias=m["alias"], roles=[GROUP, m["site"]], user=m.get("user"),
                             keyfile=m.get("keyfile"), port=m.get("port"))
        conf.add_network(roles=["net"], cidr="0.0.0.0/0", gateway="0.0.0.0", dns="0.0.0.0")
        provider = en.Static(conf.finalize())
        sites = sorted({m["site"] for m in machines})
    roles, _ = provider.init()
    hosts = []
    for host in roles[GROUP]:
        site = next(s for s in sites if host in roles[s])
        hosts.append({"alias": host.alias, "address": host.address, "site": site, "user": host.user or "root",
                      "port": host.port or 22, "keyfile": host.keyfile})
    return hosts, provider


def g5k_conf(entries: list[str], job_name: str, walltime: str) -> Any:
    """EnOSlib's finalized G5k configuration for `entries` (SITE:CLUSTER:NODES): a deploy job on debian12-nfs,
    one `prod` network per site, each site's nodes tagged GROUP and the site. Each machine is given its site,
    which EnOSlib would otherwise ask Grid'5000's API for (it still asks whether each cluster is exotic)."""
    import enoslib as en

    conf = en.G5kConf.from_settings(job_name=job_name, walltime=walltime, job_type=["deploy"],
                                    env_name="debian12-nfs")
    for entry in entries:
        site, cluster, nodes = entry.split(":")
        network = en.G5kNetworkConf(type="prod", roles=[f"net-{site}"], site=site)
        conf.add_network_conf(network).add_machine(roles=[GROUP, site], cluster=cluster, site=site,
                                                   nodes=int(nodes), primary_network=network)
    return conf.finalize()


def inventory(hosts: list[dict[str, Any]], extra: dict[str, str]) -> dict[str, Any]:
    """One YAML inventory for the role and the campaign: the role's variables per host."""
    return {"all": {"children": {GROUP: {"hosts": {
        h["alias"]: {"ansible_host": h["address"], "ansible_user": h["user"], "ansible_port": h["port"],
                     **({"ansible_ssh_private_key_file": h["keyfile"]} if h["keyfile"] else {}),
                     "discovery_agent_site": h["site"], "discovery_agent_address": h["address"],
                     "discovery_agent_metrics": f"{h['address']}:{METRICS_PORT}", **extra}
        for h in hosts}}}}}


def run(command: list[str]) -> None:
    print("+", shlex.join(command), file=sys.stderr)
    subprocess.run(command, check=True)


def main(argv: list[str]) -> int:
    import enoslib as en

    args = parse(argv)
    extra = {key: yaml.safe_load(value) for key, _, value in (var.partition("=") for var in args.var)}  # as YAML
    args.out.mkdir(parents=True, exist_ok=True)
    hosts, provider = provision(args)
    try:
        path = args.out / "inventory.yml"
        path.write_text(yaml.safe_dump(inventory(hosts, extra), sort_keys=False))
        en.run_ansible([str(SITE_PLAYBOOK)], inventory_path=str(path))
        cli = shlex.split(args.discovery)
        config = path.parent / "discovery-ca" / "client.toml"  # the operator's, written by the role beside its CA
        run([*cli, "--config", str(config), "campaign", "run", str(args.campaign), "--hosts", str(path),
             "--out", str(args.out / "results")])
        with en.actions(inventory_path=str(path), pattern_hosts=GROUP) as fetch:
            fetch.fetch(src="/var/log/discovery/agent.log", dest=str(args.out / "logs") + "/", flat=False,
                        fail_on_missing=False)
    finally:
        if args.provider == "g5k" and not args.keep:
            provider.destroy()
    print(f"results: {args.out / 'results' / 'summary.md'}; logs: {args.out / 'logs'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
