"""Fixtures shared by unit test files."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agents.host.capacity import Resources
from agents.host.service import HostService
from agents.hypervisor.actor import Hypervisor, write_node_xml
from overlay.wire.rpc import Endpoint


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
