"""The DVMS service's RPCs (`dvms.*`): the partitions' messages and reports between agents, the status
that operators read, and the test hooks that pin load (operators only: they change what the whole
cluster's scheduler does).

A `dvms.msg` is one of the partition protocol's messages (`dvms.partition.Wire`, tagged by `type`): the
dispatcher decodes it, and the handler gets it as the core's own message."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dvms.partition import Wire
from overlay.messages import NoArgs
from overlay.wire.codec import limit, sparse
from overlay.wire.rpc import AGENTS, NODE, OPERATOR, OPERATORS, Method, RequestError

NAME = 200


@dataclass(frozen=True)
class SetLoad:
    """Pin VM `vm` (a domain `ve:vm` on the node) to `cpu` percent of one vCPU (None: unpin), and/or set the
    CPU capacity (percent) DVMS counts for the node."""

    vm: str | None = field(default=None, metadata=limit(NAME))
    cpu: int | None = None
    cpu_capacity: int | None = None

    def __post_init__(self) -> None:
        if self.vm is None and self.cpu_capacity is None:
            raise RequestError("dvms.load needs vm and cpu, or cpu_capacity")
        if self.vm is not None and ":" not in self.vm:
            raise RequestError("vm must be a domain name ve:vm")
        if self.cpu is not None and self.cpu < 0:
            raise RequestError("cpu must be an integer >= 0 (percent of one vCPU), or null to unpin")
        if self.cpu_capacity is not None and self.cpu_capacity <= 0:
            raise RequestError("cpu_capacity must be an integer > 0")


@dataclass(frozen=True)
class ReportedVM:
    ve: str
    vm: str
    vcpus: int
    memory_mb: int
    cpu: int
    """Its CPU demand now, percent of one vCPU."""


@dataclass(frozen=True)
class Report:
    """`dvms.report`: a member's site, the capacity a plan may use there (`dvms.monitor.Monitor.plan_node`),
    and its VMs with their demand."""

    node: str
    site: str
    cpu: int
    memory_mb: int
    vms: list[ReportedVM]


@dataclass(frozen=True)
class Loaded:
    """`dvms.load`: what was pinned, and the CPU capacity DVMS counts now."""

    node: str
    vm: str | None
    cpu: int | None
    cpu_capacity: int


@dataclass(frozen=True)
class NodeLoad:
    """The node's demand as last sampled, and its state (`dvms.monitor.Load`)."""

    cpu: int
    memory_mb: int
    state: str
    cpu_capacity: int | None = field(default=None, metadata=sparse())
    """Known once the monitor sampled."""


@dataclass(frozen=True)
class PartitionView:
    """The partition this node is in: led here (its members, state and problem) or not."""

    id: str
    leader: str
    role: str
    members: list[str] | None
    state: str | None
    problem: str | None


@dataclass(frozen=True)
class MigrationView:
    """A migration of a plan this node leads: `moving` now (since `time`), or how it finished at `time`
    (`migrated`, `failed`, `skipped`: its deadline had passed)."""

    vm: str
    source: str
    target: str
    state: str
    time: float
    partition: str


@dataclass(frozen=True)
class DvmsStatus:
    """`dvms.status`: the load, the partition, the pins, the partitions this node led (how each ended, and
    its problem), and recent events (each a map: `time`, `kind` and what the event says)."""

    node: str
    load: NodeLoad
    partition: PartitionView | None
    pinned: dict[str, int]
    ended: dict[str, str]
    problems: dict[str, str]
    events: list[dict[str, Any]]


DVMS_MSG = Method("dvms.msg", Wire, AGENTS, type(None))
DVMS_REPORT = Method("dvms.report", NoArgs, AGENTS, Report)
DVMS_LOAD = Method("dvms.load", SetLoad, OPERATORS, Loaded)
DVMS_STATUS = Method("dvms.status", NoArgs, frozenset({NODE, OPERATOR}), DvmsStatus)
