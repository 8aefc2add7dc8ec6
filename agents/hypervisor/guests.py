"""What a node's VMs are made of, per backend: the domain XML of a new VM, and its files.

On the embedded test driver a VM is its XML alone (`TestDomains`). A real guest (`QemuGuests`) is the
tiny guest of `images.tinyguest` on a qcow2 overlay of its own, with its console in a log file: both
files live in the node's guest directory. Where the node runs its own libvirtd, that directory is
mounted at `agents.hypervisor.libvirtd.GUESTS` inside the daemon's namespace, so the XML names paths that are the
same on every node (what live migration needs); with the embedded QEMU driver, the XML names the files
where they are.
"""

from __future__ import annotations

import contextlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agents.hypervisor.actor import domain_xml as test_domain_xml
from agents.hypervisor.qemu_xml import domain_xml as qemu_domain_xml
from images.tinyguest import TinyGuest, make_overlay

MIN_GUEST_MIB = 16


class Domains(Protocol):
    """Makes and removes the VMs of one node's backend."""

    kind: str  # "test" or "qemu"

    def new_xml(self, name: str, vcpus: int, memory_mb: int) -> str:
        """The definition of a new VM (creating whatever files it needs)."""

    def adapt(self, xml: str) -> str:
        """A domain (or domain snapshot) definition carried from another node, with this node's paths."""

    def prepare(self, name: str) -> None:
        """Make the files an incoming VM (live migration) is copied into."""

    def disk(self, name: str) -> Path | None:
        """The VM's disk on this node as the agent sees it (None: no disk): what save → ship → restore
        carries, with the memory image, which lands beside it (`incoming_image`)."""

    def saved(self, name: str) -> Path:
        """The memory image libvirt wrote when it stopped VM `name` with a managed save."""

    def copy(self, name: str) -> Path:
        """Where the source keeps a consistent copy of VM `name`'s disk for a standby to fetch."""

    def standby(self, name: str) -> Path:
        """Where a standby copy of VM `name`'s disk is kept on a node that does not run it."""

    def incoming_image(self, name: str) -> tuple[Path, Path]:
        """Where a carried memory image is written: as the agent sees it, and as libvirt sees it."""

    def remove(self, name: str) -> None:
        """Delete the VM's files; a VM with none is fine."""


class TestDomains:
    """The embedded test driver: a VM is its XML; no files."""

    kind = "test"

    def new_xml(self, name: str, vcpus: int, memory_mb: int) -> str:
        return test_domain_xml(name, vcpus, memory_mb)

    def adapt(self, xml: str) -> str:
        return xml

    def prepare(self, name: str) -> None:
        return None

    def disk(self, name: str) -> Path | None:
        return None

    def saved(self, name: str) -> Path:
        raise NotImplementedError("the test driver has no memory images")

    def copy(self, name: str) -> Path:
        raise NotImplementedError("the test driver has no disks")

    def standby(self, name: str) -> Path:
        raise NotImplementedError("the test driver has no disks")

    def incoming_image(self, name: str) -> tuple[Path, Path]:
        raise NotImplementedError("the test driver has no memory images")

    def remove(self, name: str) -> None:
        return None


@dataclass
class QemuGuests:
    """Tiny-guest VMs: `directory` holds their disks and consoles; `seen_as` is that directory as libvirt
    sees it (GUESTS in a per-node daemon's namespace, `directory` itself for the embedded driver)."""

    guest: TinyGuest
    accel: str
    directory: Path
    seen_as: Path
    save_dir: Path
    """libvirt's managed save images, as the agent sees them: `host.export` ships them from there."""
    kind = "qemu"

    def _file(self, name: str, suffix: str) -> str:
        return name.replace(":", "--") + suffix  # a VE name never holds ':', so this cannot collide

    def new_xml(self, name: str, vcpus: int, memory_mb: int) -> str:
        disk = self.directory / self._file(name, ".qcow2")
        if not disk.exists():
            make_overlay(self.guest.base, disk)
        return qemu_domain_xml(name, self.guest, self.seen_as / disk.name,
                               self.seen_as / self._file(name, ".log"), accel=self.accel,
                               memory_mib=max(memory_mb, MIN_GUEST_MIB), vcpus=vcpus)

    def adapt(self, xml: str) -> str:
        """Point the disk and console at this node's files and use this node's accelerator (the same
        paths already, between per-node daemons; not between embedded drivers)."""
        root = ET.fromstring(xml)
        for domain in [root] if root.tag == "domain" else root.findall("domain"):
            name = domain.findtext("name") or ""
            domain.set("type", self.accel)
            for source in domain.findall("devices/disk/source"):
                source.set("file", str(self.seen_as / self._file(name, ".qcow2")))
            for source in domain.findall("devices/serial/source"):
                source.set("path", str(self.seen_as / self._file(name, ".log")))
        return ET.tostring(root, encoding="unicode")

    def prepare(self, name: str) -> None:
        """A fresh overlay of the same base: live migration with incremental disk copy fills it."""
        disk = self.directory / self._file(name, ".qcow2")
        disk.unlink(missing_ok=True)
        make_overlay(self.guest.base, disk)

    def disk(self, name: str) -> Path:
        return self.directory / self._file(name, ".qcow2")

    def saved(self, name: str) -> Path:
        """The managed save image libvirt wrote for domain `name`."""
        return self.save_dir / f"{name}.save"

    def copy(self, name: str) -> Path:
        return self.directory / self._file(name, ".copy.qcow2")

    def standby(self, name: str) -> Path:
        return self.directory / self._file(name, ".standby.qcow2")

    def incoming_image(self, name: str) -> tuple[Path, Path]:
        file = self._file(name, ".save")
        return self.directory / file, self.seen_as / file

    def remove(self, name: str) -> None:
        for suffix in (".qcow2", ".log", ".save", ".copy.qcow2"):
            with contextlib.suppress(FileNotFoundError):
                (self.directory / self._file(name, suffix)).unlink()
