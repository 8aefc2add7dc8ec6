"""A tiny real guest for QEMU tests and demos, built from Debian packages only.

Real VE operations (suspend/resume, snapshots, ACPI shutdown, migration) need a real guest, but a
distribution image is hundreds of MiB and boots for a minute under TCG. This builds the smallest guest
that still exercises them: Debian's cloud kernel (virtio and ACPI button as modules, no firmware blobs)
and a busybox initramfs whose `/init`

- loads the virtio/ACPI/evdev modules it needs (the cloud kernel builds them as modules),
- prints `DISCOVERY-GUEST-READY heartbeat=<n>` on the serial console (`READY`: what tests and the
  accelerator probe wait for),
- powers off cleanly when the ACPI power button is pressed (libvirt's `shutdown()`): a `dd` of one
  input event from the "Power Button" evdev device, then sync and `poweroff -f` (no acpid config), and
- writes `HEARTBEAT <n>` to the first sector of its disk every second, continuing from the value it
  finds there at boot, so a reverted snapshot shows on the disk and the counter, and
- with `discovery.load` on its kernel command line, also writes 1 MiB at a time to its disk, fsync'd, and
  prints `LOAD <n>` after each (`benchmarks/replication_cost.py`), and
- configures its first NIC, if it has one, by DHCP (busybox's udhcpc, again and again until a server answers)
  and prints `DISCOVERY-GUEST-NET ip=<address>/<mask> router=<gateway>` once it has an address: what the VE
  networks' tests wait for (the kernel answers pings from then on), and serves `http://<address>/` (busybox's
  httpd, port 80) saying `DISCOVERY-GUEST-WEB ip=<address>`: what a test of exposed ports reaches, and
  `/cgi-bin/load?cpu=N`, which keeps its vCPU N % busy until the next such request and answers (and prints)
  `DISCOVERY-GUEST-LOAD cpu=N`: CPU demand injected from outside (`discovery campaign`'s `load`).

Everything lands in a cache directory (default `$DISCOVERY_HOME/images`) under a name hashed from the
recipe, so a second call reuses the first build; concurrent builders race on an atomic rename.
The kernel and busybox come from `apt-get download` (no installation), so the host needs only apt,
`dpkg-deb`, `mke2fs` and `qemu-img`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

WEB = "DISCOVERY-GUEST-WEB"
"""What the guest's web server answers once it has an address: `WEB ip=<address>`."""
NET = "DISCOVERY-GUEST-NET"
"""The line the guest prints once DHCP gave its first NIC an address: `NET ip=<address>/<mask> router=<gateway>`."""
READY = "DISCOVERY-GUEST-READY"
"""The line `/init` prints on the serial console once its disk is found and the heartbeat starts."""
LOAD = "DISCOVERY-GUEST-LOAD"
"""What `/cgi-bin/load?cpu=N` answers and prints once the guest burns N % of its vCPU: `LOAD cpu=<N>`."""
POWEROFF = "DISCOVERY-GUEST-POWEROFF"
"""The line `/init` prints when the power button was pressed, just before it syncs and powers off."""
KERNEL_META = "linux-image-cloud-amd64"
BUSYBOX = "busybox-static"
MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "button", "evdev")
"""What `/init` loads (with their dependencies, resolved at build time): disk, network, power button."""
CMDLINE = "console=ttyS0 quiet panic=-1"
DISK_MIB = 32
FS_UUID = "6d1c3a52-7e3b-4c38-9a53-0f1e0d15c0de"
RECIPE_VERSION = 3
"""Bump when the build changes in a way the hashed recipe does not capture."""

