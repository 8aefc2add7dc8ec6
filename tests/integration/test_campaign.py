"""`discovery campaign run` end to end on a testbed it brings up: the real-guest campaign
(examples/campaigns/guests.yaml) runs its workload, load and faults, brings the testbed down, and leaves its
results folder: raw record, figures, plots, summary. (The CI campaign, examples/campaigns/ci.yaml, runs in
test_ansible_role.py, through the EnOSlib script on hosts the role deployed.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agents.hypervisor.qemu import BackendError, prepare_guest
from discovery.testbed import bed
from images import tinyguest

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(os.geteuid() != 0, reason="the testbed needs root (ip netns add)")]
GUESTS_CAMPAIGN = Path(__file__).parents[2] / "examples" / "campaigns" / "guests.yaml"


@pytest.mark.qemu
def test_the_guests_campaign_burns_cpu_in_real_guests_that_dvms_relieves_and_recovers_them(tmp_path: Path) -> None:
    """Three tiny guests booted on node1 from the cluster's image store (one holder at first, so some node pulls
    it); two burn half a vCPU each when asked through their exposed ports, which DVMS measures as an overload of
    node1 and relieves by a live migration; then node1 loses power, and the guests it held serve again from
    elsewhere, each with the address it had."""
    if any(bed.leftovers().values()):
        pytest.skip(f"another testbed is up on this machine: {bed.leftovers()}")
    try:
        prepare_guest()
    except BackendError as err:
        pytest.skip(str(err))
    out = tmp_path / "results"
    home = {**os.environ, "DISCOVERY_HOME": str(tinyguest.default_cache().parent)}  # the image built once
    done = subprocess.run([sys.executable, "-m", "discovery", "campaign", "run", str(GUESTS_CAMPAIGN), "--testbed",
                           str(tmp_path / "bed"), "--out", str(out), "--json"],
                          capture_output=True, text=True, timeout=600, env=home)
    assert done.returncode == 0, done.stderr
    assert not any(bed.leftovers().values())  # the testbed it brought up is down again
    printed = json.loads(done.stdout)
    raw = json.loads((out / "raw.json").read_text())
    assert [(a["kind"], a["ok"], a["error"]) for a in raw["actions"]] == [
        ("capacity", True, None), ("load", True, None), ("poweroff", True, None), ("start", True, None)]
    assert printed["operations"]["create"]["ok"] == 3  # each booted from the image `tiny`
    load, poweroff = raw["actions"][1], raw["actions"][2]
    burning = [s for s in raw["samples"] if load["ended"] < s["at"] < poweroff["started"]]
    first_two = {"guests-000", "guests-001"}
    assert any(s["metrics"]["node1"]["discovery_dvms_cpu_demand_ratio"] > 1 for s in burning)  # measured, not pinned
    assert any(ve["name"] in first_two and ve["vms"]["vm1"]["node"] != "node1" and ve["state"] == "running"
               for s in burning for ve in s["ves"]), "DVMS moved neither burning guest off node1"
    assert printed["migrations"] >= 1
    found = json.loads((out / "figures.json").read_text())
    assert sum(found["image_pulled_bytes"].values()) > 0  # one holder at first: node1 or DVMS's target pulled it
    hit = [r for r in found["recoveries"] if r["action"] == "poweroff"]
    assert hit and all(r["serving_s"] is not None for r in hit)  # their web servers answer from their new hosts
    before = [s for s in raw["samples"] if s["at"] < poweroff["started"]][-1]["web"]
    after = raw["samples"][-1]["web"]
    for ve in {r["ve"] for r in hit}:  # rebuilt elsewhere, each got its address back by DHCP
        assert after[f"{ve}/vm1"] == before[f"{ve}/vm1"] and before[f"{ve}/vm1"].startswith(f"{tinyguest.WEB} ip=")
    assert all(page is not None for s in raw["samples"][-3:] for page in s["web"].values())
    for plot in ("ves.png", "latency.png", "nodes.png", "cpu.png", "recovery.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# Campaign guests") and "| create | 3 |" in summary and "served again" in summary
    again = subprocess.run([sys.executable, "-m", "discovery", "campaign", "run", str(GUESTS_CAMPAIGN), "--testbed",
                            str(tmp_path / "bed"), "--out", str(out)], capture_output=True, text=True, timeout=60,
                           env=home)
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
