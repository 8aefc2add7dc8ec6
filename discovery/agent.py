"""One node's agent, composed: the layers of `agents/` plus the VE service and the DVMS scheduler.

This is the one place where the product's services are wired into a `NodeAgent`; `discovery agent run`
calls `run`. The services receive what they use from here, so none of them imports another's module
just to find it.
"""

from __future__ import annotations

from pathlib import Path

import trio

from agents.node import NodeAgent
from discovery.agent_config import load_agent_config
from discovery.scheduler.service import DvmsService
from discovery.ve.replicas import Fencing
from discovery.ve.service import Recovery, VEService


async def install(agent: NodeAgent) -> None:
    """Agent extension hook: the VE service, its recovery of interrupted operations and its fencing of
    failed-over copies; and the DVMS service, which moves nothing unless some VM demands CPU
    (`dvms.load`, real guests, or the injector of agent.toml's `[dvms]`). DVMS relocates through the VE
    service, so it receives it."""
    service = VEService(agent)
    agent.actors += [Recovery(service), Fencing(service), DvmsService(agent, service)]


def run(config: Path) -> None:
    """Serve as the node that `config` (agent.toml) describes, until SIGTERM."""
    trio.run(NodeAgent(load_agent_config(config), [install]).run)
