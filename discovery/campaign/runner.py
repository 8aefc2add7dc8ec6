"""Carry out a campaign on a target and write down what happened: every operation with its latency and outcome,
every action, and the cluster sampled every `sample_every` seconds (each VE's placement and state from the
directory, each node's /metrics). `discovery.campaign.report` turns that record into figures.

Operations go through the live nodes in turn (a user may use any node), or through the workload's `via` node
while it is up, never through a node this campaign killed or cut off; a failure is recorded as it happened
(its one-line error), never retried behind the record's back. Each step starts at its time whatever the ones
before it are doing (they run concurrently), so a slow create does not shift the schedule. Once `duration` has
passed, operations still in flight get GRACE seconds to end and are then recorded unfinished.

With the workload's `web_port`, a `load` is a request to each guest's web server through its host's port (a
guest still booting is waited for, up to LOAD_WAIT seconds), and each sample also records what each guest
answers there (`web`: the first line of its page, None if nothing): the service as its clients see it, beside
the directory's view (and which guest it is: the tiny guest's page names its address).
"""

from __future__ import annotations

import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import trio
from prometheus_client.parser import text_string_to_metric_families

from discovery.campaign.plan import Action, Campaign, Step, timeline, ve_name, ve_spec, vm_name, web_port
from discovery.campaign.targets import Node, Target, TargetError
from overlay.wire.rpc import RpcError, Transport, split_addr

log = logging.getLogger(__name__)
GRACE = 60.0
CALL_TIMEOUT = 60.0
SAMPLE_TIMEOUT = 5.0
LOAD_WAIT = 30.0
WEB_TIMEOUT = 2.0
KEPT_SERIES = ("discovery_vms", "discovery_dvms_", "discovery_members", "discovery_ha_lease",
               "discovery_image_pulled")
"""The /metrics series a sample keeps (by name prefix): VMs by state, DVMS's view, membership, HA leases, image
bytes pulled."""


