"""The node agent: one per physical node, composing the transport, membership, ring, DHT and host.

Services run under one supervisor. Higher layers (the VE service of `discovery/`) plug in through
`extensions`: callables that receive the running agent and register their own RPC methods and
services, so this module never imports the product layer above it.
"""

from __future__ import annotations

import json
import logging
import random
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from agents.capacity import Resources
from agents.host import HostService
from agents.hypervisor import Hypervisor, write_node_xml
from agents.runtime import Notifier, Supervisor
from overlay import tls
from overlay.chord import Peer, hash_id
from overlay.dht import DHT, Shard
from overlay.membership import Member, Membership
from overlay.ring import Ring
from overlay.rpc import Caller, RpcError, Transport

log = logging.getLogger(__name__)


@dataclass
class AgentConfig:
    name: str
    site: str
    listen: str  # host:port; port 0 picks a free one
    data_dir: Path
    identity: tls.Identity
    capacity: Resources
    join: list[str] = field(default_factory=list)
    libvirt_uri: str = ""  # empty: the embedded test:/// host sized by `capacity`
    site_rtt_ms: dict[str, dict[str, float]] = field(default_factory=dict)  # emulated WAN latency
    replicas: int = 3
    probe_interval: float = 0.5
    suspect_timeout: float = 3.0
    ring_interval: float = 0.5
    repair_interval: float = 5.0


Extension = Callable[["NodeAgent"], Awaitable[None]]


