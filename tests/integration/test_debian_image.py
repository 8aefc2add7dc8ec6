"""A real Debian image boots: `images.debian`'s minbase, its kernel and initrd read out of the image, started
by qemu-system-x86_64 itself (direct kernel boot, root=/dev/vda) to the ready line its systemd unit prints.

The build is cached (~50 s the first time: debootstrap from the host's apt mirror); skipped, with the reason,
where it cannot run at all (not root, no mirror) or where QEMU cannot. KVM when the host's smoke boot passed
(`agents.hypervisor.accel`), else TCG: ~12 s to the ready line on an idle 2-core machine, so the deadline
bounds a broken boot, not a slow one. QEMU is killed by its PID whatever happens (`accel.smoke_boot`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from agents.hypervisor import accel
from images import boot, debian, tinyguest

pytestmark = pytest.mark.qemu
log = logging.getLogger(__name__)
BOOT_DEADLINE = 300.0


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
