"""Setting up a node for real QEMU guests: the guest image, the accelerator, and the libvirt to use.

Two ways, chosen by the agent's `libvirt_uri`:
- empty: the node's own libvirtd (`agents.hypervisor.libvirtd`), started here and stopped with the agent, which
  live-migrates VMs to its peers' daemons;
- `qemu:///embed`: the QEMU driver inside the agent process, rooted in the data directory, with no
  daemon and no live migration (VMs then move by save → ship → restore).
The guests (QEMU processes) outlive the agent and its daemon, as they would under a production
libvirtd restart; `discovery cluster down` and the tests end them through libvirt's pid files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from agents.hypervisor import accel
from agents.hypervisor.guests import QemuGuests
from agents.hypervisor.libvirtd import GUESTS, Libvirtd, running_pid
from images import tinyguest
from images.tinyguest import TinyGuest

log = logging.getLogger(__name__)
EMBED = "qemu:///embed"


class BackendError(Exception):
    """Real guests cannot run on this node; the message says why in one line."""


@dataclass
class QemuBackend:
    guests: QemuGuests
    uri: str
    daemon: Libvirtd | None  # None for the embedded driver
    reason: str  # why this accelerator

    @property
    def migration_uri(self) -> str | None:
        return self.daemon.uri if self.daemon else None

    def close(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()


def libvirt_root(data_dir: Path, libvirt_uri: str) -> Path:
    """Where the node's libvirt keeps its state (pid files of its guests under run/qemu)."""
    return data_dir / ("embed" if libvirt_uri.startswith(EMBED) else "libvirtd")


def qemu_pids(root: Path) -> list[int]:
    """The QEMU processes libvirt started under `root` that still run, from its pid files (guests outlive
    the agent); a pid now used by another program is left out."""
    pids = []
    for file in (root / "run" / "qemu").glob("*.pid"):
        text = file.read_text().strip()
        if file.name == "driver.pid" or not text.isdigit():
            continue
        try:
            if b"qemu" in Path(f"/proc/{text}/cmdline").read_bytes():
                pids.append(int(text))
        except OSError:
            continue  # gone
    return pids


def end_leftovers(data_dir: Path) -> list[int]:
    """Kill the guests and the daemon a node left running (its agent is gone); returns their pids."""
    ended = []
    for uri in ("", EMBED):
        root = libvirt_root(data_dir, uri)
        pids = qemu_pids(root) + [pid for pid in [running_pid(root)] if pid is not None]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        ended += pids
    return ended


def prepare_guest() -> tuple[TinyGuest, str, str]:
    """The tiny guest, built (or found in the cache), the accelerator a smoke boot chose for it ("kvm" or
    "qemu", cached per host boot) and why; BackendError when either is missing."""
    try:
        guest = tinyguest.build()
    except tinyguest.ImageError as err:
        raise BackendError(f"cannot build the tiny guest: {err}") from None
    choice = accel.choose(guest, cache_file=tinyguest.default_cache() / "accel.json")
    if choice.accel is None:
        raise BackendError(f"QEMU cannot run here: {choice.reason}")
    return guest, choice.accel, choice.reason


def open_backend(data_dir: Path, libvirt_uri: str, port: int, migration_ports: tuple[int, int],
                 host: str = "127.0.0.1") -> QemuBackend:
    """Choose KVM or TCG by a smoke boot of the tiny guest (built, or found built), and open libvirt: the
    node's own daemon listens on `host`, the node's address."""
    _, chosen, why = prepare_guest()
    reason = f"{'KVM' if chosen == 'kvm' else 'TCG'} ({why})"
    root = libvirt_root(data_dir, libvirt_uri)
    if libvirt_uri.startswith(EMBED):
        directory = data_dir / "guests"
        directory.mkdir(parents=True, exist_ok=True)
        guests = QemuGuests(chosen, directory, directory, root / "lib" / "qemu" / "save")
        return QemuBackend(guests, f"{EMBED}?root={root}", None, reason)
    if libvirt_uri:
        raise BackendError(f"libvirt_uri {libvirt_uri!r}: with hypervisor qemu, leave it empty (the node's "
                           f"own libvirtd) or use {EMBED}")
    daemon = Libvirtd(root, port, migration_ports, host)
    daemon.start()
    guests = QemuGuests(chosen, daemon.guests, GUESTS, root / "lib" / "qemu" / "save")
    log.info("libvirtd for %s on %s (pid %s), guests use %s", data_dir, daemon.uri, daemon.pid, reason)
    return QemuBackend(guests, daemon.uri, daemon, reason)