INIT = r"""#!/bin/busybox sh
# Discovery tiny guest: modules, ready line, power button, disk heartbeat.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /lib/modules/load); do insmod /lib/modules/$m.ko || echo "DISCOVERY-GUEST-ERROR insmod $m"; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
# Any event from an ACPI power button device means "pressed": flush the disk, then power off.
for d in /sys/class/input/event*; do
  if [ "$(cat $d/device/name 2>/dev/null)" = "Power Button" ]; then
    (dd if=/dev/input/${d##*/} bs=24 count=1 >/dev/null 2>&1
     echo DISCOVERY-GUEST-POWEROFF; sync; poweroff -f) &
  fi
done
n=0
if [ -b /dev/vda ]; then
  set -- $(dd if=/dev/vda bs=512 count=1 2>/dev/null | tr -d '\000')
  [ "$1" = HEARTBEAT ] && [ -n "$2" ] && n=$2
else
  echo "DISCOVERY-GUEST-ERROR no /dev/vda"
fi
echo "DISCOVERY-GUEST-READY heartbeat=$n"
# The first NIC, by DHCP: udhcpc runs its script with the lease in its environment.
if [ -e /sys/class/net/eth0 ]; then
  cat > /bin/dhcp-event <<'EOS'
#!/bin/busybox sh
case "$1" in
  bound|renew)
    ifconfig "$interface" "$ip" netmask "$subnet" up
    [ -n "$router" ] && route add default gw "$router" 2>/dev/null
    echo "DISCOVERY-GUEST-WEB ip=$ip" > /srv/index.html
    echo "DISCOVERY-GUEST-NET ip=$ip/$subnet router=$router" > /dev/console ;;
  deconfig) ifconfig "$interface" 0.0.0.0 up ;;
esac
EOS
  chmod +x /bin/dhcp-event
  # GET /cgi-bin/load?cpu=N keeps the vCPU N % busy (a busy loop stopped and continued every 100 ms) until the
  # next request: CPU demand a researcher injects from outside (discovery campaign's `load`).
  mkdir -p /srv/cgi-bin /run
  cat > /srv/cgi-bin/load <<'EOS'
#!/bin/busybox sh
cpu=${QUERY_STRING#cpu=}
case "$cpu" in
  ''|*[!0-9]*) printf 'Status: 400 Bad Request\r\nContent-Type: text/plain\r\n\r\ncpu=N with N in 0..100\n'; exit 0 ;;
esac
[ "$cpu" -gt 100 ] && cpu=100
[ -f /run/burn.pid ] && kill "$(cat /run/burn.pid)" 2>/dev/null
rm -f /run/burn.pid
if [ "$cpu" -gt 0 ]; then
  sh -c '(while :; do :; done) & b=$!
    trap "kill -9 $b; exit 0" TERM
    while :; do
      usleep $(($1 * 1000))
      [ "$1" -lt 100 ] && { kill -STOP $b; usleep $(((100 - $1) * 1000)); kill -CONT $b; }
    done' burn "$cpu" </dev/null >/dev/null 2>&1 &
  echo $! > /run/burn.pid
fi
echo "DISCOVERY-GUEST-LOAD cpu=$cpu" > /dev/console
printf 'Content-Type: text/plain\r\n\r\nDISCOVERY-GUEST-LOAD cpu=%s\n' "$cpu"
EOS
  chmod +x /srv/cgi-bin/load
  ifconfig lo 127.0.0.1 up
  httpd -p 80 -h /srv
  udhcpc -i eth0 -s /bin/dhcp-event -t 3 -T 1 -A 1 >/dev/null 2>&1 &
fi
# With discovery.load on the command line, also write 1 MiB at a time over the 15 MiB after the first (random
# data, its first sector then saying which write it was), fsync'd: a guest that writes, to measure what a disk
# mirror costs it.
if grep -q discovery.load /proc/cmdline && [ -b /dev/vda ]; then
  (mkdir -p /tmp; dd if=/dev/urandom of=/tmp/chunk bs=64k count=16 2>/dev/null; i=0
   while :; do
     dd if=/tmp/chunk of=/dev/vda bs=64k seek=$((16 + i % 15 * 16)) conv=notrunc 2>/dev/null
     printf 'LOAD %d\n' $i | dd of=/dev/vda bs=512 seek=$((2048 + i % 15 * 2048)) conv=notrunc,sync,fsync 2>/dev/null
     echo "LOAD $i"; i=$((i + 1))
   done) &
fi
while :; do
  n=$((n + 1))
  [ -b /dev/vda ] && printf 'HEARTBEAT %d\n' $n | dd of=/dev/vda bs=512 count=1 conv=notrunc,sync,fsync 2>/dev/null
  echo "HEARTBEAT $n"
  sleep 1
done
"""


class ImageError(Exception):
    """An image could not be built or read; the message says which step failed."""


@dataclass(frozen=True)
class TinyGuest:
    """A built guest: direct-boot kernel and initramfs, and its disk (raw ext4 holding them too: what
    `discovery cluster up` imports as the image `tiny`), to put overlays on."""

    kernel: Path
    initrd: Path
    base: Path
    cmdline: str = CMDLINE


def default_cache() -> Path:
    """`$DISCOVERY_HOME/images` (the home defaults as in `discovery.cli.config`, which we may not import)."""
    home = os.environ.get("DISCOVERY_HOME") or str(Path.home() / ".config" / "discovery")
    return Path(home) / "images"


