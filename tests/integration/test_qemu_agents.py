"""Real QEMU guests managed by agents: a 3-node cluster started with `--hypervisor qemu`, where each
agent runs its own libvirtd in a private mount namespace and VMs are tiny guests on qcow2 overlays.

Each operation is proven by the guest's heartbeat counter (written to its disk and console every
second): it stops while suspended, a restored snapshot brings the disk's value back, a live
relocation continues it on the target without a reboot (no second ready line), a shipped VM keeps its
snapshots (and migrates live again once they are deleted), a VM whose host loses power boots on its standby
copy's disk or, rebuilt, on a fresh disk of its image or on its shipped snapshot, a guest whose QEMU is killed
boots again where it
ran, until its restart budget is spent. Deadlines are generous (TCG on a loaded
2-core machine); nothing depends on speed.
Skipped, with the reason, where QEMU, the guest image or libvirtd is not available.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agents.hypervisor.qemu import BackendError, end_leftovers, prepare_guest, qemu_pids
from images import debian, tinyguest
from overlay.wire.rpc import RpcError

from .conftest import SETTLE_DEADLINE, Cluster, holds, pid_alive, rejoined, restart, wait_for
from .test_metrics import scrape
from .test_qemu_guest import STEP_DEADLINE, heartbeats, wait_until
from .test_relocate import domains

pytestmark = [pytest.mark.integration, pytest.mark.qemu]
log = logging.getLogger(__name__)

BOOT_DEADLINE = 150.0
SPEC = """\
name: {name}
vms:
  - {{name: a, vcpus: 1, memory_mb: 128, disk_gb: 1, image: tiny}}
  - {{name: b, vcpus: 1, memory_mb: 128, disk_gb: 1, image: tiny}}
constraints:
  anti_affinity: [[a, b]]
