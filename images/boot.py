"""Booting a catalogued image on a node: its content as a read-only base file, and how QEMU starts it.

A real guest's disk is a qcow2 overlay of its image's *base*: the raw content, written once per node and
image from the chunk store (sparse where the content is zeros) under `<bases>/<digest>/`, with what QEMU
needs to start it. Two kinds of image boot, told apart by their content, as libvirt would boot them:

- a file-system image (ext2/3/4 at offset 0, as `images.debian` and the tiny guest build them) carries its
  kernel in /boot: the newest `vmlinuz-*` with its `initrd.img-*` are read out with debugfs (no mount)
  and booted directly, with the command line in the image's /etc/kernel/cmdline (the file systemd's
  kernel-install reads) or DEFAULT_CMDLINE. Such an image without a kernel has nothing to boot: refused.
- any other image (a whole disk with a partition table and a boot loader, as cloud images are) boots
  through the BIOS from its own disk.

Each base is made in a temporary directory renamed into place once whole (`images.tinyguest.cached`), so
neither a crash nor two VMs of one image starting at once leave half of one; the export checks the
content's digest. Bases are a cache: `prune` (`image gc`) removes those no VM or standby copy on the node uses.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from images.importing import export
from images.store import ChunkStore, StoreError
from images.tinyguest import ImageError, cached, run

DEFAULT_CMDLINE = "root=/dev/vda rw console=ttyS0 panic=-1"
"""For a file-system image without /etc/kernel/cmdline: its own file system is the root, on the first disk."""
BASE = "disk.raw"
EXT_MAGIC_AT, EXT_MAGIC = 1024 + 56, b"\x53\xef"
"""Where every ext2/3/4 superblock has its magic number (little-endian 0xEF53)."""


class BootError(Exception):
    """An image cannot be booted on this node; one line saying why."""


@dataclass(frozen=True)
class BootImage:
    """An image ready to boot on this node: its base (raw, never written) and, for direct kernel boot, the
    kernel, initrd and command line (`kernel` None: the BIOS boots the disk)."""

    digest: str
    base: Path
    kernel: Path | None
    initrd: Path | None
    cmdline: str
    size: int
    """Bytes of content: the smallest virtual size a VM's disk of this image may have."""


def materialize(store: ChunkStore, bases: Path, digest: str) -> BootImage:
    """The base of image `digest` (its manifest digest) under `bases`, written from `store` the first time.
    Blocking (a GiB takes seconds): run it in a thread. BootError when the store lacks it or it cannot boot."""
    manifest = store.manifest(digest)
    if manifest is None and not (bases / digest / "manifest.json").exists():
        raise BootError(f"image {digest[:16]} is not in this node's store (pull it first)")

    def build(work: Path) -> None:
        assert manifest is not None
        try:
            export(store, manifest, work / BASE)
        except StoreError as err:
            raise BootError(f"image {digest[:16]}: {err}") from None
        (work / BASE).chmod(0o444)  # overlays rely on it never changing
        found = boot_files(work / BASE, work)
        cmdline = _cmdline(work / BASE) if found else ""
        names = [path.name for path in found] if found else None
        (work / "manifest.json").write_text(json.dumps({"size": manifest.size, "boot": names, "cmdline": cmdline}))
        work.chmod(0o755)

    try:
        return load(cached(bases, digest, build), digest)
    except ImageError as err:
        raise BootError(f"image {digest[:16]}: {err}") from None


def load(directory: Path, digest: str) -> BootImage:
    """A base made by `materialize`, from its directory."""
    meta = json.loads((directory / "manifest.json").read_text())
    kernel, initrd = (directory / meta["boot"][0], directory / meta["boot"][1]) if meta["boot"] else (None, None)
    return BootImage(digest, directory / BASE, kernel, initrd, meta["cmdline"], meta["size"])


def prune(bases: Path, keep: set[str], min_age: float = 0.0) -> list[str]:
    """Remove the bases of images not in `keep` (digests some VM here boots) made over `min_age` seconds ago
    (a younger one may be a new VM's, made before its domain is defined); returns the digests removed."""
    removed, now = [], time.time()
    for directory in sorted(bases.iterdir()) if bases.is_dir() else []:
        if (directory.is_dir() and not directory.name.startswith(".") and directory.name not in keep
                and now - directory.stat().st_mtime >= min_age):
            shutil.rmtree(directory)
            removed.append(directory.name)
    return removed


def is_file_system(raw: Path) -> bool:
    """Whether `raw` starts with an ext2/3/4 file system (rather than a partition table)."""
    with raw.open("rb") as f:
        f.seek(EXT_MAGIC_AT)
        return f.read(2) == EXT_MAGIC


def boot_files(raw: Path, into: Path) -> tuple[Path, Path] | None:
    """The kernel and initrd in /boot of the file-system image `raw`, dumped into `into` for direct kernel
    boot (no mount); None for an image that is not a file system (the BIOS boots it)."""
    if not is_file_system(raw):
        return None
    into.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in boot_names(raw):
        out = into / name
        out.unlink(missing_ok=True)  # debugfs's dump does not overwrite
        run("debugfs", "-R", f"dump /boot/{name} {out}", str(raw))  # exits 0 even when dump fails
        if not out.exists() or out.stat().st_size == 0:
            raise ImageError(f"debugfs could not dump /boot/{name} from {raw}")
        out.chmod(0o444)
        paths.append(out)
    return paths[0], paths[1]


def boot_names(raw: Path) -> tuple[str, str]:
    """The newest kernel's (vmlinuz, initrd) file names in the image's /boot, read with debugfs."""
    listing = run("debugfs", "-R", "ls -p /boot", str(raw))
    names = {line.split("/")[5] for line in listing.splitlines() if line.count("/") >= 6}
    for kernel in sorted((n for n in names if n.startswith("vmlinuz-")), reverse=True):
        initrd = "initrd.img-" + kernel.removeprefix("vmlinuz-")
        if initrd in names:
            return kernel, initrd
    raise ImageError("its file system has no /boot/vmlinuz-* with its initrd.img-*: nothing to boot")


def _cmdline(raw: Path) -> str:
    """The image's /etc/kernel/cmdline, or DEFAULT_CMDLINE (debugfs prints nothing for a missing file)."""
    text = " ".join(run("debugfs", "-R", "cat /etc/kernel/cmdline", str(raw)).split())
    return text or DEFAULT_CMDLINE
