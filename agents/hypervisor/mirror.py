"""A running guest's disk mirrored to an NBD export on another node: libvirt's block copy (QEMU drive-mirror).

The copy is *shallow* (only the guest's qcow2 overlay: the destination is an overlay of the same base, which
every node keeps by the image's digest) and *reuses* the destination the standby's node made and exports
(`agents.host.nbd`). It is a transient job: the domain stays persistent, and no pivot ever happens, so the
job mirrors until it is ended (`end`) or fails. Once the job is *ready* (the first full pass done), every
write of the guest is copied after it: asynchronously (the default: the guest never waits, the copy lags
by what is dirty and not yet sent) or, with `sync`, before the guest's write completes (QEMU's write-blocking
mode: no lag, every write pays a round trip). A throttle is the destination's (`agents.host.nbd`): QEMU 7.2's
own speed limit (`blockCopy`'s bandwidth, `blockJobSetSpeed`) left a ready job copying at full speed, measured
(`benchmarks/replication_cost.py`).

Ending a ready job without a pivot leaves the destination a consistent copy of the disk as it was at that
moment (QEMU's `block-job-cancel` after BLOCK_JOB_READY), which is what the standby's node keeps then.
A job blocks snapshots, managed saves and migrations of the domain: they end it first (`end`), and the
replication shell starts it again afterwards.

Everything here runs in a `HypervisorActor`'s thread, on its connection.
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import libvirt

END_PATIENCE = 10.0
"""Seconds an ended job may take to go away (QEMU flushes what is in flight first)."""


@dataclass(frozen=True)
class CopyJob:
    """A mirror job as libvirt shows it: bytes copied (`cur`, cumulative) out of bytes known dirty (`end`,
    cumulative too), whether the first pass is done, and where it copies to."""

    cur: int
    end: int
    ready: bool
    target: str


def disk_target(dom: libvirt.virDomain) -> str:
    """The domain's first disk's target (the tiny guest's and every Discovery guest's only disk: `vda`)."""
    dev = ET.fromstring(dom.XMLDesc(0)).find("devices/disk/target")
    if dev is None or not dev.get("dev"):
        raise ValueError(f"domain {dom.name()} has no disk to mirror")
    return str(dev.get("dev"))


def destination_xml(host: str, port: int, export: str) -> str:
    """An NBD export as a block copy's destination: the raw view of the remote overlay."""
    disk = ET.Element("disk", type="network", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="raw")
    source = ET.SubElement(disk, "source", protocol="nbd", name=export)
    ET.SubElement(source, "host", name=host, port=str(port))
    return ET.tostring(disk, encoding="unicode")


def begin(dom: libvirt.virDomain, host: str, port: int, export: str, sync: bool) -> None:
    """Start mirroring the domain's disk to `export` at host:port (see the module docstring)."""
    flags = (libvirt.VIR_DOMAIN_BLOCK_COPY_SHALLOW | libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT
             | libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB)
    if sync:
        flags |= libvirt.VIR_DOMAIN_BLOCK_COPY_SYNCHRONOUS_WRITES
    dom.blockCopy(disk_target(dom), destination_xml(host, port, export), {}, flags)


def limit_writes(dom: libvirt.virDomain, rate: int) -> None:
    """Cap the guest's writes to its disk at `rate` bytes/s (0: no cap), live: a mirror too far behind holds the
    guest back (`agents.host.mirror_lag.hold_back`)."""
    dom.setBlockIoTune(disk_target(dom), {"write_bytes_sec": rate}, libvirt.VIR_DOMAIN_AFFECT_LIVE)


def job(dom: libvirt.virDomain) -> CopyJob | None:
    """The domain's mirror job, or None (none, never started, or it ended: failed, or the domain stopped)."""
    if not dom.isActive():
        return None
    root = ET.fromstring(dom.XMLDesc(0))
    disk = root.find("devices/disk")
    mirror = disk.find("mirror") if disk is not None else None
    if disk is None or mirror is None or mirror.get("job") != "copy":
        return None
    info = dom.blockJobInfo(disk_target(dom), 0)
    if not info:
        return None
    host = mirror.find("source/host")
    target = f"{host.get('name')}:{host.get('port')}" if host is not None else mirror.get("file", "")
    return CopyJob(int(info["cur"]), int(info["end"]), mirror.get("ready") == "yes", target)


def end(dom: libvirt.virDomain) -> bool:
    """End the domain's mirror job, if any, without a pivot, and wait until it is gone; whether there was one."""
    if job(dom) is None:
        return False
    dom.blockJobAbort(disk_target(dom), 0)
    deadline = time.monotonic() + END_PATIENCE
    while job(dom) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    return True
