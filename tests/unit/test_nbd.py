"""The NBD exports a standby's node receives mirrored disks into (agents.host.nbd), with real `qemu-nbd` and
`qemu-img`: an export serves its qcow2 file on its own port, stopping it ends the process (the file flushed) and
its pid file, and a later run of the agent ends the exports an earlier one left, and nothing else."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agents.host import nbd
from agents.host.nbd import Export, NbdError, NbdExports

pytestmark = pytest.mark.skipif(shutil.which("qemu-nbd") is None or shutil.which("qemu-img") is None,
                                reason="qemu-nbd and qemu-img are needed (Debian: apt-get install qemu-utils)")
NAME = "shop:db"
PID_FILE = "shop--db.pid"  # the export's name, its colon made safe for a file name


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    """A small qcow2 file, as the standby's overlay is."""
    file = tmp_path / "mirror.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(file), "1M"], check=True, capture_output=True)
    return file


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    return tmp_path / "nbd"


@pytest.fixture
def exports(directory: Path) -> Iterator[NbdExports]:
    """The node's exports; whatever a test left running is stopped."""
    running = NbdExports(directory)
    try:
        yield running
    finally:
        running.stop_all()


def dead(pid: int) -> bool:
    """Whether process `pid` is gone or a zombie (its leader exited: its other threads may still be ending)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_until(predicate: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.02)
    return predicate()


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def nbd_opts(export: Export) -> str:
    return f"driver=nbd,server.type=inet,server.host={export.host},server.port={export.port},export={export.name}"


def test_an_export_serves_its_file_on_a_port_of_its_own(exports: NbdExports, disk: Path, directory: Path) -> None:
    export = exports.start(NAME, disk, "127.0.0.1")
    assert (export.host, export.name) == ("127.0.0.1", NAME) and export.port > 0
    assert exports.get(NAME) == export and exports.get("shop:other") is None
    with socket.create_connection((export.host, export.port), timeout=5) as conn:
        conn.settimeout(5)
        assert conn.recv(8) == b"NBDMAGIC"  # the server speaks first: NBD's handshake
    info = subprocess.run(["qemu-img", "info", "--output=json", "--image-opts", nbd_opts(export)],
                          check=True, capture_output=True, text=True).stdout
    assert '"virtual-size": 1048576' in info  # the guest's view of the qcow2 file (1 MiB), not the file itself
    pid = int((directory / PID_FILE).read_text())
    assert b"qemu-nbd" in Path(f"/proc/{pid}/cmdline").read_bytes() and not dead(pid)


def test_stop_ends_the_process_and_removes_its_pid_file(exports: NbdExports, disk: Path, directory: Path) -> None:
    export = exports.start(NAME, disk, "127.0.0.1")
    pid = int((directory / PID_FILE).read_text())
    assert exports.stop(NAME) is True
    assert dead(pid)  # at once: stop waits for the process
    assert not (directory / PID_FILE).exists()
    assert exports.get(NAME) is None
    with pytest.raises(OSError), socket.create_connection((export.host, export.port), timeout=2):
        pass
    assert exports.stop(NAME) is False  # nothing runs any more


@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="qemu-io is needed to write through the export")
def test_what_is_written_through_the_export_is_in_the_file_once_stopped(exports: NbdExports, disk: Path) -> None:
    """qemu-nbd runs with a writeback cache: stopping it (SIGTERM) must flush what it holds into the file."""
    export = exports.start(NAME, disk, "127.0.0.1")
    subprocess.run(["qemu-io", "-c", "write -P 0xab 0 64k", "--image-opts", nbd_opts(export)], check=True,
                   capture_output=True)
    exports.stop(NAME)
    read = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0xab 0 64k", str(disk)], capture_output=True,
                          text=True)
    assert read.returncode == 0 and "Pattern verification failed" not in read.stdout, read.stdout


def test_starting_an_export_again_replaces_the_running_one(exports: NbdExports, disk: Path, directory: Path) -> None:
    exports.start(NAME, disk, "127.0.0.1")
    first = int((directory / PID_FILE).read_text())
    again = exports.start(NAME, disk, "127.0.0.1")
    assert dead(first) and int((directory / PID_FILE).read_text()) != first
    assert exports.get(NAME) == again


def test_a_port_taken_before_qemu_nbd_binds_it_is_tried_again_then_refused_with_the_reason(
        exports: NbdExports, disk: Path, directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The free port chosen can be taken by someone else before qemu-nbd binds it: another is tried, up to three;
    then the error carries qemu-nbd's own last words."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))  # bound, not listening: a connection to it is refused, a bind fails
        busy = taken.getsockname()[1]
        tries: list[int] = []

        def chosen(host: str) -> int:
            tries.append(busy if len(tries) < 2 else free_port(host))
            return tries[-1]

        monkeypatch.setattr(nbd, "_free_port", chosen)
        export = exports.start(NAME, disk, "127.0.0.1")  # the third try gets a free port
        assert tries[:2] == [busy, busy] and export.port == tries[2] and exports.get(NAME) == export
        exports.stop(NAME)
        monkeypatch.setattr(nbd, "_free_port", lambda host: busy)
        with pytest.raises(NbdError, match=r"^qemu-nbd cannot serve mirror\.qcow2: .*Address already in use$"):
            exports.start(NAME, disk, "127.0.0.1")
    assert exports.get(NAME) is None and not (directory / PID_FILE).exists()


def test_an_export_is_handed_out_only_once_qemu_nbd_serves_it(
        exports: NbdExports, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """qemu-nbd binds its port, then opens the file, then serves. Here the open hangs (the overlay's backing file
    is an NBD server that never answers): `start` must refuse after START_PATIENCE, or give an export that
    answers a client. Handing it out earlier lets a file qemu-nbd cannot open (missing, say) be "exported" now
    and then, and a stop soon after the start lose its SIGTERM (qemu-nbd sets its state to running after the
    handler ran), to be killed STOP_PATIENCE later unflushed."""
    monkeypatch.setattr(nbd, "START_PATIENCE", 1.0)
    monkeypatch.setattr(nbd, "STOP_PATIENCE", 1.0)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # connections complete in the kernel; no greeting ever comes
        overlay = tmp_path / "stuck.qcow2"
        subprocess.run(["qemu-img", "create", "-f", "qcow2", "-u", "-b", f"nbd://127.0.0.1:{silent.getsockname()[1]}",
                        "-F", "raw", str(overlay), "1M"], check=True, capture_output=True)
        try:
            export = exports.start(NAME, overlay, "127.0.0.1")
            with socket.create_connection((export.host, export.port), timeout=2) as conn:
                conn.settimeout(2)
                assert conn.recv(8) == b"NBDMAGIC"
        except NbdError:
            pass  # refused: as it should
        finally:
            exports.stop_all()  # while STOP_PATIENCE is short


def test_the_exports_an_earlier_run_left_are_ended(disk: Path, directory: Path) -> None:
    """The agent died with an export running (its pid file left): the next run's `end_leftovers` ends it with
    SIGTERM, and names it among those whose file qemu-nbd flushed on its way out."""
    earlier, later = NbdExports(directory), NbdExports(directory)
    try:
        export = earlier.start(NAME, disk, "127.0.0.1")
        pid = int((directory / PID_FILE).read_text())
        assert later.end_leftovers([NAME, "other:vm"]) == {NAME}
        assert not (directory / PID_FILE).exists()
        assert wait_until(lambda: earlier.get(NAME) is None)  # its process is gone (all its threads: a while)
        assert dead(pid)
        with pytest.raises(OSError), socket.create_connection((export.host, export.port), timeout=2):
            pass
        assert later.end_leftovers([NAME]) == set()  # nothing left the second time
    finally:
        earlier.stop_all()
        later.stop_all()


def test_a_pid_file_naming_another_process_or_nothing_ends_nothing(directory: Path) -> None:
    """A stale pid file whose pid now belongs to some other process must not kill it; one whose process is gone
    or whose text is no pid is dropped quietly."""
    directory.mkdir(parents=True)
    no_such_pid = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1  # a process that cannot exist
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        (directory / "a--x.pid").write_text(str(bystander.pid))
        (directory / "a--y.pid").write_text(str(no_such_pid))
        (directory / "a--z.pid").write_text("not a pid")
        assert NbdExports(directory).end_leftovers(["a:x", "a:y", "a:z"]) == set()
        assert bystander.poll() is None  # still running
        assert list(directory.iterdir()) == []
    finally:
        bystander.kill()
        bystander.wait()
    assert NbdExports(directory / "never-made").end_leftovers(["a:x"]) == set()  # a first start: no directory yet


def test_an_export_whose_qemu_nbd_was_killed_is_not_taken_for_flushed(disk: Path, directory: Path) -> None:
    """A power cut (SIGKILL) ends qemu-nbd before it flushes its qcow2 metadata: its file may be torn, so the next
    run must not count it among the flushed ones."""
    earlier, later = NbdExports(directory), NbdExports(directory)
    try:
        earlier.start(NAME, disk, "127.0.0.1")
        os.kill(int((directory / PID_FILE).read_text()), signal.SIGKILL)
        assert wait_until(lambda: earlier.get(NAME) is None)
        assert later.end_leftovers([NAME]) == set()
        assert not (directory / PID_FILE).exists()
    finally:
        earlier.stop_all()
        later.stop_all()

    # this run's own exports are ended too, and flushed
    exports = NbdExports(directory)
    try:
        exports.start(NAME, disk, "127.0.0.1")
        assert exports.end_leftovers([NAME]) == {NAME}
        assert exports.get(NAME) is None
    finally:
        exports.stop_all()

