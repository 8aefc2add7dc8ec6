"""`top.node` and `top.cluster`: the I/O around `discovery.top.summary`.

`discovery top` refreshes over what may be a slow link, so it makes one request per refresh: the agent it
reaches gathers for it, from every live member at once (`top.node`), under the query's deadline. A member
that is slow or gone costs the view that deadline at most and shows as silent; it never holds it back.
A node's own part reads only what its services already keep (the host's ledger and its last listing of
domains, DVMS's state, the node's event log): answering never waits on another node, nor on libvirt beyond
the host's listing patience.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

import trio

from agents.eventlog import EventLog
from agents.host.capacity import Ledger
from agents.hypervisor.actor import DomainInfo
from discovery.scheduler.messages import MigrationView, NodeLoad, PartitionView
from discovery.top.messages import TOP_CLUSTER, TOP_NODE, ClusterTop, NodeTop, TopQuery, Usage
from discovery.top.summary import summarize
from overlay.membership import Membership
from overlay.wire.rpc import Caller, Endpoint, RemoteError, RpcError, RpcTimeout

GRACE = 1.0
"""Seconds `top.cluster` allows beyond the query's deadline for its own work, so its caller can set a timeout."""


class Host(Protocol):
    """This node's host service as the view reads it (`agents.host.service.HostService`)."""

    @property
    def ledger(self) -> Ledger: ...

    async def listing(self) -> list[DomainInfo]: ...


class Scheduler(Protocol):
    """This node's DVMS as the view reads it (`discovery.scheduler.service.DvmsService`)."""

    load: NodeLoad
    cpu_capacity: int

    def partition(self) -> PartitionView | None: ...

    def migrations(self, count: int) -> Sequence[MigrationView]: ...


class TopService:
    """Given this node's `name` and `site`, the `transport`, the `membership` view, its `host`, its DVMS
    (`scheduler`) and its `events`."""

    def __init__(self, *, name: str, site: str, transport: Endpoint, membership: Membership, host: Host,
                 scheduler: Scheduler, events: EventLog) -> None:
        self.name, self.site, self.transport, self.membership = name, site, transport, membership
        self.host, self.scheduler, self.events = host, scheduler, events

    def serve(self, endpoint: Endpoint) -> None:
        """Route the methods this service serves; the composition place calls it (`discovery.agent`)."""
        endpoint.route(TOP_NODE, self._on_node)
        endpoint.route(TOP_CLUSTER, self._on_cluster)

    async def _on_node(self, caller: Caller, query: TopQuery) -> NodeTop:
        ledger = self.host.ledger
        used = ledger.total - ledger.free(trio.current_time())
        domains = await self.host.listing()
        load = self.scheduler.load
        usage = Usage(used.vcpus, ledger.total.vcpus, used.memory_mb, ledger.total.memory_mb, load.cpu,
                      self.scheduler.cpu_capacity, load.state, len(domains),
                      sum(d.state == "running" for d in domains))
        return NodeTop(self.name, self.site, usage, self.scheduler.partition(), self.events.recent(query.events),
                       list(self.scheduler.migrations(query.migrations)))

    async def _on_cluster(self, caller: Caller, query: TopQuery) -> ClusterTop:
        started = trio.current_time()
        members = list(self.membership.members.values())
        asked = {m.addr: m.name for m in self.membership.alive()}
        answers: dict[str, NodeTop | str] = {}
        with trio.move_on_after(query.deadline + GRACE):  # our own part too: never past what the caller waits
            got = await self.transport.ask_many(list(asked), TOP_NODE, query, timeout=query.deadline)
            answers = {asked[addr]: _why(a) if isinstance(a, RpcError) else a for addr, a in got.items()}
        answers = {name: answers.get(name, "timeout") for name in asked.values()}
        return summarize(self.name, members, answers, time.time(), trio.current_time() - started, query)


def _why(error: RpcError) -> str:
    """Why a member gave no view, in a word or a short line (an agent of an older version: `unknown_method`)."""
    if isinstance(error, RpcTimeout):
        return "timeout"
    return error.kind if isinstance(error, RemoteError) else "unreachable"
