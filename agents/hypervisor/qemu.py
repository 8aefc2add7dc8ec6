"""Setting up a node for real QEMU guests: the guest image, the accelerator, and the libvirt to use.

Three ways, chosen by the agent's `libvirt_uri`:
- `qemu:///system`: the host's system libvirtd, run by the operator, as on any host of a cloud; peers
  live-migrate to the URI the agent advertises (`migration_uri`, by default `qemu+tcp://HOST/system`), and
  its guests live in `data_dir/guests`, a path every host must share (live migration keeps the domain's XML,
  as Nova's `instances_path` must be the same on all compute hosts);
- empty: the node's own libvirtd (`agents.hypervisor.libvirtd`), started here and stopped with the agent, which
  live-migrates VMs to its peers' daemons: several nodes on one machine, each its own "system" daemon;
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
import time
from dataclasses import dataclass
from pathlib import Path

import libvirt

from agents.config import SYSTEM_LIBVIRT
from agents.hypervisor import accel
from agents.hypervisor.guests import QemuGuests
from agents.hypervisor.libvirtd import GUESTS, Libvirtd, running_pid
from images import tinyguest
from images.tinyguest import TinyGuest

log = logging.getLogger(__name__)
EMBED = "qemu:///embed"
SYSTEM_SAVE = Path("/var/lib/libvirt/qemu/save")
"""Where the system daemon's QEMU driver keeps its managed save images."""
SYSTEM_WAIT = 30.0
"""How long an agent waits for the system daemon to answer (both start at a host's boot)."""


class BackendError(Exception):
    """Real guests cannot run on this node; the message says why in one line."""


@dataclass
class QemuBackend:
    guests: QemuGuests
    uri: str
    daemon: Libvirtd | None  # the node's own daemon: None for the embedded driver and the system daemon
    reason: str  # why this accelerator
    migration_uri: str | None  # where peers migrate VMs to this node; None: it cannot receive one

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
                 host: str = "127.0.0.1", migration_uri: str = "") -> QemuBackend:
    """Choose KVM or TCG by a smoke boot of the tiny guest (built, or found built), and open libvirt: the
    system daemon, the node's own daemon (listening on `host`, the node's address) or the embedded driver."""
    _, chosen, why = prepare_guest()
    reason = f"{'KVM' if chosen == 'kvm' else 'TCG'} ({why})"
    root = libvirt_root(data_dir, libvirt_uri)
    if libvirt_uri.startswith(EMBED):
        directory = data_dir / "guests"
        directory.mkdir(parents=True, exist_ok=True)
        guests = QemuGuests(chosen, directory, directory, root / "lib" / "qemu" / "save")
        return QemuBackend(guests, f"{EMBED}?root={root}", None, reason, None)
    if libvirt_uri == SYSTEM_LIBVIRT:
        wait_for_daemon(SYSTEM_LIBVIRT, SYSTEM_WAIT)
        directory = data_dir / "guests"
        directory.mkdir(parents=True, exist_ok=True)
        guests = QemuGuests(chosen, directory, directory, SYSTEM_SAVE)
        peers_use = migration_uri or f"qemu+tcp://{host}/system"
        log.info("system libvirtd for %s, peers migrate to %s, guests use %s", data_dir, peers_use, reason)
        return QemuBackend(guests, SYSTEM_LIBVIRT, None, reason, peers_use)
    if libvirt_uri:
        raise BackendError(f"libvirt_uri {libvirt_uri!r}: with hypervisor qemu, use {SYSTEM_LIBVIRT} (the host's "
                           f"daemon), leave it empty (the node's own libvirtd) or use {EMBED}")
    daemon = Libvirtd(root, port, migration_ports, host)
    daemon.start()
    guests = QemuGuests(chosen, daemon.guests, GUESTS, root / "lib" / "qemu" / "save")
    log.info("libvirtd for %s on %s (pid %s), guests use %s", data_dir, daemon.uri, daemon.pid, reason)
    return QemuBackend(guests, daemon.uri, daemon, reason, daemon.uri)


def wait_for_daemon(uri: str, deadline: float) -> None:
    """Wait until the daemon at `uri` answers; BackendError with its last error if it does not in time."""
    end = time.monotonic() + deadline
    while True:
        try:
            libvirt.open(uri).close()
            return
        except libvirt.libvirtError as err:
            if time.monotonic() >= end:
                raise BackendError(f"the libvirt daemon at {uri} does not answer: {err.get_error_message()}") from None
        time.sleep(0.2)
