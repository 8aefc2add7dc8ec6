"""The CLI's side of the wire: one authenticated call to one agent, from synchronous code."""

from __future__ import annotations

from typing import Any

import trio

from discovery.cli.config import ClientConfig
from overlay.wire.rpc import Transport


def call(config: ClientConfig, agent: str | None, method: str, args: dict[str, Any] | None = None,
         timeout: float = 60.0) -> Any:
    """Call `method` on the agent named by `agent` (or the config's default); raises RpcError."""
    addr = config.resolve(agent)

    async def once() -> Any:
        async with Transport(config.identity, node="cli") as transport:
            return await transport.call(addr, method, args or {}, timeout=timeout)

    return trio.run(once)