"""


@contextlib.contextmanager
def qemu_cluster(tmp_path_factory: pytest.TempPathFactory, nodes: int, sites: int, hypervisor: str,
                 data: str) -> Iterator[Cluster]:
    """A cluster of real-guest agents (`data`: where each node's libvirt keeps its pid files), checked free
    of QEMU processes once it is down."""
    try:
        prepare_guest()
    except BackendError as err:
        pytest.skip(str(err))
    directory = tmp_path_factory.mktemp(hypervisor)
    # the image cache is per DISCOVERY_HOME: share this session's, so the agents do not build it again
    cluster = Cluster(directory, {**os.environ, "DISCOVERY_HOME": str(tinyguest.default_cache().parent)})
    try:
        cluster.up(nodes, sites, hypervisor=hypervisor)
        yield cluster
    finally:
        cluster.down()
        roots = [directory / n["name"] / "data" / data for n in cluster.state.get("nodes", [])]

        def left() -> list[int]:
            return [pid for root in roots for pid in qemu_pids(root) if pid_alive(pid)]

        # `down` SIGKILLs the guests; a killed process may still be exiting when it returns
        wait_for(lambda: not left(), 30, "no QEMU process left after cluster down", detail=lambda: f"left: {left()}")


@pytest.fixture(scope="module")
def qemu3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if shutil.which("libvirtd") is None:
        pytest.skip("no libvirtd (Debian package libvirt-daemon; `make deps` installs it)")
    with qemu_cluster(tmp_path_factory, 3, 2, "qemu", "libvirtd") as cluster:
        yield cluster


class VM:
    """One VM of a VE on the qemu cluster, found through `ve locate` (the directory)."""

    def __init__(self, cluster: Cluster, ve: str, vm: str) -> None:
        self.cluster, self.ve, self.vm = cluster, ve, vm
        self.via = "node1"  # the agent asked where the VM is

    @property
    def node(self) -> str:
        return self.cluster.json("--agent", self.via, "ve", "locate", self.ve)["vms"][self.vm]["node"]

    def file(self, suffix: str, node: str | None = None) -> Path:
        own_daemon = self.cluster.state.get("hypervisor") == "qemu"  # else the QEMU driver's or the system's
        guests = self.cluster.dir / (node or self.node) / "data" / ("libvirtd" if own_daemon else "") / "guests"
        return guests / f"{self.ve}--{self.vm}{suffix}"

    def beats(self, node: str | None = None) -> list[int]:
        return heartbeats(self.file(".log", node))

    def wait_ready(self) -> None:
        console = self.file(".log")
        wait_until(lambda: console.exists() and tinyguest.READY in console.read_text(errors="replace"),
                   BOOT_DEADLINE, f"{self.ve}/{self.vm} ready", console)

    def wait_beat_above(self, value: int, node: str | None = None) -> int:
        console = self.file(".log", node)  # where the VM is now: asked once, not at every look
        return wait_until(lambda: (last := max(heartbeats(console), default=-1)) > value and last, STEP_DEADLINE,
                          f"{self.vm} heartbeat above {value}", console)

    def disk_beat(self) -> int:
        return tinyguest.read_heartbeat(self.file(".qcow2"))

    def wait_disk_beat(self, enough: Callable[[int], bool], what: str) -> int:
        """Wait until the heartbeat on the VM's disk (where the VM is now) is `enough`; returns it."""
        node = self.node
        disk, console = self.file(".qcow2", node), self.file(".log", node)
        return wait_until(lambda: enough(beat := tinyguest.read_heartbeat(disk)) and beat, STEP_DEADLINE, what,
                          console)


def running(process: subprocess.Popen) -> bool:
    return process.poll() is None


def create(cluster: Cluster, tmp_path: Path, name: str) -> tuple[VM, VM]:
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(SPEC.format(name=name))
    created = cluster.json("--agent", "node3", "ve", "create", str(spec))
    assert created["state"] == "running"
    vms = VM(cluster, name, "a"), VM(cluster, name, "b")
    for vm in vms:
        vm.wait_ready()
    return vms


def create_one(cluster: Cluster, tmp_path: Path, name: str, ha: str | None = None) -> VM:
    """A VE of one 128 MiB VM `a` (with HA policy `ha`, if given), created through node1 (so placed there if it
    has room), booted."""
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(f"name: {name}\nvms:\n  - {{name: a, vcpus: 1, memory_mb: 128, disk_gb: 1, image: tiny}}\n"
                    + (f"ha: {ha}\n" if ha else ""))
    cluster.json("--agent", "node1", "ve", "create", str(spec))
    vm = VM(cluster, name, "a")
    vm.wait_ready()
    return vm


def test_boot_suspend_resume_and_stop_through_another_agent(qemu3: Cluster, tmp_path: Path) -> None:
    a, b = create(qemu3, tmp_path, "life")
    assert a.node != b.node  # anti-affinity, on real guests
    a.wait_beat_above(1)
    qemu3.cli("--agent", "node3", "ve", "suspend", "life")
    node = a.node
    frozen = max(a.beats(node))
    holds(lambda: max(a.beats(node)) == frozen, 3, "no beat while suspended")
    qemu3.cli("--agent", "node1", "ve", "resume", "life")
    a.wait_beat_above(frozen + 1)
    qemu3.cli("--agent", "node2", "ve", "stop", "life")  # ACPI first: the guest says it powers off
    assert tinyguest.POWEROFF in a.file(".log").read_text(errors="replace")
    assert set(domains(qemu3, "life:a").values()) == {"shutoff"}
    disks = [a.file(".qcow2"), b.file(".qcow2")]
    assert all(disk.exists() for disk in disks)
    qemu3.cli("--agent", "node2", "ve", "destroy", "life")
    assert not any(disk.exists() for disk in disks)


def test_snapshot_and_restore_bring_the_disk_heartbeat_back(qemu3: Cluster, tmp_path: Path) -> None:
    a, _ = create(qemu3, tmp_path, "snap")
    a.wait_beat_above(2)
    qemu3.cli("--agent", "node1", "ve", "suspend", "snap")
    at_snapshot = a.disk_beat()  # still: the snapshot holds exactly this value
    qemu3.cli("--agent", "node2", "ve", "snapshot", "snap", "--tag", "s1")
    qemu3.cli("--agent", "node2", "ve", "resume", "snap")
    a.wait_disk_beat(lambda beat: beat >= at_snapshot + 3, "the heartbeat moves on")
    restored = qemu3.json("--agent", "node3", "ve", "restore", "snap", "s1")
    assert restored["state"] == "suspended"  # the VE was suspended when the snapshot was taken
    assert a.disk_beat() == at_snapshot
    qemu3.cli("--agent", "node3", "ve", "resume", "snap")
    a.wait_disk_beat(lambda beat: beat > at_snapshot, "heartbeat goes on from the snapshot")
    qemu3.cli("ve", "destroy", "snap")


def test_live_relocation_keeps_the_guest_running(qemu3: Cluster, tmp_path: Path) -> None:
    a, b = create(qemu3, tmp_path, "live")
    source = a.node
    target = next(n["name"] for n in qemu3.state["nodes"] if n["name"] not in (a.node, b.node))
    before = a.wait_beat_above(2, source)
    assert qemu3.json("--agent", source, "dvms", "status")["load"]["memory_mb"] > 0  # measured: balloon stats
    qemu3.json("dvms", "load", "live:a", "80")  # a pin lives in the domain's metadata: libvirt migrates it
    moved = qemu3.json("--agent", b.node, "ve", "relocate", "live", "--vm", "a", "--to", target)
    assert moved["placement"]["a"]["node"] == target
    assert moved["placement"]["a"]["transfer"]["how"] == "live"
    wait_until(lambda: qemu3.json("--agent", target, "dvms", "status")["pinned"] == {"live:a": 80} or None,
               STEP_DEADLINE, "the pin arrived with the VM")
    after = a.wait_beat_above(before + 1, target)
    console = a.file(".log", target).read_text(errors="replace")
    assert tinyguest.READY not in console  # no reboot: the same guest, its counter goes on
    assert min(a.beats(target)) > before - 2
    assert after > before
    assert domains(qemu3, "live:a") == {target: "running"}  # exactly one place
    assert not a.file(".qcow2", source).exists()  # the source's disk is gone
    qemu3.cli("ve", "destroy", "live")


def test_a_vm_with_snapshots_is_shipped_and_restorable_at_its_new_node(qemu3: Cluster, tmp_path: Path) -> None:
    a, b = create(qemu3, tmp_path, "ship")
    a.wait_beat_above(2)
    qemu3.cli("ve", "suspend", "ship")
    at_snapshot = a.disk_beat()
    qemu3.cli("ve", "snapshot", "ship", "--tag", "s1")
    qemu3.cli("ve", "resume", "ship")
    source = a.node
    target = next(n["name"] for n in qemu3.state["nodes"] if n["name"] not in (a.node, b.node))
    refused = qemu3.cli("ve", "relocate", "ship", "--vm", "a", "--to", target, "--method", "live", check=False)
    assert refused.returncode != 0 and "cannot migrate it live" in refused.stderr  # an NBD copy drops snapshots
    assert domains(qemu3, "ship:a") == {source: "running"}  # the refusal changed nothing
    moved = qemu3.json("ve", "relocate", "ship", "--vm", "a", "--to", target)
    assert moved["placement"]["a"]["transfer"]["how"] == "ship"
    assert domains(qemu3, "ship:a") == {target: "running"}
    a.wait_disk_beat(lambda beat: beat > at_snapshot + 1, "heartbeat after the move")
    assert not a.file(".qcow2", source).exists()
    qemu3.json("ve", "restore", "ship", "s1")  # the internal snapshot came along inside the qcow2
    assert a.disk_beat() == at_snapshot
    qemu3.cli("ve", "resume", "ship")
    assert qemu3.json("--agent", b.node, "ve", "snapshot-delete", "ship", "s1")["snapshots"] == []
    back = qemu3.json("ve", "relocate", "ship", "--vm", "a", "--to", source, "--method", "live")
    assert back["placement"]["a"]["transfer"]["how"] == "live"  # no internal snapshot left to keep it shipping
    assert domains(qemu3, "ship:a") == {source: "running"}
    qemu3.cli("ve", "destroy", "ship")


def test_a_live_relocation_whose_coordinator_dies_is_undone_and_the_guest_never_stops(
        qemu3: Cluster, tmp_path: Path) -> None:
    """The coordinator (a third agent) is killed once the target has reserved and made the empty overlay,
    before the migration: the next command through another agent undoes the move. The guest ran all
    along at its host and still does, at exactly one place, and the target keeps no file of it."""
    a = create_one(qemu3, tmp_path, "crash")
    assert a.node == "node1"
    # node3 coordinates, and stops once prepared (ve_base.pause_for_test) until it is killed, or for at most
    # the move's PREPARE_LIMIT; once rejoined, not merely answering, so it knows the VE and node2
    qemu3.kill9("node3")
    try:
        restart(qemu3, "node3", DISCOVERY_TEST_PAUSE="prepared:600")
        rejoined(qemu3, "node3", ve="crash")
        relocation = subprocess.Popen([sys.executable, "-m", "discovery", "--config", str(qemu3.dir / "client.toml"),
                                       "--agent", "node3", "ve", "relocate", "crash", "--vm", "a", "--to", "node2"],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=qemu3.env)
        overlay = a.file(".qcow2", "node2")
        try:
            wait_until(lambda: overlay.exists() or not running(relocation), STEP_DEADLINE,
                       "the target's empty overlay")
            assert overlay.exists(), f"the relocation ended before the target prepared: {relocation.communicate()}"
            intent = qemu3.call("node1", "ve.locate", {"name": "crash"})["vms"]["a"].get("moving_to", {})
            assert intent.get("node") == "node2", "the intent is not in the directory (too few replicas got it)"
            before = max(a.beats("node1"))
            qemu3.kill9("node3")
        finally:
            relocation.kill()
            relocation.communicate()
        wait_until(lambda: qemu3.cli("--agent", "node2", "ve", "start", "crash", check=False).returncode == 0,
                   SETTLE_DEADLINE, "the next command settles the interrupted move")
        located = qemu3.json("--agent", "node2", "ve", "locate", "crash")["vms"]["a"]
        assert located["node"] == "node1" and "moving_to" not in located
        assert domains(qemu3, "crash:a") == {"node1": "running"}
        assert a.wait_beat_above(before, "node1") > before
        assert a.file(".log", "node1").read_text(errors="replace").count(tinyguest.READY) == 1  # never rebooted
        assert not a.file(".qcow2", "node2").exists()  # the undone move left nothing at the target
    finally:  # the next tests use node3 again
        if "node3" in qemu3.running():
            qemu3.kill9("node3")
        restart(qemu3, "node3")
        rejoined(qemu3, "node3")
    qemu3.cli("--agent", "node2", "ve", "destroy", "crash")


def test_a_standby_copy_boots_when_its_host_loses_power(qemu3: Cluster, tmp_path: Path) -> None:
    """`ve replicate` ships a consistent copy of the disk to a node of the other site; the VM's host then
    loses power (its agent, daemon and guest killed); `ve failover` boots the copy there, and the guest
    goes on counting from the disk it was copied with. The host, back, keeps no second copy running."""
    a = create_one(qemu3, tmp_path, "solo")
    host = a.node
    a.wait_beat_above(2)
    replicated = qemu3.json("--agent", "node3", "ve", "replicate", "solo", "--copies", "1")
    (copy,) = replicated["replicas"]["a"]
    assert copy["site"] != qemu3.node(host)["site"]  # another site first
    standby = qemu3.dir / copy["node"] / "data" / "libvirtd" / "guests" / "solo--a.standby.qcow2"
    copied = tinyguest.read_heartbeat(standby)
    assert copied >= 2
    qemu3.kill9(host)  # power loss: the agent, then its daemon and its guests
    end_leftovers(qemu3.dir / host / "data")
    survivor = a.via = next(n["name"] for n in qemu3.state["nodes"] if n["name"] != host)
    failed_over = qemu3.json("--agent", survivor, "ve", "failover", "solo")
    assert failed_over["placement"]["a"]["node"] == copy["node"]
    a.wait_ready()  # it booted from the copied disk, as after a power cut
    assert a.wait_beat_above(copied) > copied  # and counts on from the copy's value
    restart(qemu3, host)

    def one_place() -> bool:
        try:
            return domains(qemu3, "solo:a") == {copy["node"]: "running"}
        except RpcError:  # the restarted agent is not listening yet
            return False

    wait_until(one_place, BOOT_DEADLINE,  # the host's agent and daemon start, then its fencing pass runs
               "the VM at exactly one place once its old host is back")
    qemu3.cli("--agent", survivor, "ve", "destroy", "solo")


def exported_beat(pid_file: Path, tmp_path: Path) -> int:
    """The heartbeat in a mirror as its node's qemu-nbd serves it (the file alone may lag: qemu-nbd caches its
    qcow2 metadata until it flushes), read through a second NBD client; 0 while no export runs."""
    try:
        argv = Path(f"/proc/{int(pid_file.read_text())}/cmdline").read_bytes().decode().split("\0")
    except (OSError, ValueError):
        return 0
    opts = dict(arg[2:].split("=", 1) for arg in argv if arg.startswith("--") and "=" in arg)
    out = tmp_path / "exported-sector"
    read = subprocess.run(["qemu-img", "dd", "-f", "raw", "-O", "raw", "bs=512", "count=1",
                           f"if=nbd://{opts['bind']}:{opts['port']}/{opts['export-name']}", f"of={out}"],
                          capture_output=True)
    return tinyguest.parse_heartbeat(out.read_bytes()) if read.returncode == 0 else 0


def test_a_standby_vm_s_disk_is_mirrored_and_its_copy_boots_with_the_last_writes(qemu3: Cluster,
                                                                                 tmp_path: Path) -> None:
    """HA policy `standby` on a real guest: its host mirrors the disk to the copy's node (`ve show` says so), the
    mirror follows the guest's heartbeats, survives a snapshot (which ends the job: the copy keeps what it had,
    and the mirror starts again), and when the host loses power the copy boots, with no command, from a disk
    holding every beat the mirror had, which the one-off copy made at creation lacked."""
    a = create_one(qemu3, tmp_path, "mirrored", ha="{mode: standby, copies: 1}")
    host = a.node

    def mirrored() -> dict | None:
        (copy,) = qemu3.json("--agent", "node3", "ve", "show", "mirrored")["protection"]["a"]["copies"]
        return copy if copy.get("mirror") == "ready" else None

    copy = wait_until(mirrored, BOOT_DEADLINE, "the copy's mirror ready")
    guests = qemu3.dir / copy["node"] / "data" / "libvirtd" / "guests"
    at_copy = tinyguest.read_heartbeat(guests / "mirrored--a.standby.qcow2")
    nbd = qemu3.dir / copy["node"] / "data" / "nbd" / "mirrored--a.pid"
    beat = a.wait_beat_above(at_copy + 2)
    wait_until(lambda: exported_beat(nbd, tmp_path) >= beat, STEP_DEADLINE, f"heartbeat {beat} in the mirror")
    # a snapshot cannot run beside the mirror job: it ends it (the copy keeps the mirror as it was), then
    # the mirror starts again and follows the guest once more
    qemu3.cli("--agent", "node3", "ve", "snapshot", "mirrored", "--tag", "s1")
    wait_until(lambda: tinyguest.read_heartbeat(guests / "mirrored--a.standby.qcow2") >= beat, STEP_DEADLINE,
               "the ended mirror kept as the copy")
    wait_until(mirrored, BOOT_DEADLINE, "the mirror ready again after the snapshot")
    beat = a.wait_beat_above(beat + 2)
    wait_until(lambda: exported_beat(nbd, tmp_path) >= beat, STEP_DEADLINE, f"heartbeat {beat} in the mirror")
    qemu3.kill9(host)  # power loss: the agent, then its daemon and its guests
    end_leftovers(qemu3.dir / host / "data")
    a.via = copy["node"]
    wait_until(lambda: a.node == copy["node"], BOOT_DEADLINE, "the VE failed over to its mirrored copy")
    console = a.file(".log")
    (booted,) = wait_until(lambda: console.exists() and next(
        ((int(line.rpartition("=")[2]),) for line in console.read_text(errors="replace").splitlines()
         if line.startswith(tinyguest.READY)), None), BOOT_DEADLINE, "the copy booted", console)
    assert booted >= beat > at_copy  # it booted from the mirror, not the one-off copy
    restart(qemu3, host)
    qemu3.cli("--agent", copy["node"], "ve", "destroy", "mirrored")


def test_vms_whose_host_loses_power_are_rebuilt_from_their_image_or_newest_shipped_snapshot(
        qemu3: Cluster, tmp_path: Path) -> None:
    """Two VMs with no standby copy on one host, one of them shipped once; the host loses power (its agent, daemon
    and guests killed); `ve rebuild` boots each on another node: the one never shipped on a fresh disk of its
    image (its heartbeat starts again from 0), the other on its shipped snapshot (the heartbeat it had then). The
    host, back, keeps no second copy running."""
    fresh, kept = create_one(qemu3, tmp_path, "remade"), create_one(qemu3, tmp_path, "kept")
    host = fresh.node
    if kept.node != host:  # placed elsewhere (node1 was short of room): brought together
        qemu3.json("--agent", "node2", "ve", "relocate", "kept", "--to", host)
    kept.wait_beat_above(2, host)
    before = kept.disk_beat()
    image = qemu3.json("--agent", "node2", "ve", "ship", "kept")["vms"]["a"]["shipped"]["image"]
    after = kept.disk_beat()
    qemu3.kill9(host)  # power loss: the agent, then its daemon and its guests
    end_leftovers(qemu3.dir / host / "data")
    survivor = fresh.via = kept.via = next(n["name"] for n in qemu3.state["nodes"] if n["name"] != host)
    targets = {}
    for vm, boots in ((fresh, "tiny"), (kept, image)):
        # retried while the directory's write cannot reach a majority of the record's replicas yet (one is on
        # the dead host until SWIM says so); a retry first settles what a failed attempt left
        rebuilt = wait_for(lambda ve=vm.ve: qemu3.try_json("--agent", survivor, "ve", "rebuild", ve), STEP_DEADLINE,
                           f"ve rebuild {vm.ve}")
        slot = rebuilt["placement"]["a"]
        assert slot["node"] != host and slot["why"].startswith(f"rebuilt from image {boots},")
        targets[vm.ve] = slot["node"]
        vm.wait_ready()

    def ready(vm: VM) -> int:
        line = next(line for line in vm.file(".log", targets[vm.ve]).read_text(errors="replace").splitlines()
                    if tinyguest.READY in line)
        return int(line.rpartition("heartbeat=")[2])

    assert ready(fresh) == 0 and before <= ready(kept) <= after  # a fresh disk; the disk as it was when shipped
    assert fresh.wait_beat_above(1, targets["remade"]) > 1
    restart(qemu3, host)

    def one_place() -> bool:
        try:
            return all(domains(qemu3, f"{ve}:a") == {node: "running"} for ve, node in targets.items())
        except RpcError:  # the restarted agent is not listening yet
            return False

    wait_until(one_place, BOOT_DEADLINE,  # the host's agent and daemon start, then its fencing pass runs
               "the VMs at exactly one place once their old host is back")
    for ve in targets:
        qemu3.cli("--agent", survivor, "ve", "destroy", ve)
    qemu3.cli("--agent", survivor, "image", "rm", image)


def test_shipped_snapshots_send_what_changed_and_boot_elsewhere_once_the_host_is_gone(qemu3: Cluster,
                                                                                     tmp_path: Path) -> None:
    """`ve ship` makes the guest's disk (1 GiB, written every second by its heartbeat) an image kept by nodes
    besides its host; the second sends them what changed since the first, far less than the disk. The host then
    loses power, and a new VE booting that image through another agent reads on its disk the heartbeat that the
    guest had written when the snapshot was taken."""
    a = create_one(qemu3, tmp_path, "shipping")
    host = a.node
    a.wait_beat_above(2)
    first = qemu3.json("--agent", "node2", "ve", "ship", "shipping")["vms"]["a"]
    assert first["host"] == host and first["sent"] and host not in first["sent"]
    shipped_at = a.disk_beat()
    a.wait_disk_beat(lambda beat: beat > shipped_at + 2, "the guest writes on")
    before = a.disk_beat()
    second = qemu3.json("--agent", "node2", "ve", "ship", "shipping")["vms"]["a"]
    after = a.disk_beat()
    log.info("shipped snapshots: first %s, second %s", first, second)
    image = second["shipped"]["image"]
    entry = qemu3.json("--agent", "node2", "image", "show", image)
    assert entry["size"] == 1 << 30 and set(second["sent"]) == set(first["sent"])  # the same holders: incremental
    assert all(sent < 1 << 20 for sent in second["sent"].values())  # a 1 GiB disk; a few chunks changed
    assert set(entry["holders"]) - {host}
    qemu3.kill9(host)  # power loss: the agent, then its daemon and its guest
    end_leftovers(qemu3.dir / host / "data")
    survivor = next(n for n in second["sent"])
    point = qemu3.json("--agent", survivor, "ve", "restore-point", "shipping", "a")
    assert point["image"] == image and point["digest"] == entry["digest"]
    spec = tmp_path / "reborn.yaml"
    spec.write_text(f"name: reborn\nvms:\n  - {{name: a, vcpus: 1, memory_mb: 128, disk_gb: 1, image: {image}}}\n")
    qemu3.json("--agent", survivor, "ve", "create", str(spec))
    reborn = VM(qemu3, "reborn", "a")
    reborn.via = survivor
    reborn.wait_ready()
    ready = next(line for line in reborn.file(".log").read_text(errors="replace").splitlines()
                 if tinyguest.READY in line)
    assert before <= int(ready.rpartition("heartbeat=")[2]) <= after  # the disk as it was when shipped
    qemu3.cli("--agent", survivor, "ve", "destroy", "reborn")
    restart(qemu3, host)
    rejoined(qemu3, host, "shipping")
    qemu3.cli("--agent", survivor, "ve", "destroy", "shipping")
    for shipped in (first, second):
        qemu3.cli("--agent", survivor, "image", "rm", shipped["shipped"]["image"])


def pid_file(cluster: Cluster, node: str, domain: str) -> Path:
    """libvirt's pid file of `domain`'s QEMU on `node` (the node's own daemon's, or its embedded driver's)."""
    root = "libvirtd" if cluster.state.get("hypervisor") == "qemu" else "embed"
    return cluster.dir / node / "data" / root / "run" / "qemu" / f"{domain}.pid"


def kill_guest(cluster: Cluster, node: str, domain: str) -> int:
    """SIGKILL the QEMU of `domain` on `node` (its pid from libvirt's pid file), as a QEMU crash would end it;
    returns the pid, once dead."""
    pid = int(pid_file(cluster, node, domain).read_text())
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(pid), 30, f"QEMU of {domain} (pid {pid}) dead", interval=0.05)
    return pid


