"""`host.snapshot_image` on the embedded test:/// driver (agents.host.snapshot_images): a VM without a disk is
imaged as its domain XML, padded to whole sectors, published under the name asked, the file made for it gone
afterwards; what is not a VM here, a bad name or an agent without an image store is refused. A real guest's
disk: tests/integration/test_qemu_agents.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from agents.host.service import HostService
from agents.messages import HOST_SNAPSHOT_IMAGE, SnapshotImage, SnapshotImaged
from images.importing import Imported
from overlay.wire.rpc import NotFound, RequestError
from tests.unit.conftest import ask, send
from tests.unit.test_host_standby import define


class Published:
    """A node's images that keep what each publish was given (`agents.host.base.NodeImages`)."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[Path, bytes, str, int]] = {}

    async def bring(self, image: str) -> str:
        raise AssertionError("not brought")

    async def boot(self, digest: str, bases: Path) -> object:
        raise AssertionError("not booted")

    async def publish(self, path: Path, name: str, owner: str, copies: int) -> Imported:
        self.files[name] = (path, path.read_bytes(), owner, copies)
        return Imported("d" * 64, path.stat().st_size, 1, 1, 100, "raw", 80)


async def test_a_vm_without_a_disk_is_imaged_as_its_xml(host: HostService) -> None:
    images = host.images = Published()  # type: ignore[assignment]
    await define(host, "shop:db")
    made = await ask(host, HOST_SNAPSHOT_IMAGE, SnapshotImage("shop:db", "snap/shop/db:1", "alice"))
    assert made == SnapshotImaged("snap/shop/db:1", "d" * 64, made.size, 1, 1, 100, 80, 0.0)
    path, content, owner, copies = images.files["snap/shop/db:1"]
    assert content.rstrip(b"\0").decode() == await host.hypervisor.xml("shop:db")
    assert len(content) == made.size and made.size % 512 == 0 and (owner, copies) == ("alice", 1)
    assert not path.exists()  # the file made for it is gone


async def test_what_cannot_be_imaged_is_refused(host: HostService) -> None:
    with pytest.raises(RequestError, match="no image store"):
        await ask(host, HOST_SNAPSHOT_IMAGE, SnapshotImage("shop:db", "snap/shop/db:1", "alice"))
    host.images = Published()  # type: ignore[assignment]
    with pytest.raises(NotFound, match="no VM shop:db on this node"):
        await ask(host, HOST_SNAPSHOT_IMAGE, SnapshotImage("shop:db", "snap/shop/db:1", "alice"))
    with pytest.raises(RequestError, match="image name 'snap//db'"):
        await send(host, HOST_SNAPSHOT_IMAGE, {"name": "shop:db", "image": "snap//db", "owner": "alice"})
