"""libvirt domains for real guests (a catalogued image, `images.boot`; the tiny guest) on the QEMU driver.

The XML is the smallest that keeps every VE operation real: direct kernel boot where the image carries
its kernel (else the BIOS boots the disk), one virtio disk on a per-VM qcow2 overlay (so internal
snapshots work: libvirt takes them only when every disk is qcow2), ACPI (so `shutdown()` presses the
power button), and the serial console written to a file, which is how callers see the guest's ready
and heartbeat lines. Nothing
else: no USB, no balloon, no graphics, no network, so the guest has nothing to wait for.

`open_embed` opens `qemu:///embed?root=DIR`: the QEMU driver inside this process, with no daemon.
libvirt allows one embed root per process and needs its event loop running, which `LibvirtEvents` (a
pykka actor on a daemon thread) starts here once. The driver looks up the `libvirt-qemu` account at
start even though QEMU runs as root here (Debian creates it with libvirt-daemon-system); without it the
open fails with a one-line reason.
"""

from __future__ import annotations

import threading
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Protocol

import libvirt
import pykka

QEMU_CONF = """\
# Written by Discovery for its QEMU driver (embedded, or a node's own libvirtd): QEMU runs as the
# agent's user, files keep their owner (the agent made them), no cgroups are required (containers may
# not delegate them), and QEMU's own log goes to a file, not to virtlogd.
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
stdio_handler = "file"
"""


IMAGE_NS = "urn:discovery:image"
"""Namespace of the domain metadata naming the image a VM boots (its manifest digest): it travels with the
domain's definition, so a node receiving the VM knows which base its disk's overlay needs."""


class Bootable(Protocol):
    """What a domain needs from a booted image (`images.boot.BootImage`; `images.tinyguest.TinyGuest` too):
    the kernel, initrd and command line of a direct kernel boot, or no kernel: the BIOS boots the disk."""

    @property
    def kernel(self) -> Path | None: ...

    @property
    def initrd(self) -> Path | None: ...

    @property
    def cmdline(self) -> str: ...


def domain_xml(name: str, guest: Bootable, disk: Path, console_log: Path, *, accel: str = "qemu",
               memory_mib: int = 128, vcpus: int = 1, uuid: str | None = None, image: str | None = None) -> str:
    """The domain XML of one VM booting `guest` from `disk`; `accel` is "kvm" or "qemu" (TCG), see
    `agents.hypervisor.accel`; `image`, the digest of the catalogued image it boots (kept in its metadata)."""
    if accel not in ("kvm", "qemu"):
        raise ValueError(f"accel must be 'kvm' or 'qemu', not {accel!r}")
    if memory_mib < 16 or vcpus < 1:
        raise ValueError(f"a guest needs at least 16 MiB and one vcpu (got {memory_mib} MiB, {vcpus} vcpus)")
    dom = ET.Element("domain", type=accel)
    ET.SubElement(dom, "name").text = name
    if uuid:
        ET.SubElement(dom, "uuid").text = uuid
    if image:
        ET.SubElement(ET.SubElement(dom, "metadata"), f"{{{IMAGE_NS}}}image", digest=image)
    ET.SubElement(dom, "memory", unit="MiB").text = str(memory_mib)
    ET.SubElement(dom, "vcpu").text = str(vcpus)
    os_ = ET.SubElement(dom, "os")
    ET.SubElement(os_, "type", arch="x86_64", machine="pc").text = "hvm"
    if guest.kernel is None:
        ET.SubElement(os_, "boot", dev="hd")
    else:
        for tag, value in (("kernel", guest.kernel), ("initrd", guest.initrd)):
            if value is not None:
                ET.SubElement(os_, tag).text = str(Path(value).absolute())
        ET.SubElement(os_, "cmdline").text = guest.cmdline
    ET.SubElement(ET.SubElement(dom, "features"), "acpi")
    # The guest powers off by itself on the ACPI button; a reboot or crash means it is broken: stop it.
    for event, action in (("on_poweroff", "destroy"), ("on_reboot", "destroy"), ("on_crash", "destroy")):
        ET.SubElement(dom, event).text = action
    devices = ET.SubElement(dom, "devices")
    disk_el = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(disk_el, "driver", name="qemu", type="qcow2")
    ET.SubElement(disk_el, "source", file=str(Path(disk).absolute()))
    ET.SubElement(disk_el, "target", dev="vda", bus="virtio")
    serial = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(serial, "source", path=str(Path(console_log).absolute()), append="on")
    ET.SubElement(serial, "target", port="0")
    ET.SubElement(devices, "controller", type="usb", model="none")
    ET.SubElement(devices, "memballoon", model="none")
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode")


def image_of(xml: str) -> str | None:
    """The digest of the image a domain (or a domain snapshot's domain) boots, from its metadata; None: none."""
    return image_in(ET.fromstring(xml))


def image_in(element: ET.Element) -> str | None:
    """`image_of` for a domain (or domain snapshot) already parsed."""
    found = element.find(f".//metadata/{{{IMAGE_NS}}}image")
    return None if found is None else found.get("digest")


_loop_lock = threading.Lock()
_loop_started = False
_embed_root: Path | None = None
_ITERATE = "iterate"


class LibvirtEvents(pykka.ThreadingActor):
    """libvirt's default event loop (the embedded driver watches QEMU through it), in this actor's thread:
    each message runs one iteration and posts the next. The thread is a daemon: the loop runs as long as
    the process, as libvirt expects once it is registered."""

    use_daemon_thread = True

    def on_start(self) -> None:
        self.actor_ref.tell(_ITERATE)

    def on_receive(self, message: object) -> None:
        if message == _ITERATE:
            libvirt.virEventRunDefaultImpl()
            self.actor_ref.tell(_ITERATE)


def start_event_loop() -> None:
    """Register libvirt's default event loop and run it, once per process (callers may race: a lock). A
    connection to a daemon delivers events only if it was opened after this (`agents.hypervisor.events`)."""
    global _loop_started
    with _loop_lock:
        if _loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()
        LibvirtEvents.start()
        _loop_started = True


def open_embed(root: Path) -> libvirt.virConnect:
    """A connection to the QEMU driver embedded in this process, keeping its state under `root`.

    Its QEMU processes outlive the connection and even this process (measured: closing leaves them
    running, re-opening the root finds them again), so destroy domains before closing. A process may
    use only one root (libvirt's rule): another raises ValueError rather than a confusing libvirt error.
    """
    global _embed_root
    root = Path(root).absolute()
    if _embed_root is not None and _embed_root != root:
        raise ValueError(f"this process already embeds the QEMU driver at {_embed_root}; libvirt allows one root")
    conf = root / "etc" / "qemu.conf"  # the embedded driver reads ROOT/etc/qemu.conf
    if not conf.exists():
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(QEMU_CONF)
    start_event_loop()
    conn = libvirt.open(f"qemu:///embed?root={root}")
    _embed_root = root
    return conn