def run(*argv: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    """`argv`'s stdout; ImageError with the last line of its stderr when it fails or outlives `timeout`."""
    try:
        proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ImageError(f"{argv[0]}: {err}") from err
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        raise ImageError(f"{' '.join(argv[:3])}: {last}")
    return proc.stdout


def recipe_hash() -> str:
    """Names the build: any change to the init script, modules, packages or command line is a new image."""
    recipe = json.dumps([RECIPE_VERSION, INIT, MODULES, KERNEL_META, BUSYBOX, CMDLINE, DISK_MIB, FS_UUID])
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


def build(cache: Path | None = None) -> TinyGuest:
    """The tiny guest in `cache` (default `default_cache()`), built first if it is not there yet."""
    final = cached(Path(cache) if cache else default_cache(), f"tinyguest-{recipe_hash()}", _build_into)
    return TinyGuest(kernel=final / "vmlinuz", initrd=final / "initrd.gz", base=final / "disk.raw")


def cached(root: Path, name: str, build_into: Callable[[Path], None]) -> Path:
    """`root/name`, made first by `build_into(work)` in a temporary directory renamed into place when done
    (it must end by writing `manifest.json`), so that neither a crash nor a concurrent builder leaves half."""
    final = root / name
    if not (final / "manifest.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        try:
            build_into(work)
            try:
                work.rename(final)
            except OSError:  # another builder won the race: use its image
                if not (final / "manifest.json").exists():
                    raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return final


def _kernel_package() -> str:
    """The versioned image package the meta-package points at (linux-image-<abi>-cloud-amd64)."""
    for line in run("apt-cache", "depends", KERNEL_META).splitlines():
        name = line.strip().removeprefix("Depends:").strip()
        if line.strip().startswith("Depends:") and name.startswith("linux-image-"):
            return name
    raise ImageError(f"apt-cache depends {KERNEL_META}: no linux-image dependency (run apt-get update?)")


def _download(work: Path, package: str) -> Path:
    debs = work / "debs"
    debs.mkdir(exist_ok=True)
    run("apt-get", "download", "-q", package, cwd=debs)
    found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        raise ImageError(f"apt-get download {package}: no .deb appeared")
    return found[-1]


def _unpack(deb: Path, into: Path) -> Path:
    """`dpkg-deb -x` once (one pass over the kernel's xz data, ~6 s; member-by-member reads cost one each)."""
    run("dpkg-deb", "-x", str(deb), str(into))
    return into


def _depends(module: bytes) -> list[str]:
    """The `depends=` entry of a module's .modinfo section (NUL-separated key=value strings)."""
    start = module.find(b"\0depends=")
    if start < 0:
        return []
    value = module[start + 9:module.index(b"\0", start + 1)].decode()
    return [name for name in value.split(",") if name]


def _modules(tree: Path, abi: str) -> list[tuple[str, bytes]]:
    """MODULES and what they depend on, in load order (dependencies first; modules.dep is made at install)."""
    index = {path.stem.replace("-", "_"): path for path in (tree / "lib/modules" / abi).rglob("*.ko")}
    ordered: list[str] = []

    def visit(name: str) -> None:
        if name not in index:
            raise ImageError(f"kernel {abi}: no module {name}")
        if name not in ordered:
            for dep in _depends(index[name].read_bytes()):
                visit(dep)
            ordered.append(name)

    for name in MODULES:
        visit(name)
    return [(name, index[name].read_bytes()) for name in ordered]


def _cpio_newc(entries: list[tuple[str, int, bytes, tuple[int, int]]]) -> bytes:
    """A `cpio -H newc` archive of (path, mode, data, (rdev major, minor)), as the kernel unpacks it."""
    out = io.BytesIO()

    def pad() -> None:
        out.write(b"\0" * (-out.tell() % 4))

    for ino, (name, mode, data, (major, minor)) in enumerate([*entries, ("TRAILER!!!", 0, b"", (0, 0))], 1):
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, major, minor, len(name) + 1, 0)
        out.write(b"070701" + b"".join(b"%08X" % value for value in fields) + name.encode() + b"\0")
        pad()
        out.write(data)
        pad()
    return out.getvalue()


def _initramfs(busybox: bytes, modules: list[tuple[str, bytes]]) -> bytes:
    directory, regular = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o755
    entries = [(d, directory, b"", (0, 0)) for d in ("bin", "dev", "proc", "sys", "lib", "lib/modules")]
    entries += [("dev/console", stat.S_IFCHR | 0o600, b"", (5, 1)),
                ("bin/busybox", regular, busybox, (0, 0)),
                ("init", regular, INIT.encode(), (0, 0)),
                ("lib/modules/load", stat.S_IFREG | 0o644, " ".join(n for n, _ in modules).encode() + b"\n", (0, 0))]
    entries += [(f"lib/modules/{name}.ko", stat.S_IFREG | 0o644, blob, (0, 0)) for name, blob in modules]
    return gzip.compress(_cpio_newc(entries), mtime=0)


def _build_into(work: Path) -> None:
    kernel_pkg = _kernel_package()
    abi = kernel_pkg.removeprefix("linux-image-")
    kernel_deb, busybox_deb = _download(work, kernel_pkg), _download(work, BUSYBOX)
    tree = _unpack(kernel_deb, work / "debs" / "kernel")
    vmlinuz = (tree / "boot" / f"vmlinuz-{abi}").read_bytes()
    modules = _modules(tree, abi)
    busybox = (_unpack(busybox_deb, work / "debs" / "busybox") / "bin" / "busybox").read_bytes()
    initrd = _initramfs(busybox, modules)
    (work / "vmlinuz").write_bytes(vmlinuz)
    (work / "initrd.gz").write_bytes(initrd)
    _disk(work / "disk", abi, vmlinuz, initrd)
    shutil.rmtree(work / "debs")
    manifest = {"kernel": kernel_deb.name, "busybox": busybox_deb.name, "modules": [n for n, _ in modules],
                "cmdline": CMDLINE, "recipe": recipe_hash(),
                "bytes": {p.name: p.stat().st_size for p in sorted(work.iterdir())}}
    for path in work.iterdir():
        path.chmod(0o644)  # base and kernel are only read; QEMU may run as another user
    work.chmod(0o755)
    (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _disk(tree: Path, abi: str, vmlinuz: bytes, initrd: bytes) -> None:
    """`disk.raw` beside `tree`: an ext4 file system holding the kernel and initramfs in /boot and the command
    line in /etc/kernel/cmdline, so the guest boots from its own disk as any catalogued image does
    (`images.boot`). The guest's heartbeat goes to its first sector, which ext4 leaves unused."""
    for name, data in ((f"boot/vmlinuz-{abi}", vmlinuz), (f"boot/initrd.img-{abi}", initrd),
                       ("etc/kernel/cmdline", CMDLINE.encode() + b"\n")):
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes(data)
    for path in [tree, *tree.rglob("*")]:
        os.utime(path, (0, 0))  # the same file system from the same files, build after build
    env = {**os.environ, "E2FSPROGS_FAKE_TIME": "1"}
    run("mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-L", "tinyguest", "-U", FS_UUID, "-E",
        f"hash_seed={FS_UUID}", "-d", str(tree), str(tree.with_name("disk.raw")), f"{DISK_MIB}M", env=env)
    shutil.rmtree(tree)


def make_overlay(base: Path, path: Path, size: int | None = None, backing_format: str = "raw",
                 relative: bool = False) -> Path:
    """A per-VM qcow2 overlay on `base` (which must then never change): the VM writes only here. `size` in
    bytes (at least the base's; default the base's); `relative`: the overlay names its base by a path relative
    to its own directory, so the pair can be seen under another root (a libvirtd's mount namespace)."""
    path = Path(path)
    backing = os.path.relpath(Path(base).absolute(), path.parent.absolute()) if relative else str(Path(base).absolute())
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", backing, "-F", backing_format, str(path),
        *([str(size)] if size else []), cwd=path.parent)
    return path


def read_heartbeat(disk: Path) -> int:
    """The counter the guest last wrote to `disk` (0 when it never wrote); safe while the guest runs."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sector"
        run("qemu-img", "dd", "-U", "-f", "qcow2", "-O", "raw", "bs=512", "count=1", f"if={disk}", f"of={out}")
        return parse_heartbeat(out.read_bytes())


def parse_heartbeat(sector: bytes) -> int:
    """`HEARTBEAT <n>` at the start of a sector → n; anything else (a fresh zeroed disk) → 0."""
    words = sector.split(b"\0", 1)[0].split()
    return int(words[1]) if len(words) >= 2 and words[0] == b"HEARTBEAT" and words[1].isdigit() else 0
