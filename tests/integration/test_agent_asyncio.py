"""An agent process loads asyncio (and trio-asyncio) only when its config enables Kademlia: without it, the
agent, composed as `discovery agent run` composes it, is a plain trio program."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

AGENT = textwrap.dedent("""
    import json, sys
    from pathlib import Path

    import trio

    from agents.config import AgentConfig
    from agents.host.capacity import Resources
    from agents.node import NodeAgent
    from discovery.agent import install
    from overlay.wire.ca import init_ca, issue

    async def main(directory: Path, kademlia: bool) -> None:
        init_ca(directory / "ca")
        identity = issue(directory / "ca", "n1", out_dir=directory)
        config = AgentConfig("n1", "s1", "127.0.0.1:0", directory / "data", identity, Resources(2, 2048, 10),
                             kademlia=kademlia)
        agent = NodeAgent(config, [install])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(agent.run)
            with trio.fail_after(60):  # serving once it wrote its address
                while not (config.data_dir / "agent.addr").exists():
                    await trio.sleep(0.05)
            loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("asyncio", "trio_asyncio", "kademlia"))
            print(json.dumps({"loaded": loaded, "overlays": sorted(agent.overlays.overlays)}))
            nursery.cancel_scope.cancel()

    trio.run(main, Path(sys.argv[1]), sys.argv[2] == "true")
""")


def run_agent(directory: Path, kademlia: bool) -> dict:
    proc = subprocess.run([sys.executable, "-c", AGENT, str(directory), str(kademlia).lower()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_without_kademlia_the_agent_never_imports_asyncio(tmp_path: Path) -> None:
    state = run_agent(tmp_path, kademlia=False)
    assert state == {"loaded": [], "overlays": ["chord"]}


def test_with_kademlia_the_agent_runs_it_under_trio_asyncio(tmp_path: Path) -> None:
    state = run_agent(tmp_path, kademlia=True)
    assert {"asyncio", "trio_asyncio", "kademlia"} <= {m.split(".")[0] for m in state["loaded"]}
    assert state["overlays"] == ["chord", "kademlia"]
