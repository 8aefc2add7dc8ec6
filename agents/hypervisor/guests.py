"""What a node's VMs are made of, per backend: the domain XML of a new VM, and its files.

On the embedded test driver a VM is its XML alone (`TestDomains`). A real guest (`QemuGuests`) boots its
catalogued image (`images.boot`) from a qcow2 overlay of its own on the image's base, with its console in a
log file: all live in the node's guest directory, the bases under `bases/`, named by a path relative to
the overlay (so the pair reads the same from any root). Where the node runs its own libvirtd, that directory is
mounted at `agents.hypervisor.libvirtd.GUESTS` inside the daemon's namespace, so the XML names paths that are the
same on every node (what live migration needs); with the embedded QEMU driver, the XML names the files
where they are.
"""

from __future__ import annotations

import contextlib
import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from agents.hypervisor.actor import domain_xml as test_domain_xml
from agents.hypervisor.qemu_xml import domain_xml as qemu_domain_xml
from agents.hypervisor.qemu_xml import image_in
from images.boot import BootImage
from images.tinyguest import make_overlay, run

MIN_GUEST_MIB = 16


class Domains(Protocol):
    """Makes and removes the VMs of one node's backend."""

    kind: str  # "test" or "qemu"

    @property
    def bases(self) -> Path | None:
        """Where the bases of the images VMs boot are made (`images.boot.materialize`); None: no disks."""

    def new_xml(self, name: str, vcpus: int, memory_mb: int, disk_gb: int, boot: BootImage | None) -> str:
        """The definition of a new VM booting `boot` (creating whatever files it needs)."""

    def adapt(self, xml: str) -> str:
        """A domain (or domain snapshot) definition carried from another node, with this node's paths."""

    def prepare(self, name: str, disk_gb: int, boot: BootImage | None) -> None:
        """Make the files an incoming VM (live migration) is copied into: its overlay, as `new_xml` would."""

    def disk(self, name: str) -> Path | None:
        """The VM's disk on this node as the agent sees it (None: no disk): what save → ship → restore
        carries, with the memory image, which lands beside it (`incoming_image`)."""

    def saved(self, name: str) -> Path:
        """The memory image libvirt wrote when it stopped VM `name` with a managed save."""

    def copy(self, name: str) -> Path:
        """Where the source keeps a consistent copy of VM `name`'s disk for a standby to fetch."""

    def standby(self, name: str) -> Path:
        """Where a standby copy of VM `name`'s disk is kept on a node that does not run it."""

    def new_mirror(self, name: str) -> Path:
        """A fresh overlay that VM `name`'s disk is mirrored into, beside its standby copy (same base, same
        size): where `mirror` says, anything there before dropped."""

    def mirror(self, name: str) -> Path:
        """Where VM `name`'s disk is mirrored into on the node of its standby copy."""

    def incoming_image(self, name: str) -> tuple[Path, Path]:
        """Where a carried memory image is written: as the agent sees it, and as libvirt sees it."""

    def remove(self, name: str) -> None:
        """Delete the VM's files; a VM with none is fine."""


class TestDomains:
    """The embedded test driver: a VM is its XML; no files."""

    kind = "test"
    bases = None

    def new_xml(self, name: str, vcpus: int, memory_mb: int, disk_gb: int, boot: BootImage | None) -> str:
        return test_domain_xml(name, vcpus, memory_mb)

    def adapt(self, xml: str) -> str:
        return xml

    def prepare(self, name: str, disk_gb: int, boot: BootImage | None) -> None:
        return None

    def disk(self, name: str) -> Path | None:
        return None

    def saved(self, name: str) -> Path:
        raise NotImplementedError("the test driver has no memory images")

    def copy(self, name: str) -> Path:
        raise NotImplementedError("the test driver has no disks")

    def standby(self, name: str) -> Path:
        raise NotImplementedError("the test driver has no disks")

    def new_mirror(self, name: str) -> Path:
        raise NotImplementedError("the test driver has no disks")

    def mirror(self, name: str) -> Path:
        raise NotImplementedError("the test driver has no disks")

    def incoming_image(self, name: str) -> tuple[Path, Path]:
        raise NotImplementedError("the test driver has no memory images")

    def remove(self, name: str) -> None:
        return None


