"""Real QEMU guests through libvirt's embedded QEMU driver: boot, suspend/resume, snapshot/revert, ACPI.

The tiny guest (images/tinyguest.py) writes `HEARTBEAT <n>` to its disk and console every second, so
each operation is proven by the counter: it stops while paused, a reverted snapshot brings the disk's
value back, ACPI shutdown ends the domain. TCG boots it in ~3 s on an idle 2-core machine and ~45 s
when the machine is loaded ~10x; the deadlines below are generous on purpose, nothing here depends
on speed otherwise. Skipped, with the reason, where QEMU or the guest image is not available.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from agents.hypervisor import accel
from agents.hypervisor.qemu import qemu_pids
from agents.hypervisor.qemu_xml import domain_xml, open_embed
from images import tinyguest

from .conftest import holds, pid_alive, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.qemu]

BOOT_DEADLINE = 150.0
STEP_DEADLINE = 60.0
_names = itertools.count(1)


def wait_until(predicate: Callable[[], Any], deadline: float, what: str, console: Path | None = None) -> Any:
    """`wait_for`, whose failure shows the end of the guest's console."""

    def tail() -> str:
        return f"console tail: {console.read_text(errors='replace')[-400:]!r}" if console and console.exists() else ""

    return wait_for(predicate, deadline, what, interval=0.2, detail=tail)


def heartbeats(console: Path, offset: int = 0) -> list[int]:
    """The counters the guest printed on its console after byte `offset`."""
    if not console.exists():
        return []
    text = console.read_bytes()[offset:].decode(errors="replace")
    return [int(line.split()[1]) for line in text.splitlines()
            if line.startswith("HEARTBEAT ") and line.split()[1].isdigit()]


class Guest:
    """One running tiny-guest domain, its overlay disk and its console log."""

    def __init__(self, conn: libvirt.virConnect, image: tinyguest.TinyGuest, kind: str, directory: Path) -> None:
        self.name = f"tiny-{os.getpid()}-{next(_names)}"
        self.disk = tinyguest.make_overlay(image.base, directory / f"{self.name}.qcow2")
        self.console = directory / f"{self.name}.log"
        self.dom = conn.defineXML(domain_xml(self.name, image, self.disk, self.console, accel=kind))

    def start(self) -> None:
        self.dom.create()
        wait_until(lambda: tinyguest.READY in self.console.read_text(errors="replace") if self.console.exists()
                   else False, BOOT_DEADLINE, f"{self.name} ready line", self.console)

    def beats(self, offset: int = 0) -> list[int]:
        return heartbeats(self.console, offset)

    def wait_beat_above(self, value: int, offset: int = 0) -> int:
        return wait_until(lambda: (last := max(self.beats(offset), default=-1)) > value and last,
                          STEP_DEADLINE, f"heartbeat above {value}", self.console)

    def remove(self) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            if self.dom.isActive():
                self.dom.destroy()
        with contextlib.suppress(libvirt.libvirtError):
            self.dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)


@pytest.fixture(scope="module")
def image() -> tinyguest.TinyGuest:
    try:
        return tinyguest.build()
    except tinyguest.ImageError as err:
        pytest.skip(f"no tiny guest image: {err}")


@pytest.fixture(scope="module")
def kind(image: tinyguest.TinyGuest) -> str:
    choice = accel.choose(image, cache_file=tinyguest.default_cache() / "accel.json")
    if choice.accel is None:
        pytest.skip(f"QEMU cannot run here: {choice.reason}")
    return choice.accel


@pytest.fixture(scope="module")
def conn(tmp_path_factory: pytest.TempPathFactory, kind: str) -> Iterator[libvirt.virConnect]:
    root = tmp_path_factory.getbasetemp() / "embed"  # libvirt allows one embedded root per process
    try:
        connection = open_embed(root)
    except libvirt.libvirtError as err:
        hint = " (it needs the system account libvirt-qemu: see .ci/run)" if "libvirt-qemu" in str(err) else ""
        pytest.skip(f"libvirt's embedded QEMU driver does not open: {err.get_error_message()}{hint}")
    try:
        yield connection
    finally:
        for dom in connection.listAllDomains():
            with contextlib.suppress(libvirt.libvirtError):
                if dom.name().startswith(f"tiny-{os.getpid()}-") and dom.isActive():
                    dom.destroy()
        connection.close()
        # QEMU outlives a closed embed connection (and this process): kill what our pid files name.
        survivors = [pid for pid in qemu_pids(root) if pid_alive(pid)]
        for pid in survivors:
            os.kill(pid, signal.SIGKILL)
        assert not survivors, f"QEMU processes left running after destroy: {survivors}"


@pytest.fixture
def guest(conn: libvirt.virConnect, image: tinyguest.TinyGuest, kind: str, tmp_path: Path) -> Iterator[Guest]:
    made = Guest(conn, image, kind, tmp_path)
    try:
        made.start()
        yield made
    finally:
        made.remove()


