"""A real Debian image boots: `images.debian`'s minbase, its kernel and initrd read out of the image, started
by qemu-system-x86_64 itself (direct kernel boot, root=/dev/vda) to the ready line its systemd unit prints; and,
given a NIC on a VE network's segment, it takes the address that segment's DHCP server leases to its MAC and says
so on the console as the tiny guest does (`tinyguest.NET`).

The build is cached (~50 s the first time: debootstrap from the host's apt mirror); skipped, with the reason,
where it cannot run at all (not root, no mirror) or where QEMU cannot. KVM when the host's smoke boot passed
(`agents.hypervisor.accel`), else TCG: ~12 s to the ready line on an idle 2-core machine, so the deadline
bounds a broken boot, not a slow one. QEMU is killed by its PID whatever happens (`accel.smoke_boot`).

The segment is a network namespace of the test's own (`dd-deb-*`): a bridge holding the gateway's address, the
guest's tap on it, and dnsmasq run as `agents.network.dhcp` runs it (a static lease for the guest's MAC, a router
option). QEMU runs inside that namespace (`ip netns exec`), so the guest's traffic never leaves it; deleting the
namespace ends whatever still runs there, whatever happened.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agents.hypervisor import accel
from discovery.testbed import net
from images import boot, debian, tinyguest

from .conftest import wait_for

pytestmark = pytest.mark.qemu
log = logging.getLogger(__name__)
BOOT_DEADLINE = 300.0
GATEWAY = ipaddress.IPv4Interface("10.0.0.1/24")
LEASED = "10.0.0.23"
GUEST_MAC = "02:dd:00:00:00:23"


@pytest.fixture(scope="module")
def minbase() -> Path:
    try:
        return debian.build("minbase")
    except debian.Unavailable as err:
        pytest.skip(f"cannot build a Debian image here: {err}")


@pytest.fixture(scope="module")
def accelerator() -> str:
    """QEMU's -accel: "kvm" where a KVM guest really booted on this host, else "tcg"."""
    try:
        probe_guest = tinyguest.build()
    except tinyguest.ImageError as err:
        pytest.skip(f"no tiny guest to probe KVM with: {err}")
    choice = accel.choose(probe_guest, cache_file=tinyguest.default_cache() / "accel.json")
    if choice.accel is None:
        pytest.skip(f"QEMU cannot run here: {choice.reason}")
    return "kvm" if choice.accel == "kvm" else "tcg"


def test_minbase_boots_to_its_ready_line(minbase: Path, accelerator: str, tmp_path: Path) -> None:
    found = boot.boot_files(minbase, tmp_path)
    assert found is not None  # a file system, with its kernel in /boot
    kernel, initrd = found
    assert kernel.name.startswith("vmlinuz-") and initrd.name == "initrd.img-" + kernel.name.removeprefix("vmlinuz-")
    guest = tinyguest.TinyGuest(kernel=kernel, initrd=initrd, base=minbase.with_name("disk.qcow2"),
                                cmdline=debian.CMDLINE)
    try:
        seconds = accel.smoke_boot(guest, accelerator, BOOT_DEADLINE)  # the qcow2 copy, opened with snapshot=on
    except accel.SmokeFailure as err:
        pytest.fail(f"Debian minbase under {accelerator}: {err}")
    log.info("Debian minbase: ready after %.1f s under %s", seconds, accelerator)


@pytest.fixture
def segment(tmp_path: Path) -> Iterator[str]:
    """A namespace holding a VE network's segment as the guest's host has it: bridge `br0` with the gateway's
    address, tap `tap0` on it for the guest's NIC, and dnsmasq leasing LEASED to GUEST_MAC (its log in
    `tmp_path/dnsmasq.log`). Deleted afterwards with everything running in it."""
    if os.geteuid() != 0:
        pytest.skip("a network namespace, a bridge and a tap need root")
    if shutil.which("dnsmasq") is None or not Path("/dev/net/tun").exists():
        pytest.skip("no dnsmasq (Debian package dnsmasq-base) or no /dev/net/tun: no DHCP server or tap here")
    ns = f"dd-deb-{uuid.uuid4().hex[:8]}"
    net.ip("netns", "add", ns)
    dnsmasq = None
    try:
        for argv in (("link", "set", "lo", "up"), ("link", "add", "br0", "type", "bridge"),
                     ("tuntap", "add", "dev", "tap0", "mode", "tap"), ("link", "set", "tap0", "master", "br0", "up"),
                     ("addr", "add", str(GATEWAY), "dev", "br0"), ("link", "set", "br0", "up")):
            net.ip("-n", ns, *argv)
        with (tmp_path / "dnsmasq.log").open("wb") as log_file:
            dnsmasq = subprocess.Popen(
                ["ip", "netns", "exec", ns, "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
                 "--interface=br0", "--bind-interfaces", "--no-hosts", "--no-resolv", "--leasefile-ro", "--pid-file=",
                 "--log-dhcp", f"--dhcp-range={GATEWAY.network.network_address},static,{GATEWAY.netmask},12h",
                 f"--dhcp-option=option:router,{GATEWAY.ip}", f"--dhcp-host={GUEST_MAC},{LEASED}"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log_file)
        yield ns
    finally:
        net.remove([ns])  # kills dnsmasq, and QEMU if it still runs
        if dnsmasq is not None:
            dnsmasq.wait()


def test_minbase_takes_its_address_by_dhcp_and_says_so(minbase: Path, accelerator: str, segment: str,
                                                       tmp_path: Path) -> None:
    found = boot.boot_files(minbase, tmp_path)
    assert found is not None
    kernel, initrd = found
    guest = tinyguest.TinyGuest(kernel=kernel, initrd=initrd, base=minbase.with_name("disk.qcow2"),
                                cmdline=debian.CMDLINE)
    console, errors = tmp_path / "console.log", tmp_path / "qemu.err"
    argv = [*accel._qemu_argv(accel.QEMU, guest, accelerator, console),  # the smoke boot's VM, plus one NIC
            "-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=n0,mac={GUEST_MAC}"]
    with errors.open("wb") as err:  # `ip netns exec` execs QEMU: the PID is QEMU's
        qemu = subprocess.Popen(["ip", "netns", "exec", segment, *argv], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err)
    expected = [tinyguest.READY, f"{tinyguest.NET} ip={LEASED}/{GATEWAY.netmask} router={GATEWAY.ip}"]  # any order
    try:
        wait_for(lambda: qemu.poll() is not None or all(line in _text(console) for line in expected),
                 timeout=BOOT_DEADLINE, what=f"Debian minbase under {accelerator} ready and configured by DHCP",
                 detail=lambda: f"console ends {_tail(console)!r}; dnsmasq {_tail(tmp_path / 'dnsmasq.log')!r}")
        assert qemu.poll() is None, f"qemu exited ({qemu.returncode}): {_tail(errors)}"
        wait_for(lambda: subprocess.run(["ip", "netns", "exec", segment, "ping", "-c", "1", "-W", "2", LEASED],
                                        capture_output=True).returncode == 0, what=f"the guest answering at {LEASED}")
    finally:
        qemu.kill()
        qemu.wait()


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _tail(path: Path, lines: int = 3) -> str:
    return " | ".join(_text(path).strip().splitlines()[-lines:])
