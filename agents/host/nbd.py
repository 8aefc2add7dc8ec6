"""NBD exports of the files a standby's node receives a VM's mirrored disk into (`agents.hypervisor.mirror`).

One `qemu-nbd` process per export, a child of the agent (in its process group, so a power cut of the node
ends it too), listening on the node's own address on a port of its own, serving one qcow2 overlay read-write
to the VM host's QEMU. Its pid is kept in `<dir>/<name>.pid`, so that an agent that died leaves no export
behind once it starts again (`end_leftovers`). Stopping one (SIGTERM) makes qemu-nbd flush the file first: its
qcow2 metadata is cached until then (`--cache=writeback`), so a file whose qemu-nbd died otherwise (a power cut,
SIGKILL) may be torn, which `end_leftovers` tells apart.

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
from collections.abc import Iterable
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

    def start(self, name: str, file: Path, host: str, bandwidth: int = 0) -> Export:
        """Serve `file` (qcow2) as export `name` on `host`, on a free port, writes throttled to `bandwidth` bytes/s
        (0: not; a QEMU throttle group, whose back-pressure slows the sender's mirror). Blocking (call it off
        the loop)."""
        self.stop(name)
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # the port chosen may be taken by someone else before qemu-nbd binds it
            port = _free_port(host)
            with self._file(name, ".log").open("wb") as log:  # its errors; a pipe unread could fill up
                process = subprocess.Popen(
                    ["qemu-nbd", "--persistent", "--shared=2", "--cache=writeback", "--discard=unmap",
                     f"--bind={host}", f"--port={port}", f"--export-name={name}", *_image(file, bandwidth)],
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
        """Stop export `name`; whether its file is whole: qemu-nbd ran until now and flushed it as it exited
        (False: none ran, or it died on its own or had to be killed, and the file may be torn). Blocking."""
        process, _ = self._running.pop(name, (None, None))
        self._file(name, ".pid").unlink(missing_ok=True)
        return process is not None and _end(process)

    def stop_all(self) -> None:
        for name in list(self._running):
            self.stop(name)

    def end_leftovers(self, names: Iterable[str]) -> set[str]:
        """End every export: this object's, and those an earlier run of the agent left (their pid files). Of
        `names`, those whose file qemu-nbd flushed as it exited (the others' may be torn, or had no export)."""
        flushed = {self._file(name, "").name: self.stop(name) for name in list(self._running)}
        flushed.update(end_leftovers(self.directory))
        return {name for name in names if flushed.get(self._file(name, "").name)}

    def _file(self, name: str, suffix: str) -> Path:
        return self.directory / (name.replace(":", "--") + suffix)


def end_leftovers(directory: Path) -> dict[str, bool]:
    """End the qemu-nbd processes whose pid files are in `directory` (SIGTERM: each flushes its file and exits,
    else SIGKILL after STOP_PATIENCE; a pid that is no qemu-nbd is left alone). For each pid file's name (without
    `.pid`): whether its qemu-nbd was running and exited on SIGTERM, so that its file is whole."""
    flushed = {}
    for pid_file in directory.glob("*.pid"):
        flushed[pid_file.stem] = False
        with contextlib.suppress(ValueError, OSError):
            pid = int(pid_file.read_text())
            if b"qemu-nbd" in Path(f"/proc/{pid}/cmdline").read_bytes():
                flushed[pid_file.stem] = _terminate(pid)
        pid_file.unlink(missing_ok=True)
    return flushed


def _terminate(pid: int) -> bool:
    """SIGTERM `pid` (not our child) and wait for it to go; SIGKILL it after STOP_PATIENCE. Whether SIGTERM did."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_PATIENCE
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z":
                return True  # exited; its parent (a dead agent's heir) has not reaped it yet
        except (OSError, IndexError):
            return True
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return False


def _image(file: Path, bandwidth: int) -> list[str]:
    """qemu-nbd's arguments naming the qcow2 `file`, behind a throttle of `bandwidth` bytes/s of writes if not 0."""
    if not bandwidth:
        return ["--format=qcow2", str(file)]
    image = f"driver=throttle,throttle-group=limit,file.driver=qcow2,file.file.driver=file,file.file.filename={file}"
    return ["--object", f"throttle-group,id=limit,x-bps-write={bandwidth}", "--image-opts", image]


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


def _end(process: subprocess.Popen[bytes]) -> bool:
    """Stop `process`: SIGTERM (qemu-nbd flushes and exits), then SIGKILL; whether it ran and SIGTERM ended it."""
    if process.poll() is not None:
        return False
    process.terminate()
    try:
        process.wait(STOP_PATIENCE)
        return True
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return False
