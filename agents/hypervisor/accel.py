"""Pick the QEMU accelerator for real guests: KVM only after a guest actually booted with it.

`/dev/kvm` existing and libvirt listing `<domain type='kvm'>` prove nothing: on the machines this
project runs on, KVM guests abort at once ("failed to set MSR") or hang silently before their first
console line. So the answer comes from a smoke boot: the tiny guest started by plain
`qemu-system-x86_64 -accel kvm` (the same machine type and default CPU as `agents.hypervisor.qemu_xml`) must
print its ready line within a deadline; otherwise the answer is TCG ("qemu" in libvirt's words), and
the reason says why. TCG itself is not smoke-tested: where it fails, the failure is worth seeing.

The answer is cached per process, and optionally in a file keyed by the host's boot id and the QEMU
binary, so the agents of one machine do not each spend a smoke boot (or its deadline) at start.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from images.tinyguest import READY, TinyGuest

QEMU = "qemu-system-x86_64"
KVM_DEADLINE = 20.0
"""Seconds a KVM smoke boot may take to its ready line (it takes about 1 s where KVM works)."""


@dataclass(frozen=True)
class Choice:
    """`accel` is "kvm", "qemu" (TCG) or None when no QEMU guest can run here; `reason` says why."""

    accel: str | None
    reason: str


class SmokeFailure(Exception):
    """A smoke boot did not reach the ready line; the message is one line."""


_chosen: Choice | None = None


def _qemu_argv(qemu: str, guest: TinyGuest, accel: str, console: Path) -> list[str]:
    base = str(guest.base.absolute()).replace(",", ",,")  # QEMU option syntax: a comma is doubled
    fmt = "qcow2" if guest.base.suffix == ".qcow2" else "raw"
    return [qemu, "-accel", accel, "-machine", "pc", "-m", "128", "-nodefaults", "-no-user-config",
            "-display", "none", "-no-reboot", "-kernel", str(guest.kernel), "-initrd", str(guest.initrd),
            "-append", guest.cmdline, "-drive", f"file={base},if=virtio,format={fmt},snapshot=on",
            "-serial", f"file:{console}"]


def smoke_boot(guest: TinyGuest, accel: str, deadline: float, qemu: str = QEMU) -> float:
    """Boot `guest` with `accel` ("kvm" or "tcg") until its ready line; seconds taken, or SmokeFailure.

    The base disk is opened with snapshot=on, so the guest's writes never reach it. QEMU is killed
    and reaped before returning, whatever happened.
    """
    with tempfile.TemporaryDirectory(prefix="discovery-smoke-") as tmp:
        console, errors = Path(tmp) / "console.log", Path(tmp) / "qemu.err"
        start = time.monotonic()
        with errors.open("wb") as err:
            proc = subprocess.Popen(_qemu_argv(qemu, guest, accel, console), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=err)
        try:
            while time.monotonic() - start < deadline:
                if console.exists() and READY in console.read_text(errors="replace"):
                    return time.monotonic() - start
                if proc.poll() is not None:
                    lines = errors.read_text(errors="replace").strip().splitlines()
                    raise SmokeFailure(f"qemu exited ({proc.returncode}): {lines[-1] if lines else 'no message'}")
                time.sleep(0.1)
            raise SmokeFailure(f"no ready line within {deadline:g} s")
        finally:
            proc.kill()
            proc.wait()


def probe(guest: TinyGuest, deadline: float = KVM_DEADLINE, qemu: str = QEMU) -> Choice:
    """The accelerator this host can really use, found now (see `choose` for the cached answer)."""
    if shutil.which(qemu) is None:
        return Choice(None, f"no {qemu} on PATH (Debian package qemu-system-x86)")
    if not os.path.exists("/dev/kvm"):
        return Choice("qemu", "kvm: /dev/kvm missing")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return Choice("qemu", "kvm: /dev/kvm not accessible to this user")
    try:
        seconds = smoke_boot(guest, "kvm", deadline, qemu)
    except (SmokeFailure, OSError) as err:
        return Choice("qemu", f"kvm: smoke boot failed: {err}")
    return Choice("kvm", f"kvm: smoke boot ready in {seconds:.1f} s")


def _host_key(qemu: str) -> str:
    """Changes when the answer may: another boot of the host, another QEMU binary."""
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    binary = shutil.which(qemu)
    return f"{boot}:{binary}:{os.stat(binary).st_mtime_ns if binary else 0}"


def choose(guest: TinyGuest, cache_file: Path | None = None, deadline: float = KVM_DEADLINE,
           qemu: str = QEMU) -> Choice:
    """The accelerator for this process: probed once, then remembered (in `cache_file` too, if given)."""
    global _chosen
    if _chosen is not None:
        return _chosen
    key = _host_key(qemu)
    if cache_file is not None and cache_file.exists():
        try:
            saved = json.loads(cache_file.read_text())
            if saved.pop("key") == key:
                _chosen = Choice(**saved)
                return _chosen
        except (ValueError, KeyError, TypeError):
            pass  # unreadable or from an older layout: probe again
    _chosen = probe(guest, deadline, qemu)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.tmp")  # concurrent agents
        tmp.write_text(json.dumps({**asdict(_chosen), "key": key}))
        tmp.replace(cache_file)
    return _chosen
