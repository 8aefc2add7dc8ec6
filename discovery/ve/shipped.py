"""Shipped snapshots (issue 15): a VM's disk, taken every `snapshot_every` on its host (`ha: {mode: restart}`),
kept as a catalogued image on nodes of other sites, so that the VM can restart elsewhere from it once its host
is gone. This module holds their rules; `discovery.ve.shipping` runs them.

**An image.** A shipped snapshot is image `snap/<ve>/<vm>:<tag>` (`image_name`; the tag is the UTC second it
was taken, `YYYYmmdd-HHMMSS`): the VM's guest-visible disk content (for a VM without a disk, its domain XML),
made by its host (`agents.host.snapshot_images`) and pulled by REMOTE_HOLDERS other nodes. The chunk store
makes it incremental: a node that holds the previous snapshot fetches only the chunks that changed since, so
`ship_targets` keeps the same nodes from one snapshot to the next. Whatever boots an image boots it: a rebuild
of the VM on another node, or `ve create` with `image: snap/<ve>/<vm>:<tag>`.

**The log.** Which snapshots a VE's VMs have is the `ShippedLog` under `shipped/<ve>` in the records: the
VE's `uid` (a VE created again under its name starts another log) and, per VM, the snapshots shipped and not
yet pruned, oldest first. Not in the VE record: the hosts write the log every `snapshot_every`, and the VE's
transactions write their record conditionally, so a write beside them would fail a relocation or a failover
half-way. Per snapshot: an image name (~40 bytes), a digest (64) and a time; `keep` (at most 100) of them
per VM. A snapshot is listed once its image has holders besides the VM's host; it is pruned (`beyond`) by
removing the image first, then the entry, so a pruning cut short is finished by the next one.

Sans-IO: it must never import trio, the transport or the agent.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from overlay.wire import codec
from overlay.wire.codec import CodecError, sparse

PREFIX = "shipped/"
"""The logs' keys in the records: `shipped/<ve>`."""
IMAGES = "snap"
REMOTE_HOLDERS = 2
"""Nodes besides the VM's host that keep each shipped snapshot (other sites first)."""
VERSION = 1


class LogError(ValueError):
    """A stored value that is no shipped-snapshot log this agent can read; one line."""


@dataclass(frozen=True)
class ShippedSnapshot:
    """A snapshot that left its VM's host: image `image`, whose manifest digest is `digest`, taken at `time`."""

    image: str
    digest: str
    time: float

    @property
    def tag(self) -> str:
        return self.image.rpartition(":")[2]


@dataclass(frozen=True)
class ShippedLog:
    """The shipped snapshots of VE incarnation `uid`, per VM, oldest first."""

    uid: str
    vms: Mapping[str, tuple[ShippedSnapshot, ...]] = field(default_factory=dict, metadata=sparse())
    version: int = VERSION

    def of(self, vm: str) -> tuple[ShippedSnapshot, ...]:
        return self.vms.get(vm, ())

    def last(self, vm: str) -> ShippedSnapshot | None:
        return self.of(vm)[-1] if self.of(vm) else None

    def with_shipped(self, vm: str, snapshot: ShippedSnapshot) -> ShippedLog:
        """The log listing `snapshot` as `vm`'s newest (it sorts by time: a slower host's earlier one stays older)."""
        listed = sorted({*self.of(vm), snapshot}, key=lambda s: (s.time, s.image))
        return replace(self, vms={**self.vms, vm: tuple(listed)})

    def without(self, vm: str, images: Iterable[str]) -> ShippedLog:
        gone = set(images)
        left = tuple(s for s in self.of(vm) if s.image not in gone)
        return replace(self, vms={v: s for v, s in self.vms.items() if v != vm} | ({vm: left} if left else {}))

    def beyond(self, vm: str, keep: int) -> tuple[ShippedSnapshot, ...]:
        """`vm`'s snapshots older than its newest `keep`: those to prune."""
        listed = self.of(vm)
        return listed[:max(0, len(listed) - keep)]


def image_name(ve: str, vm: str, taken: float) -> str:
    """The image of VM `vm` of VE `ve` shipped at `taken` (neither name holds '/' nor ':', so names never collide)."""
    return f"{IMAGES}/{ve}/{vm}:{time.strftime('%Y%m%d-%H%M%S', time.gmtime(taken))}"


def due(every: int, last: ShippedSnapshot | None, attempted: float | None, now: float) -> bool:
    """Whether a VM whose policy ships every `every` seconds ships now: at once if it never did, else `every` after
    its last snapshot and after the last attempt (a failing one is not retried at every pass)."""
    since = max(last.time if last is not None else -float("inf"), attempted if attempted is not None else -float("inf"))
    return now - since >= every


def ship_targets(host: str, live: Mapping[str, str], previous: Iterable[str], vm_key: str,
                 count: int = REMOTE_HOLDERS) -> list[str]:
    """The live nodes (`live`: node -> site) besides `host` that should keep a new snapshot of VM `vm_key`
    (`<ve>/<vm>`): nodes of other sites than the host's first, among them the nodes that hold the previous
    snapshot (`previous`: they lack only what changed), then by a hash of VM and node, so that the same nodes
    keep a VM's snapshots from one to the next, and different VMs spread over the nodes."""
    host_site = live.get(host)
    held = set(previous)

    def rank(node: str) -> tuple[bool, bool, bytes]:
        return (live[node] == host_site, node not in held,
                hashlib.blake2b(f"{vm_key}/{node}".encode(), digest_size=8).digest())

    return sorted((n for n in live if n != host), key=rank)[:count]


def restore_point(log: ShippedLog, ve: str, vm: str, tag: str | None = None) -> ShippedSnapshot:
    """What to boot to bring VM `vm` of VE `ve` back from its shipped snapshots: the one tagged `tag`, or the
    newest; LookupError, one line naming those there are, if there is none. What a rebuild on another node boots
    (its image, or its digest) when the VM's host is gone."""
    listed = log.of(vm)
    if tag is None and listed:
        return listed[-1]
    found = next((s for s in listed if s.tag == tag), None)
    if found is not None:
        return found
    known = f"shipped: {', '.join(s.tag for s in listed)}" if listed else "none shipped"
    raise LookupError(f"{ve}/{vm} has no shipped snapshot{'' if tag is None else f' {tag!r}'} ({known})")


def read(value: Any, uid: str) -> ShippedLog:
    """The log a stored value holds for VE incarnation `uid` (a log of an earlier incarnation, or none: empty);
    LogError if this agent cannot read it."""
    if value is None:
        return ShippedLog(uid)
    version = value.get("version", VERSION) if isinstance(value, Mapping) else None
    if version != VERSION:
        raise LogError(f"shipped-snapshot log of format {version!r}: this agent reads format {VERSION}")
    try:
        log: ShippedLog = codec.decode(ShippedLog, value)
    except CodecError as err:
        raise LogError(f"shipped-snapshot log: {err}") from None
    return log if log.uid == uid else ShippedLog(uid)


def write(log: ShippedLog) -> dict[str, Any]:
    data: dict[str, Any] = codec.encode(log)
    return data
