"""Fixtures shared by unit test files."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from typing_extensions import TypeVar

from agents.host.capacity import Resources
from agents.host.service import HostService
from agents.hypervisor.actor import Hypervisor, write_node_xml
from overlay.wire import codec
from overlay.wire.rpc import Caller, Endpoint, Method

R = TypeVar("R")
A = TypeVar("A")
AGENT = Caller("node9", "node", "node9", "rennes")


@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[HostService]:
    """A started host service on an embedded test:/// node of 8 vCPUs and 8 GiB, closed afterwards."""
    hv = Hypervisor.open(write_node_xml(tmp_path / "node.xml", vcpus=8, memory_mb=8192))
    service = HostService(Endpoint("node1"), hv, Resources(8, 8192, 100), tmp_path / "host.sqlite")
    await service.start()
    try:
        yield service
    finally:
        service.close()
        await hv.close()


async def ask(host: HostService, method: Method[R, A], request: R) -> A:
    """`method` on the host service as a peer's request is served (role check, decoding, gate, lock), its
    answer decoded with the method's answer type as `Endpoint.ask` decodes it: so every answer is checked
    against the type the method declares."""
    return method.read_answer(await host.transport.dispatch(AGENT, method.name, codec.encode(request)))


async def send(host: HostService, method: Method[R, A], args: dict[str, Any]) -> Any:
    """`method` on the host service with `args` as a peer put them on the wire: what no request type of ours
    would let this side build (a wrong type, a value out of range), so the host's own checks are what refuse."""
    return await host.transport.dispatch(AGENT, method.name, args)
