"""What an agent's layers show Prometheus: collectors that read the services' own state when a scrape comes.

No series is kept up to date through the code: each collector reads, at scrape time, what its service holds
already (the membership table, the ring, the DHT shard and its repair counts, the Vivaldi client, the host's
ledger and libvirt's list of domains, the supervisor's restarts). The one thing the agent did not keep is the
time each request took: `RpcTimes` is the transport's `on_served` hook, counting it per method.

Naming (Prometheus's rules, checked by tests/unit/test_metrics.py): every series starts with `discovery_`,
is in base units (seconds, bytes; ratios as `_ratio`), counters end in `_total`, and labels take a few fixed
values (a state, a method name the agent serves, an error kind), never a VE, VM, chunk or peer name, so the
number of series does not grow with the cluster's content. The process's own figures (resident memory, CPU
seconds, open files) are prometheus_client's standard `process_*` series.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from itertools import accumulate

import trio
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from agents.host.base import HostBase
from agents.hypervisor.actor import DomainInfo
from agents.messages import MirrorStatus
from overlay.chord import ChordState
from overlay.dht import DHT
from overlay.membership import ALIVE, DEAD, LEFT, SUSPECT, Membership
from vivaldi.coordinate import Client

MIB = 1 << 20
GIB = 1 << 30
RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Seconds: a local answer takes a millisecond, a WAN hop tens, a live migration up to a minute."""
VM_STATES = ("running", "paused", "shutoff", "crashed", "other")
"""`agents.hypervisor.actor.DomainInfo.state`'s values."""


@dataclass
class _Times:
    counts: list[int]
    total: float = 0.0


@dataclass(eq=False)  # a collector is registered by identity
class RpcTimes:
    """How long the requests peers sent took to answer, per method, and how many failed, by kind: the
    transport's `on_served` hook (`overlay.wire.rpc`), which reports only methods this agent serves."""

    buckets: tuple[float, ...] = RPC_BUCKETS
    errors: Counter[tuple[str, str]] = field(default_factory=Counter)
    _times: dict[str, _Times] = field(default_factory=dict)

    def observe(self, method: str, seconds: float, error: str | None) -> None:
        times = self._times.get(method)
        if times is None:
            times = self._times[method] = _Times([0] * (len(self.buckets) + 1))
        times.counts[bisect_left(self.buckets, seconds)] += 1  # the first bucket whose bound is >= seconds
        times.total += seconds
        if error is not None:
            self.errors[method, error] += 1

    def collect(self) -> Iterator[Metric]:
        latency = HistogramMetricFamily("discovery_rpc_server_duration_seconds",
                                        "Time from a request's arrival to its answer, per method served.",
                                        labels=["method"])
        bounds = [floatToGoString(b) for b in self.buckets] + ["+Inf"]
        for method, times in sorted(self._times.items()):
            latency.add_metric([method], list(zip(bounds, accumulate(times.counts), strict=True)), times.total)
        yield latency
        errors = CounterMetricFamily("discovery_rpc_server_errors",
                                     "Requests answered with an error, per method and kind (bad_request, not_found, "
                                     "conflict, forbidden, upstream, internal...).", labels=["method", "kind"])
        for (method, kind), count in sorted(self.errors.items()):
            errors.add_metric([method, kind], count)
        yield errors


class AgentCollector:
    """Who this agent is (`info`: its name, site, hypervisor, protocol versions), its services' restarts, the
    connections its transport refused."""

    def __init__(self, info: dict[str, str], restarts: dict[str, int], rejected: Callable[[], int]) -> None:
        self.info, self.restarts, self.rejected = info, restarts, rejected

    def collect(self) -> Iterator[Metric]:
        info = InfoMetricFamily("discovery_agent", "The agent: node name, site, hypervisor, protocol versions spoken.")
        info.add_metric([], self.info)
        yield info
        restarts = CounterMetricFamily("discovery_service_restarts", "Restarts of a service after it crashed.",
                                       labels=["service"])
        for service, count in sorted(self.restarts.items()):
            restarts.add_metric([service], count)
        yield restarts
        yield CounterMetricFamily("discovery_rpc_rejected_connections",
                                  "Connections refused: failed TLS or handshake, or frames that broke the rules.",
                                  value=self.rejected())


class MembershipCollector:
    def __init__(self, membership: Membership) -> None:
        self.membership = membership

    def collect(self) -> Iterator[Metric]:
        counts = Counter(m.status for m in self.membership.members.values())
        members = GaugeMetricFamily("discovery_members", "Members of the cluster as this agent sees them, itself "
                                    "included, by state.", labels=["state"])
        for state in (ALIVE, SUSPECT, DEAD, LEFT):
            members.add_metric([state], counts[state])
        yield members


class RingCollector:
    """Chord's view from this node, and the DHT shard it holds with the work of its anti-entropy."""

    def __init__(self, ring: ChordState, dht: DHT) -> None:
        self.ring, self.dht = ring, dht

    def collect(self) -> Iterator[Metric]:
        me = self.ring.me.id
        yield GaugeMetricFamily("discovery_ring_successors", "Other nodes in this node's Chord successor list.",
                                value=sum(p.id != me for p in self.ring.successor_list()))
        yield GaugeMetricFamily("discovery_ring_predecessor_known", "1 if this node knows its Chord predecessor.",
                                value=self.ring.predecessor is not None)
        deleted = sum(r.deleted for r in self.dht.shard.records.values())
        records = GaugeMetricFamily("discovery_dht_records", "DHT records this node holds as a replica; "
                                    "tombstones are deletions kept until every replica has them.", labels=["kind"])
        records.add_metric(["live"], len(self.dht.shard.records) - deleted)
        records.add_metric(["tombstone"], deleted)
        yield records
        for stat, value in self.dht.stats.items():
            yield CounterMetricFamily(f"discovery_dht_repair_{stat}", _REPAIR_HELP.get(stat, f"Anti-entropy: {stat}."),
                                      value=value)