class NodeAgent:
    def __init__(self, config: AgentConfig, extensions: list[Extension] | None = None) -> None:
        self.config = config
        self.extensions = extensions or []
        self.notifier = Notifier()
        self.supervisor = Supervisor()
        self.started = trio.Event()

    # -- composition -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT or cancellation, then leave the cluster politely."""
        cfg = self.config
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        uri = cfg.libvirt_uri or write_node_xml(cfg.data_dir / "node.xml", cfg.capacity.vcpus,
                                                cfg.capacity.memory_mb)
        self.hypervisor = Hypervisor.open(uri)
        self.shard = Shard(cfg.data_dir / "dht.sqlite")
        try:
            async with Transport(cfg.identity, cfg.name, cfg.site, delay=self._delay) as transport:
                self.transport = transport
                host, _, port = cfg.listen.rpartition(":")
                addr = f"{host}:{await transport.listen(host, int(port))}"
                self.membership = Membership(cfg.name, addr, cfg.site, cfg.suspect_timeout)
                self.membership.me.incarnation = self._bump_incarnation()
                self.ring = Ring(transport, cfg.name, addr, cfg.site)
                self.dht = DHT(transport, self.ring, self.shard, self.live_addrs, r=cfg.replicas)
                self.host = HostService(transport, self.hypervisor, cfg.capacity, cfg.data_dir / "host.sqlite")
                recovered = await self.host.recover()
                transport.route("member.ping", self._on_ping)
                transport.route("agent.status", self._on_status)
                transport.route("agent.members", self._on_members)
                for extension in self.extensions:
                    await extension(self)
                (cfg.data_dir / "agent.addr").write_text(addr)
                log.info("agent %s (site %s) listening on %s; %d VMs recovered", cfg.name, cfg.site, addr,
                         recovered)
                async with trio.open_nursery() as nursery:
                    self.nursery = nursery
                    nursery.start_soon(self._watch_signals, nursery.cancel_scope)
                    await self._join()
                    for name, loop in (("gossip", self._gossip_loop), ("ring", self._ring_loop),
                                       ("repair", self._repair_loop), ("events", self._event_loop)):
                        nursery.start_soon(self.supervisor.supervise, name, loop)
                    self.started.set()
                await self._leave()
        finally:
            self.host.close() if hasattr(self, "host") else None
            self.shard.close()
            await self.hypervisor.close()

    def live_addrs(self) -> list[str]:
        return [m.addr for m in self.membership.alive()]

    def _delay(self, site: str, peer_site: str) -> float:
        """One-way emulated latency: half the configured RTT between the two sites."""
        if site == peer_site:
            return 0.0
        return self.config.site_rtt_ms.get(site, {}).get(peer_site, 0.0) / 2000.0

    def _bump_incarnation(self) -> int:
        """A restarted agent must out-rank the rumours of its death, so incarnations never go back."""
        path = self.config.data_dir / "incarnation"
        value = int(path.read_text()) + 1 if path.exists() else 0
        path.write_text(str(value))
        return value

    async def _watch_signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("received %s: leaving", signal.Signals(signum).name)
                scope.cancel()
                return

    # -- membership --------------------------------------------------------------------------------

    async def _join(self) -> None:
        await self._contact_seeds()
        await self.ring.join([m.addr for m in self.membership.alive(include_me=False)] or self._seeds())

    def _seeds(self) -> list[str]:
        seeds = [a for a in self.config.join if a != self.membership.me.addr]
        return seeds + [m.addr for m in self._remembered_members() if m.addr not in seeds]

    async def _contact_seeds(self) -> None:
        """Probe every seed that is not a live member (Consul's retry-join).

        Stopping at the first seed that answers would let nodes started at the same moment form
        separate islands; asking all of them merges the islands through the seeds' tables.
        """
        known = {m.addr for m in self.membership.alive()}
        for seed in self._seeds():
            if seed not in known:
                await self._probe(seed)

    async def _probe(self, addr: str, name: str | None = None) -> bool:
        start = trio.current_time()
        try:
            reply = await self.transport.call(addr, "member.ping", {"members": self.membership.table()},
                                              timeout=max(0.5, self.config.probe_interval * 2))
        except RpcError as err:
            log.debug("probe of %s failed: %s", name or addr, err)
            if name is not None:
                self._publish(self.membership.on_probe_failed(name, trio.current_time()))
            return False
        self._publish(self.membership.merge(reply.get("members") if isinstance(reply, dict) else None,
                                            trio.current_time()))
        if isinstance(reply, dict) and isinstance(reply.get("name"), str):
            self.membership.on_probe_ok(reply["name"], trio.current_time() - start)
        return True

    async def _on_ping(self, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        self._publish(self.membership.merge(args.get("members"), trio.current_time()))
        return {"name": self.config.name, "members": self.membership.table()}

    async def _gossip_loop(self) -> None:
        while True:
            target = self.membership.probe_target()
            if target is not None:
                await self._probe(target.addr, target.name)
            await self._contact_seeds()
            self._publish(self.membership.expire(trio.current_time()))
            self._remember_members()
            await trio.sleep(self.config.probe_interval * random.uniform(0.8, 1.2))

    def _publish(self, events: list[tuple[str, Member]]) -> None:
        for kind, member in events:
            log.info("%s: %s (%s)", kind, member.name, member.addr)
            self.notifier.publish(kind, name=member.name, addr=member.addr, site=member.site)

    async def _event_loop(self) -> None:
        """React to membership news: a dead member leaves the ring at once instead of at the next timeout."""
        events = self.notifier.subscribe({"member_dead", "member_left"})
        async for event in events:
            for peer in self.ring.state.known_peers():
                if peer.name == event.data["name"]:
                    self.ring.state.on_dead(peer)
            await self.transport.forget(event.data["addr"])

    def _remember_members(self) -> None:
        table = [m.to_wire() for m in self.membership.alive(include_me=False)]
        (self.config.data_dir / "members.json").write_text(json.dumps(table))

    def _remembered_members(self) -> list[Member]:
        path = self.config.data_dir / "members.json"
        try:
            return [Member(e["name"], e["addr"], e["site"]) for e in json.loads(path.read_text())]
        except (OSError, ValueError, KeyError, TypeError):
            return []

    async def _leave(self) -> None:
        """Tell a few members we are leaving so they do not wait for a timeout to notice."""
        self.membership.leave()
        with trio.move_on_after(2):
            others = [m.addr for m in self.membership.alive(include_me=False)][:3]
            await self.transport.call_many(others, "member.ping", {"members": self.membership.table()}, 1.0)

    # -- ring and records --------------------------------------------------------------------------

    async def _ring_loop(self) -> None:
        while True:
            for member in self.membership.alive(include_me=False):
                self.ring.state.consider(Peer(hash_id(member.name), member.name, member.addr, member.site))
            await self.ring.stabilize()
            await self.ring.check_predecessor()
            await self.ring.fix_finger()
            self.host.expire()
            await trio.sleep(self.config.ring_interval)

    async def _repair_loop(self) -> None:
        while True:
            await trio.sleep(self.config.repair_interval)
            await self.dht.maintain()

    # -- introspection -----------------------------------------------------------------------------

    async def _on_status(self, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        state = self.ring.state
        return {"name": self.config.name, "site": self.config.site, "addr": self.membership.me.addr,
                "successors": [p.name for p in state.successor_list()],
                "predecessor": state.predecessor.name if state.predecessor else None,
                "records": len(self.shard.records), "restarts": dict(self.supervisor.restarts),
                "rejected_connections": self.transport.rejected_connections}

    async def _on_members(self, caller: Caller, args: dict[str, Any]) -> list[dict[str, Any]]:
        return [{**m.to_wire(), "rtt_ms": round(m.rtt * 1000, 3) if m.rtt is not None else None}
                for m in sorted(self.membership.members.values(), key=lambda m: m.name)]