def restarted(cluster: Cluster, node: str, domain: str, killed: int) -> int:
    """Wait until `domain` runs again on `node` in a new QEMU (the host restarted it); returns its pid."""
    file = pid_file(cluster, node, domain)

    def again() -> int | None:
        text = file.read_text().strip() if file.exists() else ""
        return int(text) if text.isdigit() and int(text) != killed and pid_alive(int(text)) else None

    pid = wait_until(again, STEP_DEADLINE, f"{domain} started again on {node}")
    wait_until(lambda: domains(cluster, domain) == {node: "running"}, STEP_DEADLINE, f"{domain} running on {node}")
    return pid


def test_a_guest_whose_qemu_is_killed_is_restarted_where_it_ran(qemu3: Cluster, tmp_path: Path) -> None:
    """kill -9 of a guest's QEMU (libvirt reports STOPPED/FAILED): its host boots it again, on the same node
    (a reboot: a second ready line), and its heartbeat counts on; the node counts the restart."""
    a = create_one(qemu3, tmp_path, "phoenix")
    node, console = a.node, a.file(".log")
    before = a.wait_beat_above(1, node)
    restarts = scrape(qemu3.node(node)["metrics"])["discovery_guest_restarts_total", ()]
    killed = kill_guest(qemu3, node, "phoenix:a")
    restarted(qemu3, node, "phoenix:a", killed)
    wait_until(lambda: console.read_text(errors="replace").count(tinyguest.READY) == 2, BOOT_DEADLINE,
               "the guest booted again", console)
    offset = console.read_bytes().rindex(tinyguest.READY.encode())
    wait_until(lambda: len(beats := heartbeats(console, offset)) >= 2 and beats[-1] > beats[0] and beats,
               STEP_DEADLINE, "the heartbeat counts again after the reboot", console)
    assert a.disk_beat() >= before  # it goes on from the disk it left
    assert a.node == node and qemu3.json("ve", "show", "phoenix")["placement"]["a"]["domain_state"] == "running"
    assert scrape(qemu3.node(node)["metrics"])["discovery_guest_restarts_total", ()] == restarts + 1
    qemu3.cli("ve", "destroy", "phoenix")