@dataclass
class QemuGuests:
    """Real guests: `directory` holds their disks, consoles and the bases of their images; `seen_as` is that
    directory as libvirt sees it (GUESTS in a per-node daemon's namespace, `directory` itself for the
    embedded driver)."""

    accel: str
    directory: Path
    seen_as: Path
    save_dir: Path
    """libvirt's managed save images, as the agent sees them: `host.export` ships them from there."""
    kind = "qemu"

    @property
    def bases(self) -> Path:
        return self.directory / "bases"

    def _file(self, name: str, suffix: str) -> str:
        return name.replace(":", "--") + suffix  # a VE name never holds ':', so this cannot collide

    def _seen(self, path: Path | None) -> Path | None:
        return None if path is None else self.seen_as / path.relative_to(self.directory)

    def new_xml(self, name: str, vcpus: int, memory_mb: int, disk_gb: int, boot: BootImage | None) -> str:
        if boot is None:
            raise ValueError(f"{name}: a real guest boots an image")
        disk = self.directory / self._file(name, ".qcow2")
        if not disk.exists():
            self._overlay(disk, disk_gb, boot)
        seen = replace(boot, kernel=self._seen(boot.kernel), initrd=self._seen(boot.initrd))
        return qemu_domain_xml(name, seen, self.seen_as / disk.name, self.seen_as / self._file(name, ".log"),
                               accel=self.accel, memory_mib=max(memory_mb, MIN_GUEST_MIB), vcpus=vcpus,
                               image=boot.digest)

    def _overlay(self, disk: Path, disk_gb: int, boot: BootImage) -> None:
        """The VM's disk: `disk_gb` GiB (at least the image's size), written only here, reading the base."""
        make_overlay(boot.base, disk, size=max(disk_gb << 30, boot.size), relative=True)

    def adapt(self, xml: str) -> str:
        """Point the disk, console and kernel at this node's files and use this node's accelerator (the same
        paths already, between per-node daemons; not between embedded drivers). A snapshot carries the domain
        twice: as it ran, and its persistent definition (`inactiveDomain`), which a revert makes the domain's:
        both are adapted, or the next boot after a revert would look for the other node's files."""
        root = ET.fromstring(xml)
        for domain in [root] if root.tag == "domain" else [*root.findall("domain"), *root.findall("inactiveDomain")]:
            name, digest = domain.findtext("name") or "", image_in(domain)
            domain.set("type", self.accel)
            for source in domain.findall("devices/disk/source"):
                source.set("file", str(self.seen_as / self._file(name, ".qcow2")))
            for source in domain.findall("devices/serial/source"):
                source.set("path", str(self.seen_as / self._file(name, ".log")))
            for boot_file in [*domain.findall("os/kernel"), *domain.findall("os/initrd")]:
                if digest and boot_file.text:
                    boot_file.text = str(self.seen_as / "bases" / digest / Path(boot_file.text).name)
        return ET.tostring(root, encoding="unicode")

    def prepare(self, name: str, disk_gb: int, boot: BootImage | None) -> None:
        """A fresh overlay of the same base and size: live migration with incremental disk copy fills it."""
        if boot is None:
            raise ValueError(f"{name}: a real guest boots an image")
        disk = self.directory / self._file(name, ".qcow2")
        disk.unlink(missing_ok=True)
        self._overlay(disk, disk_gb, boot)

    def disk(self, name: str) -> Path:
        return self.directory / self._file(name, ".qcow2")

    def saved(self, name: str) -> Path:
        """The managed save image libvirt wrote for domain `name`."""
        return self.save_dir / f"{name}.save"

    def copy(self, name: str) -> Path:
        return self.directory / self._file(name, ".copy.qcow2")

    def standby(self, name: str) -> Path:
        return self.directory / self._file(name, ".standby.qcow2")

    def new_mirror(self, name: str) -> Path:
        info = json.loads(run("qemu-img", "info", "-U", "--output=json", str(self.standby(name))))
        mirror = self.mirror(name)
        mirror.unlink(missing_ok=True)
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", info["backing-filename"], "-F",
            info.get("backing-filename-format", "raw"), str(mirror), str(info["virtual-size"]), cwd=self.directory)
        return mirror

    def mirror(self, name: str) -> Path:
        return self.directory / self._file(name, ".mirror.qcow2")

    def incoming_image(self, name: str) -> tuple[Path, Path]:
        file = self._file(name, ".save")
        return self.directory / file, self.seen_as / file

    def remove(self, name: str) -> None:
        for suffix in (".qcow2", ".log", ".save", ".copy.qcow2"):
            with contextlib.suppress(FileNotFoundError):
                (self.directory / self._file(name, suffix)).unlink()
