"""Real Debian guest images, built from Debian packages only: what the image store deduplicates and boots.

The tiny guest (`images.tinyguest`) proves VM operations, but says nothing about storing real images: the
store's chunk sizes, its dedup saving and its boot path must be measured on what users bring. This builds
three bookworm images, each a 1 GiB raw ext4 disk (and a qcow2 copy):

- `minbase`: `debootstrap --variant=minbase` + Debian's cloud kernel + systemd-sysv (minbase has no init) +
  iproute2 (`ip`: what every Debian system but minbase has, and how the guest reads its address),
- `ssh`: minbase + openssh-server + python3,
- `ssh-next`: ssh + curl + less, the "next version" of `ssh` (a few packages added).

How, and why so:

- `debootstrap` runs in a private mount namespace (`unshare --mount`), so the /proc, /sys and /dev mounts
  it makes in its target vanish with it, even when it is killed; its .deb files are kept in a cache shared
  by every build. The mirror is the one apt already uses on this host (/etc/apt/sources.list*).
- The root tree becomes a raw ext4 image with `mke2fs -d`: no loop device, no mount. Its kernel and initrd
  are read back out of the image with `debugfs` (`images.boot`), for direct kernel boot with `CMDLINE`
  (root=/dev/vda, console=ttyS0, also `images.boot.DEFAULT_CMDLINE`): the images carry no boot loader.
- A systemd unit prints `READY` on the serial console once multi-user.target is reached. root has no
  password (console login only: sshd refuses empty passwords); the ssh images make their host keys at first
  boot, so no two VMs share one.
- Every Ethernet NIC (`en*`, `eth*`) gets its IPv4 address by DHCP, as a VE network's hosts hand them out
  (`agents.network.dhcp`), from systemd-networkd: it comes with bookworm's systemd, already in every image,
  where ifupdown would add packages, ISC's DHCP client (end of life upstream) and a boot that waits for the
  leases (networking.service). No IPv6 autoconfiguration (VE networks are IPv4), so a link is configured once
  DHCP is; networkd asks again and again until a server answers, as the tiny guest's udhcpc does.
- Like the tiny guest, the guest then prints `DISCOVERY-GUEST-NET ip=<address>/<mask> router=<gateway>`
  (`tinyguest.NET`) on the serial console for its first NIC (lowest ifindex): a unit started with
  multi-user.target waits, with systemd-networkd-wait-online and no deadline (a segment's DHCP server may
  start after the VM), for that NIC to be configured, then reads it with `ip`. Being `Type=exec`, it delays
  neither multi-user.target nor `READY` (which it may print before or after), and nothing waits for
  network-online.target, so a guest without NIC boots as fast as before.
- Reproducible enough for dedup: SOURCE_DATE_EPOCH (initramfs-tools honours it), mtimes clamped to it,
  every inode's ctime and atime set to it (debugfs), apt's lists, caches and logs removed, and one fixed
  file-system UUID and directory hash seed for every image: ext4 seeds its metadata checksums with the
  UUID, so a random one would make every inode table, bitmap and directory block of a next version new.
  Two images of one build share that UUID; they are mounted by device (root=/dev/vda), never by UUID.

Builds land in `$DISCOVERY_HOME/images/debian-<variant>-<recipe hash>/` (disk.raw, disk.qcow2,
manifest.json), made in a temporary directory and renamed into place (`tinyguest.cached`). Building needs
root (debootstrap) and installs debootstrap with apt-get when it is missing.

    python -m images.debian build ssh --json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import time
import uuid
from pathlib import Path

from images.boot import DEFAULT_CMDLINE, boot_names
from images.tinyguest import READY, ImageError, cached, default_cache, run

SUITE = "bookworm"
BASE = ("systemd-sysv", "linux-image-cloud-amd64", "iproute2")
VARIANTS: dict[str, tuple[str, ...]] = {
    "minbase": BASE,
    "ssh": (*BASE, "openssh-server", "python3"),
    "ssh-next": (*BASE, "openssh-server", "python3", "curl", "less"),
}
"""The packages each variant adds to `debootstrap --variant=minbase` (their dependencies come along)."""
DISK_BYTES = 1 << 30
EPOCH = 1_700_000_000
"""SOURCE_DATE_EPOCH of every build, and the time every newer file is clamped to."""
FS_UUID = uuid.uuid5(uuid.NAMESPACE_URL, f"discovery:images:debian:{SUITE}")
CMDLINE = DEFAULT_CMDLINE
RECIPE_VERSION = 3
"""Bump when the build changes in a way the hashed recipe does not capture."""

READY_UNIT = f"""[Unit]
Description=Tell the host on the serial console that the guest is up
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo {READY} > /dev/ttyS0'