def test_a_guest_stopped_on_purpose_is_not_restarted(qemu3: Cluster, tmp_path: Path) -> None:
    """`ve stop --force` destroys the guest (STOPPED/DESTROYED, the host's intent shutoff): it stays off. A
    guest whose QEMU is killed once its VE was stopped (off already) is nothing to restart either."""
    a = create_one(qemu3, tmp_path, "still")
    node = a.node
    qemu3.cli("ve", "stop", "still", "--force")
    holds(lambda: domains(qemu3, "still:a") == {node: "shutoff"}, 6, "a VM destroyed on purpose stays off")
    assert a.file(".log").read_text(errors="replace").count(tinyguest.READY) == 1
    assert qemu3.json("ve", "show", "still")["placement"]["a"]["domain_state"] == "shutoff"
    qemu3.cli("ve", "destroy", "still")


def test_a_guest_that_keeps_crashing_is_left_down_marked_crashed(qemu3: Cluster, tmp_path: Path) -> None:
    """Three restarts in the window (after 1, 2 and 4 s), then the fourth kill leaves the VM down: `ve show`
    and the host show it crashed (for the HA layer to recover elsewhere) until `ve start` runs it again."""
    a = create_one(qemu3, tmp_path, "flaky")
    node = a.node
    for _ in range(3):
        restarted(qemu3, node, "flaky:a", kill_guest(qemu3, node, "flaky:a"))
    kill_guest(qemu3, node, "flaky:a")
    shown = lambda: qemu3.json("ve", "show", "flaky")["placement"]["a"]["domain_state"]  # noqa: E731
    wait_until(lambda: shown() == "crashed", STEP_DEADLINE, "the VM marked crashed")
    holds(lambda: domains(qemu3, "flaky:a") == {node: "crashed"}, 6, "a VM whose budget is spent stays down")
    assert scrape(qemu3.node(node)["metrics"])["discovery_vms", (("state", "crashed"),)] == 1
    qemu3.cli("ve", "start", "flaky")
    assert domains(qemu3, "flaky:a") == {node: "running"} and shown() == "running"
    qemu3.cli("ve", "destroy", "flaky")


