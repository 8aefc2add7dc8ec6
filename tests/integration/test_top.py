"""`discovery top` on a running 6-agent, 3-site cluster: `--once --json` gives every member with its site and load,
and the live view, drawn in a real terminal (tmux, captured), shows every node under its site and follows what
happens (a VE created through another agent appears among the events without a keystroke)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import Cluster, wait_for

pytestmark = pytest.mark.integration
SPEC = "name: topped\nvms:\n  - {name: a, vcpus: 1, memory_mb: 512, disk_gb: 1}\n"


def sites(cluster: Cluster) -> dict[str, str]:
    return {n["name"]: n["site"] for n in cluster.state["nodes"]}


def test_once_json_gives_every_member_its_site_and_load(cluster6: Cluster, tmp_path: Path) -> None:
    def answered() -> Any:
        view = cluster6.try_json("--agent", "node2", "top", "--once")
        return view if view and all("usage" in n for n in view["nodes"]) and len(view["nodes"]) == 6 else None

    view = wait_for(answered, what="every member answering top.cluster")
    assert view["by"] == "node2"
    assert {n["name"]: n["site"] for n in view["nodes"]} == sites(cluster6)
    assert [(n["site"], n["name"]) for n in view["nodes"]] == sorted((n["site"], n["name"]) for n in view["nodes"])
    assert all(n["state"] == "alive" and n["usage"]["vcpus_total"] > 0 for n in view["nodes"])
    assert any(e["kind"] == "member_joined" for e in view["events"])


def tmux(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, env=env, timeout=30, check=check)


def screen_sites(screen: str) -> dict[str, str]:
    """Node -> site as the nodes table on `screen` shows them (a site named on its first node's row only)."""
    found, site, table = {}, "", False
    for line in screen.splitlines():
        words = line.split()
        if words[:2] == ["site", "node"]:
            table = True
        elif table and (not words or words[0] == "events"):
            break
        elif table:
            if not line.startswith(" "):
                site, words = words[0], words[1:]
            found[words[0]] = site
    return found


def test_the_live_view_in_a_terminal(cluster6: Cluster, tmp_path: Path) -> None:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (Debian package tmux: `make deps`)")
    socket = f"dtop-{os.getpid()}"  # a tmux server of our own: our environment, nobody else's sessions
    session = "top"
    command = [sys.executable, "-m", "discovery", "--config", str(cluster6.dir / "client.toml"), "--agent", "node1",
               "top", "--interval", "0.5"]
    tmux("-L", socket, "new-session", "-d", "-s", session, "-x", "200", "-y", "50", *command, env=cluster6.env)
    try:
        def screen() -> str:
            return tmux("-L", socket, "capture-pane", "-p", "-t", session, env=cluster6.env).stdout

        wait_for(lambda: screen_sites(screen()) == sites(cluster6), what="every node under its site on the screen",
                 detail=screen)
        (tmp_path / "topped.yaml").write_text(SPEC)
        cluster6.cli("--agent", "node5", "ve", "create", str(tmp_path / "topped.yaml"))
        wait_for(lambda: "ve_created" in screen() and "topped" in screen(), what="the new VE among the events",
                 detail=screen)
    finally:
        tmux("-L", socket, "kill-session", "-t", session, env=cluster6.env, check=False)
