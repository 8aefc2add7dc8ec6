"""What the product's services show Prometheus: DVMS's partitions and migrations, the bytes images moved, and
the HA service's lease and recoveries.

Collectors in the shape of `agents.metrics.collectors` (read at scrape time, `discovery_` names, base units,
`_total` counters, no VE, VM, partition or chunk label), registered by `discovery.agent.install` beside the
services they read.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from discovery.ha.service import HaService
from discovery.scheduler.service import DvmsService
from dvms.monitor import Load
from images.fetching import Fetcher

MIB = 1 << 20
_OUTCOMES = {"migrations": {"done": "migrated", "failed": "migration-failed", "skipped": "migration-skipped"},
             "plans": {"found": "plan", "none": "no-plan"}}
"""Counted DVMS events (`DvmsService.counts`, by kind) as the outcomes of a series."""


class DvmsCollector:
    def __init__(self, dvms: DvmsService) -> None:
        self.dvms = dvms

    def collect(self) -> Iterator[Metric]:
        dvms, counts = self.dvms, self.dvms.counts
        yield CounterMetricFamily("discovery_dvms_problems", "Overloads and underloads of this node that started "
                                  "a partition.", value=counts["problem"])
        yield CounterMetricFamily("discovery_dvms_partitions_created", "Partitions this node created and led.",
                                  value=counts["created"])
        ended = CounterMetricFamily("discovery_dvms_partitions_ended", "Partitions this node led that ended, by "
                                    "reason (solved, starved, merged, apply-timeout).", labels=["reason"])
        for reason, count in sorted(dvms.endings.items()):
            ended.add_metric([reason], count)
        yield ended
        for name, what in (("plans", "Plans its solver sought for a partition this node led, by outcome."),
                           ("migrations", "Migrations of a plan this node applied, by outcome.")):
            family = CounterMetricFamily(f"discovery_dvms_{name}", what, labels=["outcome"])
            for outcome, kind in _OUTCOMES[name].items():
                family.add_metric([outcome], counts[kind])
            yield family
        isp = dvms.isp
        role = GaugeMetricFamily("discovery_dvms_partition", "1 if this node is in a partition, as its leader or "
                                 "a member.", labels=["role"])
        inside = isp is not None and isp.membership is not None
        leads = isp is not None and isp.lead is not None
        role.add_metric(["leader"], inside and leads)
        role.add_metric(["member"], inside and not leads)
        yield role
        load = GaugeMetricFamily("discovery_dvms_load_state", "1 for the state of this node's load as DVMS's "
                                 "monitor last saw it.", labels=["state"])
        for state in Load:
            load.add_metric([state.value], dvms.load.state == state.value)
        yield load
        capacity = dvms.load.cpu_capacity or dvms.cpu_capacity
        yield GaugeMetricFamily("discovery_dvms_cpu_demand_ratio", "The CPU its VMs demand over the CPU DVMS counts "
                                "for this node.", value=dvms.load.cpu / capacity if capacity else 0.0)
        yield GaugeMetricFamily("discovery_dvms_memory_demand_bytes", "The memory its VMs demand.",
                                value=dvms.load.memory_mb * MIB)


class ImagesCollector:
    def __init__(self, fetcher: Fetcher) -> None:
        self.fetcher = fetcher

    def collect(self) -> Iterator[Metric]:
        for what, help_text in (("pulled", "pulled from holders into this node's store"),
                                ("served", "served to nodes pulling them (`image.chunks`)"),
                                ("uploaded", "uploaded to this node by imports (`image.put`)")):
            yield CounterMetricFamily(f"discovery_image_{what}_bytes", f"Bytes of image chunks (zstd frames, as "
                                      f"they travel) {help_text}.", value=self.fetcher.moved[what])


class HaCollector:
    def __init__(self, ha: HaService) -> None:
        self.ha = ha

    def collect(self) -> Iterator[Metric]:
        ha, keeper = self.ha, self.ha.shell.keeper
        yield GaugeMetricFamily("discovery_ha_lease_epoch", "The fencing token of this host's HA lease (raised by "
                                "each revocation).", value=keeper.epoch)
        yield GaugeMetricFamily("discovery_ha_lease_listed_ves", "Protected VEs this host's lease lists.",
                                value=len(keeper.listed))
        yield GaugeMetricFamily("discovery_ha_frozen", "1 while this host's lease has lapsed and its protected VMs "
                                "are paused.", value=keeper.frozen)
        yield GaugeMetricFamily("discovery_ha_fenced_vms", "VMs switched off here for good by a revocation, not "
                                "removed yet.", value=len(ha.fenced))
        yield CounterMetricFamily("discovery_ha_recoveries", "VEs this node recovered elsewhere (as a watcher, or "
                                  "after their guest kept crashing here).", value=ha.recovered)
