"""The tiny guest's domain XML, its initramfs format and heartbeat parsing, and the accelerator choice."""

from __future__ import annotations

import gzip
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from agents.hypervisor import accel
from agents.hypervisor.guests import QemuGuests
from agents.hypervisor.qemu_xml import domain_xml, image_of
from images import tinyguest
from images.boot import BootImage
from images.tinyguest import TinyGuest

GUEST = TinyGuest(kernel=Path("/img/vmlinuz"), initrd=Path("/img/initrd.gz"), base=Path("/img/base.qcow2"))


def parse(**kwargs) -> ET.Element:
    return ET.fromstring(domain_xml("vm1", GUEST, Path("/vms/vm1.qcow2"), Path("/vms/vm1.log"), **kwargs))


def test_domain_boots_the_kernel_directly_with_a_serial_console() -> None:
    dom = parse()
    assert dom.get("type") == "qemu" and dom.findtext("name") == "vm1"
    assert dom.find("memory").get("unit") == "MiB" and dom.findtext("memory") == "128"
    assert dom.findtext("vcpu") == "1"
    assert dom.findtext("os/kernel") == "/img/vmlinuz" and dom.findtext("os/initrd") == "/img/initrd.gz"
    assert "console=ttyS0" in dom.findtext("os/cmdline")
    assert dom.find("features/acpi") is not None  # shutdown() presses the ACPI power button
    assert dom.find("devices/serial").get("type") == "file"
    assert dom.find("devices/serial/source").get("path") == "/vms/vm1.log"


def test_domain_disk_is_a_virtio_qcow2_overlay_and_nothing_else_is_attached() -> None:
    dom = parse()
    (disk,) = dom.findall("devices/disk")
    assert disk.find("driver").get("type") == "qcow2"  # internal snapshots need qcow2
    assert disk.find("source").get("file") == "/vms/vm1.qcow2"
    assert disk.find("target").attrib == {"dev": "vda", "bus": "virtio"}
    assert dom.find("devices/memballoon").get("model") == "none"
    assert dom.find("devices/interface") is None and dom.find("devices/graphics") is None
    assert {dom.findtext(event) for event in ("on_poweroff", "on_reboot", "on_crash")} == {"destroy"}


def test_an_image_without_a_kernel_boots_from_its_disk_through_the_bios() -> None:
    whole_disk = BootImage("abc", Path("/img/disk.raw"), kernel=None, initrd=None, cmdline="", size=1 << 20)
    dom = ET.fromstring(domain_xml("vm1", whole_disk, Path("/vms/vm1.qcow2"), Path("/vms/vm1.log"), image="abc"))
    assert dom.find("os/boot").get("dev") == "hd"
    assert dom.find("os/kernel") is None and dom.find("os/cmdline") is None
    assert image_of(ET.tostring(dom, encoding="unicode")) == "abc"
    assert image_of(ET.tostring(parse(), encoding="unicode")) is None  # a domain that names no image


def test_domain_options() -> None:
    dom = parse(accel="kvm", memory_mib=256, vcpus=2, uuid="6f1c0a52-8a1e-4b43-9a35-1f4d0c1b2a3e")
    assert dom.get("type") == "kvm" and dom.findtext("memory") == "256" and dom.findtext("vcpu") == "2"
    assert dom.findtext("uuid") == "6f1c0a52-8a1e-4b43-9a35-1f4d0c1b2a3e"
    with pytest.raises(ValueError, match="accel"):
        parse(accel="xen")
    with pytest.raises(ValueError, match="vcpu"):
        parse(vcpus=0)


def test_heartbeat_parsing() -> None:
    assert tinyguest.parse_heartbeat(b"HEARTBEAT 42\n" + b"\0" * 499) == 42
    assert tinyguest.parse_heartbeat(b"\0" * 512) == 0  # a fresh disk
    assert tinyguest.parse_heartbeat(b"garbage 7\n") == 0


def test_initramfs_is_a_gzipped_newc_archive_with_init_and_console() -> None:
    archive = gzip.decompress(tinyguest._initramfs(b"BUSYBOX", [("virtio", b"KO")]))
    names, pos = [], 0
    while True:
        assert archive[pos:pos + 6] == b"070701"
        size, namesize = int(archive[pos + 54:pos + 62], 16), int(archive[pos + 94:pos + 102], 16)
        name = archive[pos + 110:pos + 110 + namesize - 1].decode()
        names.append(name)
        pos += 110 + namesize
        pos += -pos % 4
        data = archive[pos:pos + size]
        pos += size + (-size % 4)
        if name == "init":
            assert data.startswith(b"#!/bin/busybox sh")
            assert tinyguest.READY.encode() in data and tinyguest.POWEROFF.encode() in data
        if name == "TRAILER!!!":
            break
    assert {"init", "bin/busybox", "dev/console", "lib/modules/virtio.ko", "lib/modules/load"} <= set(names)


