"""Booting a catalogued image (`images.boot`): its base made from the store, its kernel found in its /boot."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from images.boot import DEFAULT_CMDLINE, BootError, is_file_system, materialize, prune
from images.importing import import_file
from images.store import ChunkStore


def file_system(tmp_path: Path, files: dict[str, bytes], name: str = "fs.raw") -> Path:
    """A 16 MiB ext4 image holding `files`, made as the image builders make theirs (`mke2fs -d`)."""
    tree = tmp_path / f"{name}.tree"
    for path, data in files.items():
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        (tree / path).write_bytes(data)
    tree.mkdir(exist_ok=True)
    raw = tmp_path / name
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree), str(raw), "16M"], check=True)
    return raw


KERNEL, INITRD = os.urandom(300_000), os.urandom(100_000)


@pytest.fixture
def store(tmp_path: Path) -> ChunkStore:
    return ChunkStore(tmp_path / "store")


def test_a_file_system_image_boots_its_newest_kernel_with_its_own_command_line(store: ChunkStore,
                                                                              tmp_path: Path) -> None:
    raw = file_system(tmp_path, {"boot/vmlinuz-6.1.0": b"old", "boot/initrd.img-6.1.0": b"old",
                                 "boot/vmlinuz-6.2.0": KERNEL, "boot/initrd.img-6.2.0": INITRD,
                                 "boot/vmlinuz-6.3.0": b"no initrd: not bootable",
                                 "etc/kernel/cmdline": b"console=ttyS0   quiet\n"})
    digest = import_file(store, raw).digest
    boot = materialize(store, tmp_path / "bases", digest)
    assert boot.digest == digest and boot.base.read_bytes() == raw.read_bytes()
    assert boot.kernel is not None and boot.kernel.name == "vmlinuz-6.2.0" and boot.kernel.read_bytes() == KERNEL
    assert boot.initrd is not None and boot.initrd.read_bytes() == INITRD
    assert boot.cmdline == "console=ttyS0 quiet" and boot.size == raw.stat().st_size
    assert boot.base.stat().st_mode & 0o222 == 0


def test_without_etc_kernel_cmdline_the_root_is_the_image_itself(store: ChunkStore, tmp_path: Path) -> None:
    raw = file_system(tmp_path, {"boot/vmlinuz-1": KERNEL, "boot/initrd.img-1": INITRD})
    assert materialize(store, tmp_path / "bases", import_file(store, raw).digest).cmdline == DEFAULT_CMDLINE


def test_a_whole_disk_image_boots_through_the_bios(store: ChunkStore, tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(os.urandom(446) + bytes(64) + b"\x55\xaa" + bytes(1 << 20))  # an MBR, then space
    assert not is_file_system(disk)
    boot = materialize(store, tmp_path / "bases", import_file(store, disk).digest)
    assert boot.kernel is None and boot.initrd is None and boot.base.read_bytes() == disk.read_bytes()


def test_a_file_system_without_a_kernel_is_refused_and_leaves_nothing(store: ChunkStore, tmp_path: Path) -> None:
    raw = file_system(tmp_path, {"etc/hostname": b"data\n"})
    digest = import_file(store, raw).digest
    with pytest.raises(BootError, match="nothing to boot"):
        materialize(store, tmp_path / "bases", digest)
    assert list((tmp_path / "bases").iterdir()) == []  # no half-made base


def test_an_image_the_store_lacks_is_refused(store: ChunkStore, tmp_path: Path) -> None:
    with pytest.raises(BootError, match="not in this node's store"):
        materialize(store, tmp_path / "bases", "ab" * 32)


def test_a_base_is_made_once_even_by_racing_callers_and_outlives_the_store_s_copy(store: ChunkStore,
                                                                                  tmp_path: Path) -> None:
    raw = file_system(tmp_path, {"boot/vmlinuz-1": KERNEL, "boot/initrd.img-1": INITRD})
    digest = import_file(store, raw).digest
    results = []
    threads = [threading.Thread(target=lambda: results.append(materialize(store, tmp_path / "bases", digest)))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 3 and len(set(results)) == 1
    assert [p.name for p in (tmp_path / "bases").iterdir()] == [digest]
    store.remove_manifest(digest)  # `image rm` on this node: a VM still booting it keeps its base
    assert materialize(store, tmp_path / "bases", digest) == results[0]


def test_prune_keeps_the_bases_in_use(store: ChunkStore, tmp_path: Path) -> None:
    one = import_file(store, file_system(tmp_path, {"boot/vmlinuz-1": KERNEL, "boot/initrd.img-1": INITRD})).digest
    two = import_file(store, file_system(tmp_path, {"boot/vmlinuz-2": KERNEL, "boot/initrd.img-2": b"x"}, "b")).digest
    for digest in (one, two):
        materialize(store, tmp_path / "bases", digest)
    assert prune(tmp_path / "bases", {one}, min_age=3600) == []  # both just made: a new VM's, maybe
    hour_ago = time.time() - 3601
    os.utime(tmp_path / "bases" / two, (hour_ago, hour_ago))
    assert prune(tmp_path / "bases", {one}, min_age=3600) == [two]
    assert [p.name for p in (tmp_path / "bases").iterdir()] == [one]
