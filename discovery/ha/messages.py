"""The HA service's RPCs: what a node's lease and watches are doing (`ha.status`), and a node's lease record as
the directory holds it (`ha.lease`); both for `discovery ha`, read by operators and agents."""

from __future__ import annotations

from dataclasses import dataclass, field

from discovery.ha.lease import Lease
from overlay.messages import NoArgs
from overlay.wire.codec import limit, sparse
from overlay.wire.rpc import NODE, OPERATOR, Method

READERS = frozenset({NODE, OPERATOR})


@dataclass(frozen=True)
class LeaseOf:
    node: str = field(metadata=limit(256))


@dataclass(frozen=True)
class LeaseRecord:
    """`ha/lease/<node>` as a majority of its replicas hold it: the lease, its version and who wrote it."""

    lease: Lease
    version: int
    writer: str


@dataclass(frozen=True)
class HaStatus:
    """One node's HA view: its own lease (as its keeper holds it) and the hosts it watches."""

    node: str
    epoch: int
    listed: list[str]
    """The protected VEs with a VM here, as the last renewal written lists them."""
    frozen: bool
    frozen_vms: list[str]
    """The VMs the last freeze paused (held until a thaw, or removed by a fence)."""
    watching: dict[str, str]
    """Host -> the state of this node's watch of it (idle, observe, revoke, confirm, follow, done)."""
    recovered: int
    """VEs this node recovered as a watcher since it started."""
    expires_in: float | None = field(default=None, metadata=sparse())
    """Seconds the lease holds for without another renewal (None: not held)."""


HA_STATUS = Method("ha.status", NoArgs, READERS, HaStatus)
HA_LEASE: Method[LeaseOf, LeaseRecord | None] = Method("ha.lease", LeaseOf, READERS, LeaseRecord | None)