def test_a_protected_guest_that_keeps_crashing_runs_elsewhere_with_no_command(qemu3: Cluster, tmp_path: Path) -> None:
    """As above, with HA policy restart: once its host gives up restarting it, the host has it rebuilt on
    another node, where it boots; the crashed copy is gone."""
    a = create_one(qemu3, tmp_path, "phoenix2", ha="{mode: restart}")
    node = a.node
    for _ in range(3):
        restarted(qemu3, node, "phoenix2:a", kill_guest(qemu3, node, "phoenix2:a"))
    kill_guest(qemu3, node, "phoenix2:a")
    wait_until(lambda: a.node != node, STEP_DEADLINE, "the VM rebuilt on another node")
    a.wait_ready()
    slot = qemu3.json("ve", "show", "phoenix2")["placement"]["a"]
    assert slot["domain_state"] == "running" and f"its guest kept crashing on {node}" in slot["why"]
    assert domains(qemu3, "phoenix2:a") == {a.node: "running"}
    qemu3.cli("ve", "destroy", "phoenix2")


def test_without_a_daemon_a_vm_is_saved_shipped_and_restored(tmp_path_factory: pytest.TempPathFactory,
                                                              tmp_path: Path) -> None:
    """The QEMU driver embedded in each agent cannot migrate: the VM moves by save → ship → restore, and
    goes on counting from its memory (no reboot); its snapshot, carried inside the qcow2, restores there; its
    QEMU killed, the agent boots it again there (the events come from the driver inside the agent)."""
    with qemu_cluster(tmp_path_factory, 2, 1, "qemu-embed", "embed") as cluster:
        a = create_one(cluster, tmp_path, "solo")
        source = a.node
        cluster.cli("ve", "suspend", "solo")
        at_snapshot = a.disk_beat()
        cluster.cli("ve", "snapshot", "solo", "--tag", "s1")
        cluster.cli("ve", "resume", "solo")
        before = a.wait_beat_above(at_snapshot + 1, source)
        target = "node2" if source == "node1" else "node1"
        moved = cluster.json("--agent", target, "ve", "relocate", "solo", "--vm", "a", "--to", target)
        assert moved["placement"]["a"]["transfer"]["how"] == "ship"
        assert a.wait_beat_above(before, target) > before
        assert tinyguest.READY not in a.file(".log", target).read_text(errors="replace")  # resumed, not booted
        assert domains(cluster, "solo:a") == {target: "running"} and not a.file(".qcow2", source).exists()
        assert cluster.json("ve", "restore", "solo", "s1")["state"] == "suspended"
        assert a.disk_beat() == at_snapshot
        cluster.cli("ve", "resume", "solo")  # the embedded driver reports a killed QEMU too: restarted in place
        restarted(cluster, target, "solo:a", kill_guest(cluster, target, "solo:a"))