[Install]
WantedBy=multi-user.target
"""
NETWORK = """[Match]
Name=en* eth*

[Network]
DHCP=ipv4
# VE networks are IPv4: DHCPv4 alone makes the link configured (its address and routes set).
LinkLocalAddressing=no
IPv6AcceptRA=no
"""
NET_UNIT = """[Unit]
Description=Tell the host on the serial console the address DHCP gave the first NIC
After=systemd-networkd.service

[Service]
Type=exec
ExecStart=/usr/local/sbin/discovery-net

[Install]
WantedBy=multi-user.target
"""
NET_SCRIPT = r"""#!/bin/sh
# Once DHCP configured the first NIC (lowest ifindex), print what the tiny guest prints on the serial console:
# DISCOVERY-GUEST-NET ip=<address>/<mask> router=<gateway>. Nothing without a NIC.
udevadm settle --timeout=60  # NICs probed and renamed (eth0 -> ens2)
nic=$(for d in /sys/class/net/en* /sys/class/net/eth*; do [ -e "$d" ] && echo "$(cat "$d/ifindex") ${d##*/}"; done |
      sort -n | awk 'NR == 1 {print $2}')
[ -n "$nic" ] || exit 0
/lib/systemd/systemd-networkd-wait-online --interface="$nic" --ipv4 --timeout=0 || exit 1
set -- $(ip -4 -o address show dev "$nic" scope global)  # 2: ens2 inet 10.0.0.5/24 ...
bits=$(( (0xffffffff << (32 - ${4#*/})) & 0xffffffff ))
mask=$((bits >> 24)).$((bits >> 16 & 255)).$((bits >> 8 & 255)).$((bits & 255))
router=$(ip -4 route show default dev "$nic" | awk '{print $3; exit}')
echo "DISCOVERY-GUEST-NET ip=${4%/*}/$mask router=$router" > /dev/ttyS0
"""
UNITS = ("systemd-networkd.service", "discovery-ready.service", "discovery-net.service")
"""What `systemctl enable` starts at boot (networkd's socket, generator and wait-online come along: nothing
pulls in network-online.target, so wait-online never runs)."""
FILES = {
    "etc/fstab": "/dev/vda / ext4 defaults 0 1\n",
    "etc/hostname": "discovery\n",
    "etc/hosts": "127.0.0.1 localhost\n127.0.1.1 discovery\n",
    "etc/resolv.conf": "",  # debootstrap copied the build host's
    "etc/machine-id": "",  # systemd makes one at each boot: no two VMs share an id
    "etc/systemd/system/discovery-ready.service": READY_UNIT,
    "etc/systemd/system/discovery-net.service": NET_UNIT,
    "etc/systemd/network/80-discovery.network": NETWORK,
    "usr/local/sbin/discovery-net": NET_SCRIPT,
    # The initrd holds the disk's drivers only (the cloud kernel has ext4 built in): 6 MB, where Debian's
    # MODULES=most makes 15 MB whose unpacking alone runs a 128 MiB guest out of memory.
    "etc/initramfs-tools/conf.d/discovery.conf": "MODULES=list\n",
    "etc/initramfs-tools/hooks/discovery": "#!/bin/sh\n[ \"$1\" = prereqs ] && exit 0\n"
                                           ". /usr/share/initramfs-tools/hook-functions\n"
                                           "manual_add_modules virtio_pci virtio_blk\n",
}
SSH_FILES = {
    # sshd -t fails without host keys: make the missing ones first (ssh-keygen -A), then test as Debian does.
    "etc/systemd/system/ssh.service.d/host-keys.conf":
        "[Service]\nExecStartPre=\nExecStartPre=/usr/bin/ssh-keygen -A\nExecStartPre=/usr/sbin/sshd -t\n",
}
REMOVED = ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*_*", "var/log/*.log",
           "var/log/apt/*", "var/cache/debconf/*-old", "var/lib/dpkg/*-old", "var/cache/ldconfig/aux-cache",
           "etc/ssh/ssh_host_*")
"""What a build leaves that differs from build to build and that a guest does not need (or must not share)."""


class Unavailable(ImageError):
    """This host cannot build Debian images at all (not root, no debootstrap, no reachable mirror)."""


def recipe_hash(variant: str) -> str:
    """Names a build: any change to its packages, files or file-system options is a new image."""
    recipe = json.dumps([RECIPE_VERSION, SUITE, VARIANTS[variant], FILES, SSH_FILES, UNITS, REMOVED, DISK_BYTES,
                         EPOCH, str(FS_UUID), CMDLINE])
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


def build(variant: str, cache: Path | None = None) -> Path:
    """The raw image of `variant` (disk.qcow2 and manifest.json beside it), built first if not cached."""
    if variant not in VARIANTS:
        raise ImageError(f"unknown Debian image variant {variant!r}: one of {', '.join(VARIANTS)}")
    root = Path(cache) if cache else default_cache()
    return cached(root, f"debian-{variant}-{recipe_hash(variant)}",
                  lambda work: _build_into(variant, work, root / "debootstrap-debs")) / "disk.raw"


def mirror(apt: Path = Path("/etc/apt")) -> str:
    """The URI apt on this host fetches SUITE's main component from."""
    files = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]
    entries = [entry for path in files if path.exists() for entry in _one_line_entries(path.read_text())]
    entries += [entry for path in sorted((apt / "sources.list.d").glob("*.sources"))
                for entry in _deb822_entries(path.read_text())]
    for uri, suites, components in entries:
        if SUITE in suites and "main" in components:
            return uri.rstrip("/")
    raise Unavailable(f"no apt source for {SUITE} main in {apt}/sources.list*: debootstrap needs a Debian mirror")


Entry = tuple[str, list[str], list[str]]


def _one_line_entries(text: str) -> list[Entry]:
    """`deb [options] uri suite component...` lines (sources.list(5), one-line style)."""
    entries = []
    for line in text.splitlines():
        words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
        if len(words) >= 3 and words[0] == "deb":
            entries.append((words[1], [words[2]], words[3:]))
    return entries


def _deb822_entries(text: str) -> list[Entry]:
    """Stanzas with Types: deb (sources.list(5), deb822 style), unless Enabled: no."""
    entries = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            key, colon, value = line.partition(":")
            if colon and not line.startswith(("#", " ", "\t")):
                fields[key.strip().lower()] = value.strip()
        if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes").lower() != "no":
            entries += [(uri, fields.get("suites", "").split(), fields.get("components", "").split())
                        for uri in fields.get("uris", "").split()]
    return entries


def _debootstrap() -> str:
    """debootstrap's path, installed from the host's apt sources first when missing."""
    if os.geteuid() != 0:
        raise Unavailable("building a Debian image needs root (debootstrap chroots and creates device nodes)")
    if shutil.which("debootstrap") is None:
        try:
            run("apt-get", "update", "-qq")
            run("apt-get", "install", "-y", "-qq", "--no-install-recommends", "debootstrap")
        except ImageError as err:
            raise Unavailable(f"cannot install debootstrap: {err}") from err
    found = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    if not Path(found).exists():
        raise Unavailable("debootstrap is not installed and apt-get did not install it")
    return found


def _build_into(variant: str, work: Path, debs: Path) -> None:
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(EPOCH), "E2FSPROGS_FAKE_TIME": str(EPOCH),
           "LC_ALL": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}
    debootstrap, source = _debootstrap(), mirror()
    debs.mkdir(parents=True, exist_ok=True)
    tree, start = work / "root", time.monotonic()
    try:
        run("unshare", "--mount", "--propagation", "private", debootstrap, "--variant=minbase",
            f"--include={','.join(VARIANTS[variant])}", f"--cache-dir={debs}", SUITE, str(tree), source,
            env=env, timeout=1800)
    except ImageError as err:
        unreachable = re.search(r"Failed getting release file|Couldn't download|Temporary failure|resolve", str(err))
        raise (Unavailable if unreachable else ImageError)(f"debootstrap from {source}: {err}") from err
    installed = _installed(tree)
    _configure(tree, ssh="openssh-server" in installed)
    run("chroot", str(tree), "update-initramfs", "-u", "-k", "all", env=env)  # with the files just written
    _clamp_mtimes(tree)
    raw = work / "disk.raw"
    run("mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-L", "discovery", "-U", str(FS_UUID),
        "-E", f"hash_seed={FS_UUID}", "-d", str(tree), str(raw), f"{DISK_BYTES // 1024}k", env=env)
    shutil.rmtree(tree)
    _set_inode_times(raw, env)
    run("e2fsck", "-fn", str(raw), env=env)  # what mke2fs -d wrote is a clean file system
    run("qemu-img", "convert", "-O", "qcow2", str(raw), str(work / "disk.qcow2"))
    manifest = {"variant": variant, "suite": SUITE, "packages": VARIANTS[variant], "recipe": recipe_hash(variant),
                "mirror": source, "kernel": boot_names(raw)[0], "cmdline": CMDLINE, "fs_uuid": str(FS_UUID),
                "build_seconds": round(time.monotonic() - start, 1), "installed": installed,
                "bytes": {path.name: path.stat().st_size for path in sorted(work.iterdir())}}
    for path in work.iterdir():
        path.chmod(0o644)  # QEMU may run as another user
    work.chmod(0o755)
    (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _installed(tree: Path) -> dict[str, str]:
    """Package → version of what dpkg installed in `tree`."""
    installed = {}
    for stanza in (tree / "var/lib/dpkg/status").read_text().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and line[0] != " ")
        if fields.get("Status") == "install ok installed":
            installed[fields["Package"]] = fields["Version"]
    return dict(sorted(installed.items()))


def _configure(tree: Path, ssh: bool) -> None:
    for pattern in REMOVED:
        for path in tree.glob(pattern):
            path.unlink()
    for name, text in {**FILES, **(SSH_FILES if ssh else {})}.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text(text)
        (tree / name).chmod(0o755 if text.startswith("#!") else 0o644)
    run("chroot", str(tree), "systemctl", "enable", *UNITS)  # offline: only the [Install] symlinks
    shadow = tree / "etc/shadow"  # root: no password (console only; sshd refuses empty ones)
    shadow.write_text(re.sub(r"^root:[^:]*:", "root::", shadow.read_text(), flags=re.M))


def _clamp_mtimes(tree: Path) -> None:
    """Every mtime no later than EPOCH: what the build wrote now looks the same each build."""
    for directory, dirs, files in os.walk(tree):
        for name in [*dirs, *files]:
            path = os.path.join(directory, name)
            mtime = min(os.lstat(path).st_mtime_ns, EPOCH * 10**9)
            os.utime(path, ns=(mtime, mtime), follow_symlinks=False)
    os.utime(tree, ns=(EPOCH * 10**9,) * 2)


def _set_inode_times(raw: Path, env: dict[str, str]) -> None:
    """Every inode's ctime and atime set to EPOCH: mke2fs -d copies them from the tree, where they are the
    time of this build (ctime cannot be set there; mke2fs's own reads move atime)."""
    header = run("dumpe2fs", str(raw), timeout=60)
    first, count = (int(found.group(1)) if (found := re.search(rf"^{name}:\s+(\d+)$", header, re.M)) else 0
                    for name in ("First inode", "Inode count"))
    if not first or not count:
        raise ImageError(f"dumpe2fs {raw}: no first inode or inode count")
    free: set[int] = set()
    for ranges in re.findall(r"^\s+Free inodes: (.*)$", header, re.M):
        for low, _, high in (item.strip().partition("-") for item in ranges.split(",") if item.strip()):
            free.update(range(int(low), int(high or low) + 1))
    used = [2, *(n for n in range(first, count + 1) if n not in free)]  # 2: the root directory
    script = raw.with_name("ctimes.debugfs")
    script.write_text("".join(f"sif <{n}> {field} @{EPOCH}\n" for n in used for field in ("ctime", "atime")))
    run("debugfs", "-w", "-f", str(script), str(raw), env=env)
    script.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m images.debian", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    building = commands.add_parser("build", help="build a variant (or find it built) and print where it is")
    building.add_argument("variant", choices=sorted(VARIANTS))
    building.add_argument("--out", type=Path, help="copy the image here too (qcow2 if the name ends in .qcow2)")
    building.add_argument("--json", action="store_true", help="print the manifest, with the image's paths")
    args = parser.parse_args(argv)
    try:
        raw = build(args.variant)
        if args.out:
            source = raw.with_name("disk.qcow2") if args.out.suffix == ".qcow2" else raw
            run("cp", "--sparse=always", str(source), str(args.out))
    except ImageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.json:
        manifest = json.loads(raw.with_name("manifest.json").read_text())
        print(json.dumps({"raw": str(raw), "qcow2": str(raw.with_name("disk.qcow2")), **manifest}, indent=2))
    else:
        print(raw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