class Runner:
    """One run of `campaign` on `target` (module docstring); `run` returns the raw record."""

    def __init__(self, campaign: Campaign, target: Target, progress: Callable[[str], None] = log.info) -> None:
        self.campaign, self.target, self.progress = campaign, target, progress
        self.killed: set[str] = set()
        self.cut: set[str] = set()
        """Nodes this campaign killed (until started) or cut off (until healed): not called meanwhile."""
        self.turn = 0
        self.operations: list[dict[str, Any]] = []
        self.actions: list[dict[str, Any]] = []
        self.samples: list[dict[str, Any]] = []
        self.start = 0.0
        count = campaign.create.count if campaign.create else 0
        self.indexes = {ve_name(campaign, i): i for i in range(count)}
        """The workload's VE names and their numbers."""

    async def run(self) -> dict[str, Any]:
        self.start = trio.current_time()
        began = time.time()
        async with Transport(self.target.identity, node="campaign") as transport:
            self.transport = transport
            async with trio.open_nursery() as outer:
                outer.start_soon(self._sample_until, self.start + self.campaign.duration)
                with trio.move_on_after(self.campaign.duration + GRACE):
                    async with trio.open_nursery() as steps:
                        for step in timeline(self.campaign):
                            await trio.sleep_until(self.start + step.at)
                            steps.start_soon(self._step, step)
        return {"campaign": asdict(self.campaign), "started": began, "nodes": [asdict(n) for n in self.target.nodes],
                "operations": sorted(self.operations, key=lambda o: o["at"]), "actions": self.actions,
                "samples": self.samples}

    def now(self) -> float:
        return trio.current_time() - self.start

    def live(self) -> list[Node]:
        """The nodes this campaign did not take down (killed and not started, or cut off and not healed)."""
        return [n for n in self.target.nodes if n.name not in self.killed | self.cut]

    def via(self, workload: bool = False) -> Node:
        """The next node to call, in turn among those this campaign did not take down; for the `workload`'s
        operations, its `via` node while it is up."""
        live = self.live() or self.target.nodes
        chosen = self.campaign.create.via if workload and self.campaign.create else ""
        for node in live:
            if node.name == chosen:
                return node
        self.turn += 1
        return live[self.turn % len(live)]

    async def _step(self, step: Step) -> None:
        if step.action is not None:
            await self._act(step.action)
            return
        name = ve_name(self.campaign, step.index)
        args = {"spec": ve_spec(self.campaign, step.index)} if step.kind == "create" else {"name": name}
        await self._operation(step.kind, name, f"ve.{step.kind}", args)

    async def _operation(self, op: str, ve: str, method: str, args: dict[str, Any]) -> None:
        node, at = self.via(workload=True), self.now()
        entry: dict[str, Any] = {"op": op, "ve": ve, "via": node.name, "at": round(at, 3), "seconds": None,
                                 "ok": False, "error": "unfinished"}
        self.operations.append(entry)
        try:
            await self.transport.call(node.addr, method, args, timeout=CALL_TIMEOUT)
        except (RpcError, OSError) as err:
            entry.update(seconds=round(self.now() - at, 3), error=str(err).splitlines()[0][:300])
        else:
            entry.update(seconds=round(self.now() - at, 3), ok=True, error=None)

    async def _act(self, action: Action) -> None:
        at = self.now()
        entry = {**asdict(action), "started": round(at, 3), "ok": True, "error": None}
        self.progress(f"{at:6.1f} s  {action.kind} {action.target or action.cpu or ''}".rstrip())
        try:
            if action.kind in ("kill", "poweroff"):
                self.killed.add(action.target)
                fault = self.target.kill if action.kind == "kill" else self.target.poweroff
                await trio.to_thread.run_sync(fault, action.target)
            elif action.kind == "start":
                await trio.to_thread.run_sync(self.target.start, action.target)
                self.killed.discard(action.target)
            elif action.kind == "partition":
                self.cut |= {n.name for n in self.target.nodes if action.target in (n.name, n.site)}
                await trio.to_thread.run_sync(self.target.partition, action.target)
            elif action.kind == "heal":
                await trio.to_thread.run_sync(self.target.heal)
                self.cut.clear()
            elif action.kind == "capacity":
                await self._each_live("dvms.load", {"cpu_capacity": action.cpu})
            elif action.kind == "load":
                await self._load(action)
        except (TargetError, RpcError, OSError, ValueError) as err:
            entry.update(ok=False, error=str(err).splitlines()[0][:300])
        entry["ended"] = round(self.now(), 3)
        self.actions.append(entry)

    async def _each_live(self, method: str, args: dict[str, Any]) -> None:
        live = [n.addr for n in self.live()]
        answers = await self.transport.call_many(live, method, args, SAMPLE_TIMEOUT)
        failed = [str(a) for a in answers.values() if isinstance(a, BaseException)]
        if failed:
            raise ValueError(f"{len(failed)} of {len(live)} nodes refused: {failed[0]}")

    async def _load(self, action: Action) -> None:
        """Give the first `action.vms` VMs of the workload a CPU demand of `action.cpu`, where each runs now:
        burned by the guest (`web_port`), else pinned through `dvms.load`; none if fewer are placed yet."""
        chosen = self._workload_vms(await self._listing())[:action.vms]
        if len(chosen) < action.vms:
            raise ValueError(f"only {len(chosen)} of the workload's VMs are placed, not {action.vms}: no load given")
        if self.campaign.create is not None and self.campaign.create.web_port is not None:
            refused: list[str] = []
            async with trio.open_nursery() as nursery:
                for _, _, url, _ in chosen:
                    nursery.start_soon(self._burn, f"{url}cgi-bin/load?cpu={action.cpu}", refused)
            if refused:
                raise ValueError(f"{len(refused)} of {len(chosen)} guests refused: {refused[0]}")
            return
        for ve, vm, _, agent in chosen:
            await self.transport.call(agent, "dvms.load", {"vm": f"{ve}:{vm}", "cpu": action.cpu},
                                      timeout=SAMPLE_TIMEOUT)

    @staticmethod
    async def _burn(url: str, refused: list[str]) -> None:
        """Ask a guest to burn (`url`), waiting up to LOAD_WAIT for one still booting; why not, added to
        `refused` (not raised: a sibling's error must not cancel the others)."""
        with trio.move_on_after(LOAD_WAIT):
            while True:
                try:
                    await trio.to_thread.run_sync(_fetch, url, WEB_TIMEOUT, abandon_on_cancel=True)
                    return
                except urllib.error.HTTPError as err:  # a guest that answers, but not as the tiny guest does
                    refused.append(f"{url}: {err.code} {err.reason}")
                    return
                except OSError:
                    await trio.sleep(1)
        refused.append(f"{url}: no answer within {LOAD_WAIT:g} s")

    def _workload_vms(self, listing: list[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
        """The workload's VMs placed in `listing` (`_listing`), in workload order: (VE, VM, its web server's URL
        on its host or '', its host's RPC address)."""
        create = self.campaign.create
        if create is None:
            return []
        indexes = self.indexes
        found = []
        for ve in sorted((ve for ve in listing if ve["name"] in indexes),
                         key=lambda ve: indexes[ve["name"]]):
            for vm in range(create.vms):
                slot = ve["placement"].get(vm_name(vm))
                if slot is None:
                    continue
                url = (f"http://{split_addr(slot['addr'])[0]}:{web_port(create, indexes[ve['name']], vm)}/"
                       if create.web_port is not None else "")
                found.append((ve["name"], vm_name(vm), url, slot["addr"]))
        return found

    async def _listing(self) -> list[dict[str, Any]]:
        """Every VE of the directory (as `ve list` shows them), read through a live node."""
        ves: list[dict[str, Any]] = []
        cursor = None
        node = self.via()
        while True:
            page = await self.transport.call(node.addr, "ve.list", {"limit": 100, "cursor": cursor},
                                             timeout=SAMPLE_TIMEOUT)
            ves += page["ves"]
            cursor = page["next_cursor"]
            if cursor is None:
                return sorted(ves, key=lambda ve: ve["name"])

    async def _sample_until(self, end: float) -> None:
        while trio.current_time() <= end:
            due = trio.current_time() + self.campaign.sample_every
            await self._sample()
            await trio.sleep_until(due)

    async def _sample(self) -> None:
        at = self.now()
        sample: dict[str, Any] = {"at": round(at, 3), "ves": None, "error": None, "metrics": {}}
        listing: list[dict[str, Any]] = []
        try:
            listing = await self._listing()
        except (RpcError, OSError) as err:
            sample["error"] = str(err).splitlines()[0][:300]
        else:
            sample["ves"] = [{"name": ve["name"], "state": ve["state"],
                              "vms": {vm: {"node": slot["node"], "busy": any(slot.get(k) for k in (
                                  "moving_to", "failing_over", "rebuilding"))} for vm, slot in ve["placement"].items()}}
                             for ve in listing]
        web = {f"{ve}/{vm}": url for ve, vm, url, _ in self._workload_vms(listing) if url}
        if web:
            sample["web"] = {}
        async with trio.open_nursery() as nursery:
            for node in self.target.nodes:
                if node.metrics:
                    nursery.start_soon(self._scrape, node, sample["metrics"])
            for vm, url in web.items():
                nursery.start_soon(self._probe, vm, url, sample["web"])
        self.samples.append(sample)

    @staticmethod
    async def _probe(vm: str, url: str, into: dict[str, str | None]) -> None:
        """The first line of what the guest's web server answers on its host's port (at most 200 characters),
        or None if it does not within WEB_TIMEOUT."""
        try:
            page = await trio.to_thread.run_sync(_fetch, url, WEB_TIMEOUT, abandon_on_cancel=True)
        except OSError:
            into[vm] = None
        else:
            into[vm] = (page.splitlines() or [""])[0][:200]

    async def _scrape(self, node: Node, into: dict[str, Any]) -> None:
        """The node's kept series (KEPT_SERIES) as {series{labels}: value}; None if it did not answer."""
        try:
            text = await trio.to_thread.run_sync(_fetch, f"http://{node.metrics}/metrics", abandon_on_cancel=True)
        except OSError:
            into[node.name] = None
            return
        into[node.name] = {_series(sample.name, sample.labels): sample.value
                           for family in text_string_to_metric_families(text) for sample in family.samples
                           if sample.name.startswith(KEPT_SERIES)}


def _fetch(url: str, timeout: float = SAMPLE_TIMEOUT) -> str:
    """The body `url` answers with; bytes that are not UTF-8 replaced (a guest's page is whatever it serves, and
    a decoding error raised in a nursery's task would end the run)."""
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        return answer.read().decode(errors="replace")


def _series(name: str, labels: dict[str, str]) -> str:
    shown = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{name}{{{shown}}}" if shown else name
