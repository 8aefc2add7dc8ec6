"""One `libvirtd` per node, each in a private mount namespace, so several nodes share one machine.

Live migration needs a daemon at each end (the embedded driver cannot migrate), and libvirtd's
system paths are fixed: its config in /etc/libvirt, sockets in /run/libvirt, domain state in
/var/lib/libvirt. So each node's daemon runs under `unshare --mount`, with the node's own directories
bind-mounted over those paths, a TCP listener on the node's address (its own port; no auth: the agents'
mutual TLS guards who may ask for a migration, and the address is the node's private one),
its own `host_uuid` (libvirt refuses to migrate to "the same host") and its own migration port range.

Guest disks and consoles live in the node's `guests/` directory, mounted at `GUESTS` inside the
namespace: every node's domain XML names the same paths, each pointing at that node's own files.
That is what lets a domain defined on one node be migrated, with its XML unchanged, to another.

The same layout makes a host's system daemon for the testbed (`Libvirtd.as_system`): there the daemon is the
host's, started before its agent in the same mount namespace, and the agent reaches it as `qemu:///system`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import libvirt

from agents.hypervisor.qemu_xml import QEMU_CONF

GUESTS = Path("/var/lib/discovery-guests")
"""Where a node's guest disks and console logs appear inside its daemon's namespace."""
BOUND = {"etc": "/etc/libvirt", "run": "/run/libvirt", "lib": "/var/lib/libvirt", "cache": "/var/cache/libvirt",
         "log": "/var/log/libvirt", "guests": str(GUESTS)}
"""The node directory's subdirectories, and the system path each one hides inside the namespace."""
START_DEADLINE = 30.0

LIBVIRTD_CONF = """\
# Written by Discovery: one daemon per node, reached over TCP on the node's address.
listen_tls = 0
listen_tcp = 1
listen_addr = "{host}"
tcp_port = "{port}"
auth_tcp = "none"
auth_unix_rw = "none"
host_uuid = "{host_uuid}"
log_outputs = "3:file:{log}"
"""

MIGRATION_CONF = """\
# This node's own migration ports: they carry the memory and the NBD disk copy.
migration_port_min = {migration_min}
migration_port_max = {migration_max}
"""


class LibvirtdError(Exception):
    """The daemon could not be started or reached; the message is one line."""


@dataclass
class Libvirtd:
    """A node's daemon: `root` holds its directories, `port` its TCP listener, `migration_ports` a range."""

    root: Path
    port: int
    migration_ports: tuple[int, int]
    host: str = "127.0.0.1"
    """The node's address: the daemon listens there, and peers migrate to it."""
    host_uuid: str = ""
    pid: int | None = None

    @property
    def uri(self) -> str:
        """How agents (this node's and its peers') reach the daemon."""
        return f"qemu+tcp://{self.host}:{self.port}/system"

    @property
    def guests(self) -> Path:
        """The node's guest directory as seen from outside the namespace (inside, it is GUESTS)."""
        return self.root / "guests"

    def start(self, deadline: float = START_DEADLINE) -> None:
        """Start the daemon and wait until it answers on its port; LibvirtdError if it does not. A daemon
        of this root still running (its agent was killed) is adopted, not started twice."""
        self.root = self.root.absolute()
        running = running_pid(self.root)
        if running is not None and self._answers():
            self.pid = running
            return
        script = f"{self.configure()} && exec libvirtd --listen --pid-file {self.pid_file}"
        with (self.root / "libvirtd.out").open("ab") as out:
            proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.pid = proc.pid
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if proc.poll() is not None:
                raise LibvirtdError(f"libvirtd for {self.root} exited ({proc.returncode}): {self._last_line()}")
            if self._answers():
                return
            time.sleep(0.1)
        self.stop()
        raise LibvirtdError(f"libvirtd for {self.root} did not answer on port {self.port} within {deadline:g} s")

    def as_system(self, then: list[str], extra_mounts: dict[Path, str] | None = None) -> list[str]:
        """The command that makes this daemon the system libvirtd of a host that is a mount namespace: it
        starts the daemon there in the background (unless it still runs), then execs `then` (the host's agent,
        with `libvirt_uri = "qemu:///system"`) in the same namespace, so that it reaches the daemon the way an
        agent on a real host does, through /run/libvirt's socket. `extra_mounts` (source → path) give the
        host more of its own paths (its agent's data directory where every host keeps it)."""
        self.root = self.root.absolute()
        for target in (extra_mounts or {}).values():
            Path(target).mkdir(parents=True, exist_ok=True)
        binds = "".join(f" && mount --bind {source} {target}" for source, target in (extra_mounts or {}).items())
        # A daemon that outlived its agent (a crash; the guests live on) is kept: the agent adopts its guests.
        daemon = (f'{{ kill -0 "$(cat {self.pid_file} 2>/dev/null)" 2>/dev/null || '
                  f"libvirtd --daemon --listen --pid-file {self.pid_file}; }}")
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                f'{self.configure()}{binds} && {daemon} && exec "$@"', "host", *then]

    @property
    def pid_file(self) -> Path:
        return self.root / "libvirtd.pid"

    def configure(self) -> str:
        """Write the daemon's configuration under `root`; returns the shell commands that mount its
        directories over the system paths (run inside the daemon's mount namespace)."""
        self.host_uuid = self.host_uuid or self._stable_uuid()
        for sub in BOUND:
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for target in BOUND.values():
            Path(target).mkdir(parents=True, exist_ok=True)  # mount points must exist outside too
        log = self.root / "libvirtd.log"
        (self.root / "etc" / "libvirtd.conf").write_text(
            LIBVIRTD_CONF.format(host=self.host, port=self.port, host_uuid=self.host_uuid, log=log))
        low, high = self.migration_ports
        (self.root / "etc" / "qemu.conf").write_text(
            QEMU_CONF + MIGRATION_CONF.format(migration_min=low, migration_max=high))
        return " && ".join(f"mount --bind {self.root / sub} {target}" for sub, target in BOUND.items())

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`; the daemon's guests are the caller's to destroy first."""
        pid, self.pid = self.pid, None
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    return
            except ChildProcessError:  # not our child (adopted after a restart): poll its existence
                if not Path(f"/proc/{pid}").exists():
                    return
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)

    def _answers(self) -> bool:
        try:
            libvirt.open(self.uri).close()
        except libvirt.libvirtError:
            return False
        return True

    def _stable_uuid(self) -> str:
        """A host uuid kept in the node directory, so the daemon is the same host across restarts."""
        path = self.root / "host_uuid"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(str(uuid.uuid4()))
        return path.read_text().strip()

    def _last_line(self) -> str:
        for name in ("libvirtd.out", "libvirtd.log"):
            lines = (self.root / name).read_text(errors="replace").strip().splitlines() \
                if (self.root / name).exists() else []
            if lines:
                return lines[-1]
        return "no message"


def running_pid(root: Path) -> int | None:
    """The pid of the libvirtd started for `root`, if it still runs (checked: a recycled pid is not it)."""
    try:
        pid = int((root / "libvirtd.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"libvirtd" in cmdline and str(root).encode() in cmdline else None
