"""NBD exports of the files a standby's node receives a VM's mirrored disk into (`agents.hypervisor.mirror`).

One `qemu-nbd` process per export, a child of the agent (in its process group, so a power cut of the node
ends it too), listening on the node's own address on a port of its own, serving one qcow2 overlay read-write
to the VM host's QEMU. Its pid is kept in `<dir>/<name>.pid`, so that an agent that died leaves no export
behind once it starts again (`end_leftovers`). Stopping one (SIGTERM) makes qemu-nbd flush the file first.

Known limit: the export is plain NBD, as a block copy's destination usually is; anyone who can reach the
port while the mirror runs can write the file. It listens only on the node's address, which in a real
deployment is the cluster's own network.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

START_PATIENCE = 10.0
"""Seconds a new qemu-nbd has to start listening."""
STOP_PATIENCE = 10.0
"""Seconds qemu-nbd has to flush and exit after SIGTERM before it is killed."""


class NbdError(Exception):
    """An export could not be started; the message says why."""


@dataclass(frozen=True)
class Export:
    host: str
    port: int
    name: str


class NbdExports:
    """The running exports of one node, by name; `directory` keeps their pid files."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._running: dict[str, tuple[subprocess.Popen[bytes], Export]] = {}

    def get(self, name: str) -> Export | None:
        entry = self._running.get(name)
        return entry[1] if entry is not None and entry[0].poll() is None else None

    def start(self, name: str, file: Path, host: str) -> Export:
        """Serve `file` (qcow2) as export `name` on `host`, on a free port. Blocking (call it off the loop)."""
        self.stop(name)
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # the port chosen may be taken by someone else before qemu-nbd binds it
            port = _free_port(host)
            with self._file(name, ".log").open("wb") as log:  # its errors; a pipe unread could fill up
                process = subprocess.Popen(
                    ["qemu-nbd", "--persistent", "--shared=2", "--format=qcow2", "--cache=writeback",
                     "--discard=unmap", f"--bind={host}", f"--port={port}", f"--export-name={name}", str(file)],
                    stdout=subprocess.DEVNULL, stderr=log)
            self._file(name, ".pid").write_text(str(process.pid))
            if _listening(process, host, port):
                export = Export(host, port, name)
                self._running[name] = (process, export)
                return export
            _end(process)
            self._file(name, ".pid").unlink(missing_ok=True)
            why = self._file(name, ".log").read_text(errors="replace").strip().rpartition("\n")[2]
        raise NbdError(f"qemu-nbd cannot serve {file.name}: {why or 'it did not listen'}")

    def stop(self, name: str) -> bool:
        """Stop export `name` (qemu-nbd flushes the file); whether one ran. Blocking."""
        process, _ = self._running.pop(name, (None, None))
        self._file(name, ".pid").unlink(missing_ok=True)
        if process is None:
            return False
        _end(process)
        return True

    def stop_all(self) -> None:
        for name in list(self._running):
            self.stop(name)

    def end_leftovers(self) -> list[int]:
        """Kill the exports an earlier run of the agent left (their pid files); their pids."""
        return end_leftovers(self.directory)

    def _file(self, name: str, suffix: str) -> Path:
        return self.directory / (name.replace(":", "--") + suffix)


def end_leftovers(directory: Path) -> list[int]:
    """Kill the qemu-nbd processes whose pid files are in `directory` (no other process: the pid is checked)."""
    ended = []
    for pid_file in directory.glob("*.pid"):
        with contextlib.suppress(ValueError, OSError):
            pid = int(pid_file.read_text())
            if b"qemu-nbd" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
                ended.append(pid)
        pid_file.unlink(missing_ok=True)
    return ended


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _listening(process: subprocess.Popen[bytes], host: str, port: int) -> bool:
    """Whether qemu-nbd serves: it greets a client with NBDMAGIC only once its image is open and its main loop
    runs (it listens before: a connection alone proves nothing, and a SIGTERM before then may be lost)."""
    deadline = time.monotonic() + START_PATIENCE
    while process.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1) as probe:
            if probe.recv(8, socket.MSG_WAITALL) == b"NBDMAGIC":
                return True
        time.sleep(0.05)
    return False


def _end(process: subprocess.Popen[bytes]) -> None:
    """Stop `process`: SIGTERM (qemu-nbd flushes and exits), then SIGKILL."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_PATIENCE)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
