"""Time to deploy N testbed nodes from nothing with the Ansible role (deploy/ansible/site.yml).

    sudo python benchmarks/ansible_deploy.py --nodes 3 6 [--sites 3] [--plot docs/ansible_deploy.png]

For each N: a bare testbed of N nodes (`testbed up --bare`: each node an sshd in its own namespaces, no agent),
then site.yml over SSH from the root namespace, with a fresh virtualenv, no CA and no node configuration: Debian
packages checked (the machine's, already there: the nodes share its dpkg database), the package installed from a
wheelhouse (built once beforehand, not timed: `pip wheel`), the CA and N certificates issued, agent.toml and the
unit written, the agents started. Timed: the testbed's bring-up, the first run, from its end until the N agents
see each other alive (the role's client.toml), and a second run (which must change nothing). The nodes share one
virtualenv, so its install runs once and the role installs on one node at a time (the inventory's throttle):
on separate machines each node would install its own, in parallel.

Prints JSON; waits for another testbed on the machine to go; always brings its own down.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import pyplot  # benchmarks/harness.py, beside this script

from discovery.testbed import bed, deploy, plan

WAIT_FOR_OTHERS = 600.0


def _free(deadline: float) -> None:
    while any(bed.leftovers().values()):
        if time.monotonic() > deadline:
            sys.exit(f"another testbed stays up on this machine: {bed.leftovers()}")
        time.sleep(2)


def run(nodes: int, sites: int, wheels: Path, work: Path) -> dict[str, Any]:
    directory = work / f"bed{nodes}"
    names = plan.site_names(sites)
    _free(time.monotonic() + WAIT_FOR_OTHERS)
    start = time.monotonic()
    bed.up(directory, plan.make_plan(nodes, names, plan.default_rtt(names), 100.0), bare=True)
    try:
        testbed = time.monotonic() - start
        first = deploy.playbook(directory / "hosts.yml", wheels, work / f"venv{nodes}")
        played = time.monotonic() - start - testbed
        if first.returncode != 0:
            sys.exit(f"site.yml failed on {nodes} nodes:\n{first.stdout[-3000:]}")
        if not deploy.converged(directory / "discovery-ca" / "client.toml", nodes, 120.0):
            sys.exit(f"the {nodes} deployed agents did not become one cluster")
        joined = time.monotonic() - start - testbed - played
        again = time.monotonic()
        second = deploy.playbook(directory / "hosts.yml", wheels, work / f"venv{nodes}")
        rerun = time.monotonic() - again
        changed = sum(r["changed"] for r in deploy.recap(second.stdout).values())
    finally:
        bed.down(directory)
    return {"nodes": nodes, "sites": sites, "testbed_s": round(testbed, 1), "first_run_s": round(played, 1),
            "joined_after_s": round(joined, 1), "from_nothing_s": round(testbed + played + joined, 1),
            "second_run_s": round(rerun, 1), "second_run_changed": changed}


def plot(results: list[dict[str, Any]], path: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [str(r["nodes"]) for r in results]
    bottom = [0.0] * len(results)
    for key, label in (("testbed_s", "bare testbed up"), ("first_run_s", "site.yml, first run"),
                       ("joined_after_s", "until all joined")):
        values = [r[key] for r in results]
        ax.bar(labels, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.plot(labels, [r["second_run_s"] for r in results], "ko--", label="site.yml, second run (no change)")
    ax.set_xlabel("testbed nodes")
    ax.set_ylabel("seconds")
    ax.set_title("Deploying agents from nothing with the Ansible role")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[3, 6])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--plot", help="PNG of the phases for each N")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ansible-deploy-") as tmp:
        work = Path(tmp)
        wheels = deploy.wheelhouse(work / "wheels")
        results = [run(n, min(args.sites, n), wheels, work) for n in args.nodes]
    print(json.dumps(results, indent=2))
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
