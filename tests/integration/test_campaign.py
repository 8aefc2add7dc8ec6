"""`discovery campaign run` end to end: the CI campaign (examples/campaigns/ci.yaml) brings a testbed up, runs its
workload and faults, brings it down, and leaves its results folder: raw record, figures, plots, summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from discovery.testbed import bed

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(os.geteuid() != 0, reason="the testbed needs root (ip netns add)")]
CI_CAMPAIGN = Path(__file__).parents[2] / "examples" / "campaigns" / "ci.yaml"


def test_the_ci_campaign_runs_on_a_testbed_and_leaves_its_results(tmp_path: Path) -> None:
    if any(bed.leftovers().values()):
        pytest.skip(f"another testbed is up on this machine: {bed.leftovers()}")
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, "-m", "discovery", "campaign", "run", str(CI_CAMPAIGN), "--testbed",
                           str(tmp_path / "bed"), "--out", str(out), "--json"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "DISCOVERY_HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert not any(bed.leftovers().values())  # the testbed it brought up is down again
    printed = json.loads(done.stdout)
    raw = json.loads((out / "raw.json").read_text())
    assert [(a["kind"], a["ok"]) for a in raw["actions"]] == [
        ("capacity", True), ("load", True), ("kill", True), ("start", True), ("partition", True), ("heal", True)]
    creates = printed["operations"]["create"]
    assert creates["count"] == 22 and creates["ok"] >= 15  # a few may fail while a site is cut off
    assert printed["recovery"]["count"] >= 1  # the VEs of the killed host ran elsewhere
    assert {n["name"] for n in raw["nodes"]} == {"node1", "node2", "node3"}
    assert len(raw["samples"]) >= 22 and all(s["metrics"] for s in raw["samples"])
    for plot in ("ves.png", "latency.png", "nodes.png", "recovery.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# Campaign ci") and "| create | 22 |" in summary and "![ves.png](ves.png)" in summary
    again = subprocess.run([sys.executable, "-m", "discovery", "campaign", "run", str(CI_CAMPAIGN), "--testbed",
                            str(tmp_path / "bed"), "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and again.stderr.strip().endswith("holds an earlier cluster's data; give a new "
                                                                    "directory")  # its agents' records would return


def test_a_bad_campaign_is_one_line_and_brings_nothing_up(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nduration: 60s\nactions:\n  - {at: 5s, kill: node9}\n")
    done = subprocess.run([sys.executable, "-m", "discovery", "campaign", "run", str(bad), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stderr == "error: give --testbed DIR or --hosts INVENTORY\n"
    bad.write_text("name: x\nduration: 60s\nactions:\n  - {at: 5s, kil: node9}\n")
    done = subprocess.run([sys.executable, "-m", "discovery", "campaign", "run", str(bad), "--testbed",
                           str(tmp_path / "bed"), "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1 and done.stderr.startswith(f"error: {bad}:4: actions[0]: unknown key 'kil'")
    assert not (tmp_path / "bed").exists() and not (tmp_path / "out").exists()