def test_boots_and_beats_on_its_disk(guest: Guest) -> None:
    beat = guest.wait_beat_above(2)
    assert tinyguest.read_heartbeat(guest.disk) >= beat - 1  # the console prints right after the write


def test_suspend_stops_the_heartbeat_and_resume_continues_it(guest: Guest) -> None:
    guest.wait_beat_above(1)
    guest.dom.suspend()
    assert guest.dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
    paused_at = max(guest.beats())
    holds(lambda: max(guest.beats()) == paused_at, 3, "no beat while paused")  # no vCPU runs while paused
    guest.dom.resume()
    assert guest.wait_beat_above(paused_at + 1) > paused_at + 1


def test_snapshot_revert_brings_the_disk_back(guest: Guest) -> None:
    guest.wait_beat_above(1)
    guest.dom.suspend()  # a still guest: the snapshot holds exactly the value read here
    at_snapshot = tinyguest.read_heartbeat(guest.disk)
    snap = guest.dom.snapshotCreateXML("<domainsnapshot><name>s1</name></domainsnapshot>")
    guest.dom.resume()
    before_revert = wait_until(lambda: (v := tinyguest.read_heartbeat(guest.disk)) >= at_snapshot + 3 and v,
                               STEP_DEADLINE, "heartbeat moves on after the snapshot", guest.console)
    offset = guest.console.stat().st_size
    guest.dom.revertToSnapshot(snap, libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_PAUSED)
    assert guest.dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
    assert tinyguest.read_heartbeat(guest.disk) == at_snapshot < before_revert
    guest.dom.resume()
    first = wait_until(lambda: guest.beats(offset), STEP_DEADLINE, "heartbeat after revert", guest.console)[0]
    assert first in (at_snapshot, at_snapshot + 1)  # the counter in memory came back too, and goes on
    wait_until(lambda: tinyguest.read_heartbeat(guest.disk) > at_snapshot, STEP_DEADLINE,
               "disk heartbeat goes on from the snapshot", guest.console)


def test_acpi_shutdown_ends_the_domain(guest: Guest) -> None:
    guest.wait_beat_above(1)
    guest.dom.shutdown()  # the ACPI power button: the guest syncs and powers off
    wait_until(lambda: not guest.dom.isActive(), STEP_DEADLINE, "domain off after ACPI shutdown", guest.console)
    assert tinyguest.POWEROFF in guest.console.read_text(errors="replace")
    assert tinyguest.read_heartbeat(guest.disk) >= 1


def test_its_web_server_burns_the_cpu_it_is_asked_for(image: tinyguest.TinyGuest, kind: str, tmp_path: Path) -> None:
    """`/cgi-bin/load?cpu=N` (what a campaign's `load` asks each guest): QEMU's CPU time then grows at about N %
    of a core, and falls back to idle at `cpu=0`; a bad N is a 400. The guest has one NIC on QEMU's user-mode
    network, its port 80 forwarded from a loopback port. Rates are taken over 2 s windows until one shows the
    expected side of the threshold, so a loaded machine only makes it wait."""
    with socket.socket() as probe:  # a free loopback port for QEMU's forward
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    console, errors = tmp_path / "console.log", tmp_path / "qemu.err"
    argv = [*accel._qemu_argv(accel.QEMU, image, "kvm" if kind == "kvm" else "tcg", console), "-netdev",
            f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:80", "-device", "virtio-net-pci,netdev=n0"]
    with errors.open("wb") as err:
        qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)

    def ask(cpu: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/cgi-bin/load?cpu={cpu}", timeout=10) as answer:
            return answer.read().decode().strip()

    def rate() -> float:
        """QEMU's CPU seconds per second over the next 2 s."""
        def used() -> float:
            fields = Path(f"/proc/{qemu.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        before, start = used(), time.monotonic()
        time.sleep(2)
        return (used() - before) / (time.monotonic() - start)

    try:
        wait_until(lambda: qemu.poll() is not None or tinyguest.NET in (
            console.read_text(errors="replace") if console.exists() else ""), BOOT_DEADLINE,
                   "the guest's address by DHCP", console)
        assert qemu.poll() is None, f"qemu exited ({qemu.returncode}): {errors.read_text()[-300:]}"
        assert wait_until(lambda: _answer(ask, "70"), STEP_DEADLINE, "the web server") == f"{tinyguest.LOAD} cpu=70"
        wait_until(lambda: rate() > 0.5, STEP_DEADLINE, "QEMU burning over half a core", console)
        assert ask("0") == f"{tinyguest.LOAD} cpu=0"
        wait_until(lambda: rate() < 0.25, STEP_DEADLINE, "QEMU back to idle", console)
        with pytest.raises(urllib.error.HTTPError, match="400"):
            ask("lots")
        assert f"{tinyguest.LOAD} cpu=70" in console.read_text(errors="replace")
    finally:
        qemu.kill()
        qemu.wait()


def _answer(ask: Callable[[str], str], cpu: str) -> str:
    """`ask(cpu)`, or '' while the web server does not answer yet."""
    try:
        return ask(cpu)
    except OSError:
        return ""