_REPAIR_HELP = {
    "passes": "Anti-entropy passes (digests compared with the other replicas).",
    "rpcs": "RPCs anti-entropy made.", "failures": "RPCs anti-entropy made that failed.",
    "records_pushed": "Records anti-entropy sent to a replica that lacked them or held an older version.",
    "records_pulled": "Records anti-entropy fetched from a replica that held a newer version.",
}


class VivaldiCollector:
    def __init__(self, client: Client) -> None:
        self.client = client

    def collect(self) -> Iterator[Metric]:
        coordinate = self.client.coordinate
        yield GaugeMetricFamily("discovery_vivaldi_error_ratio", "This node's estimate of its coordinate's relative "
                                "error (1.5 for a fresh node, lower is better).", value=coordinate.error)
        yield GaugeMetricFamily("discovery_vivaldi_height_seconds", "The height of this node's coordinate: the "
                                "part of its RTTs its access link adds.", value=coordinate.height)


class HostCollector:
    """This node's VMs by state (libvirt's listing, refreshed before each scrape: `refresh`; "crashed": left
    down after crashing too often), standby copies, capacity, what VM shipping moved, crashed guests
    restarted, and the mirrors of its disks (lag, bytes behind, bytes sent)."""

    def __init__(self, host: HostBase, listing: Callable[[], Awaitable[list[DomainInfo]]]) -> None:
        self.host, self.listing = host, listing
        self._listed: list[DomainInfo] = []

    async def refresh(self) -> None:
        """Take libvirt's listing (the host's own patience applies); the exporter awaits it before a scrape."""
        self._listed = await self.listing()

    def collect(self) -> Iterator[Metric]:
        ledger = self.host.ledger
        ours = {d.name: d.state for d in self._listed if d.name in ledger.allocated}  # not another tool's domains
        states = Counter(state if state in VM_STATES else "other" for state in ours.values())
        vms = GaugeMetricFamily("discovery_vms", "This node's VMs by libvirt state.", labels=["state"])
        for state in VM_STATES:
            vms.add_metric([state], states[state])
        yield vms
        yield GaugeMetricFamily("discovery_vm_standbys", "Standby copies this node keeps for VMs of other nodes.",
                                value=sum("/" in key for key in ledger.allocated))
        free = ledger.free(trio.current_time())
        for what, total, left, unit in (("vcpus", ledger.total.vcpus, free.vcpus, 1),
                                        ("memory_bytes", ledger.total.memory_mb, free.memory_mb, MIB),
                                        ("disk_bytes", ledger.total.disk_gb, free.disk_gb, GIB)):
            yield GaugeMetricFamily(f"discovery_host_capacity_{what}", f"What this node offers VMs ({what}).",
                                    value=total * unit)
            yield GaugeMetricFamily(f"discovery_host_free_{what}", f"What is left of it, reservations held "
                                    f"included ({what}).", value=left * unit)
        for direction in ("sent", "received"):
            yield CounterMetricFamily(f"discovery_vm_ship_{direction}_bytes", f"Bytes of VM files (disks, memory "
                                      f"images, standby disk copies) {direction} by shipping (`host.fetch`).",
                                      value=self.host.shipped[direction])
        yield CounterMetricFamily("discovery_guest_restarts", "Guests started again on this node after their "
                                  "QEMU died or they crashed (within each VM's restart budget).",
                                  value=self.host.guest_restarts)
        yield from _mirrors(self.host.mirror_status())


def _mirrors(mirrors: list[MirrorStatus]) -> Iterator[Metric]:
    """The mirrors of this node's VMs' disks to their standby copies (`agents.host.replication`), summed over
    the node (no label per VM: `ve show` and `host.mirrors` give each one's)."""
    states = Counter(m.state.partition(":")[0] for m in mirrors)
    by_state = GaugeMetricFamily("discovery_replication_mirrors", "This node's VMs whose disk is mirrored to a "
                                 "standby copy, by state (syncing, ready, waiting).", labels=["state"])
    for state in ("syncing", "ready", "waiting"):
        by_state.add_metric([state], states[state])
    yield by_state
    ready = [m for m in mirrors if m.state == "ready"]
    yield GaugeMetricFamily("discovery_replication_lag_seconds", "How far the furthest behind of this node's ready "
                            "mirrors is, at most (0: all caught up).", value=max((m.lag for m in ready), default=0.0))
    yield GaugeMetricFamily("discovery_replication_behind_bytes", "Bytes this node's VMs wrote that their mirrors "
                            "have not copied yet.", value=sum(m.behind for m in ready))
    yield CounterMetricFamily("discovery_replication_sent_bytes", "Bytes this node's mirrors copied to standby copies "
                              "since the agent started.", value=sum(m.sent for m in mirrors))
