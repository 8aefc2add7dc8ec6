"""`top.*`: the whole cluster in one answer, for `discovery top` (operators, and agents).

`top.cluster` is what the CLI calls, once per refresh: the agent it reaches asks every live member for
`top.node` at once, under one deadline, and merges the answers (`discovery.top.summary`). Every list is
bounded (nodes by the cluster, events and migrations by the query), so the answer stays a few KiB over a
slow link (docs/benchmarks.md). Operators only, as `dvms.status` and `ha.status` are: the view names every
user's VEs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agents.eventlog import MAX_EVENTS, LoggedEvent
from discovery.scheduler.messages import MigrationView, PartitionView
from overlay.wire.codec import limit, sparse
from overlay.wire.rpc import NODE, OPERATOR, Method, RequestError

READERS = frozenset({NODE, OPERATOR})
MAX_NODES = 10_000
MAX_MIGRATIONS = 50
MAX_DEADLINE = 30.0
NAME = 200


@dataclass(frozen=True)
class TopQuery:
    """How many recent `events` and DVMS `migrations` to return, and how long (seconds) the members have to
    answer before they are shown as silent."""

    events: int = 12
    migrations: int = 8
    deadline: float = 2.0

    def __post_init__(self) -> None:
        if not 0 <= self.events <= MAX_EVENTS:
            raise RequestError(f"events must be an integer from 0 to {MAX_EVENTS}")
        if not 0 <= self.migrations <= MAX_MIGRATIONS:
            raise RequestError(f"migrations must be an integer from 0 to {MAX_MIGRATIONS}")
        if not 0 < self.deadline <= MAX_DEADLINE:
            raise RequestError(f"deadline must be a number of seconds above 0, at most {MAX_DEADLINE:g}")


@dataclass(frozen=True)
class Usage:
    """What a node holds against what it has: vCPUs and memory of its VMs and reservations (the host's
    ledger) out of its capacity; the CPU its VMs demand (percent of one vCPU) out of what DVMS counts, and
    DVMS's verdict (normal, overload, underload); its VMs, and how many run."""

    vcpus: int
    vcpus_total: int
    memory_mb: int
    memory_mb_total: int
    cpu: int
    cpu_capacity: int
    load: str
    vms: int
    running: int


@dataclass(frozen=True)
class NodeTop:
    """`top.node`: one node's own part of the view."""

    name: str = field(metadata=limit(NAME))
    site: str = field(metadata=limit(NAME))
    usage: Usage
    partition: PartitionView | None
    events: list[LoggedEvent] = field(metadata=limit(MAX_EVENTS))
    migrations: list[MigrationView] = field(metadata=limit(MAX_MIGRATIONS))


@dataclass(frozen=True)
class NodeRow:
    """A member as the answering agent's gossip sees it (`state`: alive, suspect, dead, left) and, if it answered
    in time, its usage and partition; else `silent` says why not (`timeout`, `unreachable`, or its state)."""

    name: str
    site: str
    state: str
    usage: Usage | None = field(default=None, metadata=sparse())
    partition: PartitionView | None = field(default=None, metadata=sparse())
    silent: str | None = field(default=None, metadata=sparse())


@dataclass(frozen=True)
class ClusterEvent(LoggedEvent):
    """An event, and the node that noted it (the first, when several did: every member hears of a death)."""

    node: str = ""


@dataclass(frozen=True)
class ClusterTop:
    """`top.cluster`: the members by site then name, the newest events first, the DVMS migrations under way then
    the newest; `by`, the agent that gathered them, at `time` (seconds since the epoch), in `seconds`."""

    by: str
    time: float
    seconds: float
    nodes: list[NodeRow] = field(metadata=limit(MAX_NODES))
    events: list[ClusterEvent] = field(metadata=limit(MAX_EVENTS))
    migrations: list[MigrationView] = field(metadata=limit(MAX_MIGRATIONS))


TOP_NODE = Method("top.node", TopQuery, READERS, NodeTop)
TOP_CLUSTER = Method("top.cluster", TopQuery, READERS, ClusterTop)