def test_module_dependencies_come_from_modinfo() -> None:
    assert tinyguest._depends(b"\x7fELF...\0license=GPL\0depends=virtio,virtio_ring\0vermagic=6.1\0") == [
        "virtio", "virtio_ring"]
    assert tinyguest._depends(b"\0depends=\0intree=Y\0") == []


@pytest.fixture
def fresh_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel, "_chosen", None)


def test_no_qemu_binary_means_no_accelerator(fresh_choice: None) -> None:
    choice = accel.probe(GUEST, qemu="no-such-qemu-binary")
    assert choice.accel is None and "no-such-qemu-binary" in choice.reason


def test_a_smoke_boot_that_exits_reports_qemu_s_last_line(tmp_path: Path) -> None:
    fake = tmp_path / "qemu"
    fake.write_text("#!/bin/sh\necho 'failed to set MSR 0x10a' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(accel.SmokeFailure, match="failed to set MSR"):
        accel.smoke_boot(GUEST, "kvm", deadline=30, qemu=str(fake))


def test_choice_is_probed_once_and_kept_in_the_cache_file(fresh_choice: None, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    probes: list[int] = []

    def probe(*_args: object) -> accel.Choice:
        probes.append(1)
        return accel.Choice("qemu", "kvm: /dev/kvm missing")

    monkeypatch.setattr(accel, "probe", probe)
    cache = tmp_path / "accel.json"
    assert accel.choose(GUEST, cache).accel == "qemu"
    assert accel.choose(GUEST, cache).reason == "kvm: /dev/kvm missing" and len(probes) == 1
    monkeypatch.setattr(accel, "_chosen", None)  # another process on the same host: reads the file
    assert accel.choose(GUEST, cache) == accel.Choice("qemu", "kvm: /dev/kvm missing") and len(probes) == 1


def test_carried_xml_is_pointed_at_this_nodes_files_and_accelerator(tmp_path: Path) -> None:
    """Between embedded drivers each node's guests live elsewhere: a carried domain (and the domain inside a
    carried snapshot) must name this node's disk and console, and this node's accelerator."""
    image = TinyGuest(kernel=Path("/elsewhere/bases/d1/vmlinuz-6"), initrd=Path("/elsewhere/bases/d1/initrd.img-6"),
                      base=Path("/elsewhere/bases/d1/disk.raw"))
    there = domain_xml("ve:vm", image, Path("/elsewhere/ve--vm.qcow2"), Path("/elsewhere/ve--vm.log"), accel="kvm",
                       image="d1")
    here = QemuGuests("qemu", tmp_path, tmp_path / "seen", tmp_path / "save")
    dom = ET.fromstring(here.adapt(there))
    assert dom.get("type") == "qemu" and image_of(here.adapt(there)) == "d1"
    assert dom.findtext("os/kernel") == str(tmp_path / "seen" / "bases" / "d1" / "vmlinuz-6")
    assert dom.findtext("os/initrd") == str(tmp_path / "seen" / "bases" / "d1" / "initrd.img-6")
    assert dom.find("devices/disk/source").get("file") == str(tmp_path / "seen" / "ve--vm.qcow2")
    assert dom.find("devices/serial/source").get("path") == str(tmp_path / "seen" / "ve--vm.log")
    inactive = there.replace("<domain ", "<inactiveDomain ").replace("</domain>", "</inactiveDomain>")
    snapshot = ET.fromstring(here.adapt(f"<domainsnapshot><name>s1</name>{there}{inactive}</domainsnapshot>"))
    for domain in ("domain", "inactiveDomain"):  # as it ran, and the definition a revert brings back
        assert snapshot.find(f"{domain}/devices/disk/source").get("file") == str(tmp_path / "seen" / "ve--vm.qcow2")
        assert snapshot.findtext(f"{domain}/os/kernel") == str(tmp_path / "seen" / "bases" / "d1" / "vmlinuz-6")
    assert snapshot.findtext("name") == "s1"


def test_a_system_daemon_that_does_not_answer_is_one_line() -> None:
    from agents.hypervisor.qemu import BackendError, wait_for_daemon

    with pytest.raises(BackendError, match="^the libvirt daemon at qemu\\+tcp://127.0.0.1:1/system does not answer: ") \
            as err:
        wait_for_daemon("qemu+tcp://127.0.0.1:1/system", 0.0)
    assert "\n" not in str(err.value)