BOOT_SECTOR = bytes.fromhex(
    "fa31c08ed8fc"  # cli; ds = 0; cld
    "be177c"  # si = the message (0x7c00 + 23)
    "baf803"  # dx = COM1
    "ac84c07403ee" "ebf8"  # each byte up to the NUL: out dx, al
    "f4ebfd"  # then halt for good
) + f"{tinyguest.READY} bios\r\n".encode() + b"\0"
"""An x86 boot sector that prints the ready line on the first serial port: a whole-disk image with no
kernel of its own, which the BIOS boots (`images.boot`)."""


def test_images_boot_through_agents_a_debian_disk_and_a_bios_disk(qemu3: Cluster, tmp_path: Path) -> None:
    """A catalogued Debian image (its kernel read out of its /boot) and a whole-disk image (booted by the
    BIOS) each boot to their ready line through an agent, placed where the image is held; a VM that names
    no image, or an unknown one, is refused with a one-line reason and leaves nothing."""
    bios = tmp_path / "bios.raw"
    bios.write_bytes(BOOT_SECTOR.ljust(510, b"\0") + b"\x55\xaa" + bytes(1 << 20))
    qemu3.json("--agent", "node2", "image", "import", str(bios), "--name", "bios-disk", "--copies", "1")
    images = {"bios": ("bios-disk", 64)}
    try:
        minbase = debian.build("minbase")
    except debian.Unavailable as err:
        log.warning("no Debian image here (%s): only the BIOS disk boots", err)
    else:
        qemu3.json("--agent", "node3", "image", "import", str(minbase), "--name", "debian-minbase", "--copies", "1")
        images["debian"] = ("debian-minbase", 384)
    for ve, (image, memory) in images.items():
        holder = qemu3.json("image", "show", image)["holders"]
        spec = tmp_path / f"{ve}.yaml"
        spec.write_text(f"name: {ve}\nvms:\n  - {{name: a, vcpus: 1, memory_mb: {memory}, disk_gb: 2, "
                        f"image: {image}}}\n")
        created = qemu3.json("--agent", "node1", "ve", "create", str(spec))
        assert created["placement"]["a"]["node"] in holder and "holds the image" in created["placement"]["a"]["why"]
        VM(qemu3, ve, "a").wait_ready()
        qemu3.cli("ve", "destroy", ve)
    for line, refusal in (("image: nobody-has-it", "no image named 'nobody-has-it'"), ("", "boots an image")):
        spec = tmp_path / "refused.yaml"
        spec.write_text(f"name: refused\nvms:\n  - {{name: a, vcpus: 1, memory_mb: 64{', ' if line else ''}{line}}}\n")
        failed = qemu3.cli("ve", "create", str(spec), check=False)
        assert failed.returncode != 0 and refusal in failed.stderr and len(failed.stderr.strip().splitlines()) == 1
        assert qemu3.try_json("ve", "show", "refused") is None
