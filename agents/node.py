"""The node agent: one per physical node, composing the transport, membership, ring, DHT and host.

Each service (host, gossip, coordinates, ring, repair, spiral, overlays) is an actor under one supervisor.
This module is where they are wired: each receives the few things it uses (the transport, the
membership, a file of the data directory, a function giving free capacity, a coordinate lookup...),
never the agent, so no service imports this module back. Higher layers (the VE service of
`discovery/`) plug in through `extensions`: callables that receive the running agent and register
their own RPC methods and actors, so this module never imports the layer above it.

asyncio is loaded only when the config enables Kademlia (the `kademlia` package is asyncio code, run
under trio-asyncio); otherwise the agent is a plain trio program.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client.process_collector import ProcessCollector

from agents import tasks
from agents.config import AgentConfig
from agents.coordinates import CoordinateService
from agents.eventlog import MEMBER_EVENTS, EventLog
from agents.host.replication import Replication
from agents.host.restarts import GuestRestarts
from agents.host.service import HostService
from agents.hypervisor.actor import DAEMON_CONNECTIONS, Hypervisor, write_node_xml
from agents.hypervisor.events import GuestEvents
from agents.hypervisor.qemu import QemuBackend, open_backend
from agents.messages import (
    AGENT_MEMBERS,
    AGENT_STATUS,
    MEMBER_PING,
    AgentStatus,
    Gossip,
    GossipReply,
    MemberRow,
    ProtocolVersions,
)
from agents.metrics.collectors import (
    AgentCollector,
    HostCollector,
    MembershipCollector,
    RingCollector,
    RpcTimes,
    VivaldiCollector,
)
from agents.metrics.exporter import Exporter
from agents.network.dhcp import DhcpServers
from agents.network.linux import DataPlane
from agents.overlays import OverlayService
from agents.runtime import Actor, Event, Notifier, Supervisor
from agents.spiral import SpiralService
from overlay.chord import Peer, hash_id
from overlay.dht import DHT, Shard
from overlay.membership import Member, Membership
from overlay.messages import NoArgs
from overlay.quorum import PINNED_REPLICAS, FixedSets
from overlay.ring import Ring
from overlay.wire.rpc import Caller, Endpoint, RpcError, Transport, free_ports

if TYPE_CHECKING:
    from overlay.kad import KademliaOverlay

log = logging.getLogger(__name__)


Extension = Callable[["NodeAgent"], Awaitable[None]]


class NodeAgent:
    def __init__(self, config: AgentConfig, extensions: list[Extension] | None = None) -> None:
        self.config = config
        self.extensions = extensions or []
        self.notifier = Notifier()
        self.supervisor = Supervisor()
        self.actors: list[Actor] = []
        self.events = EventLog()
        """The last notable events here (`discovery top`): membership news, and what the layers above note."""
        self.replication: Replication | None = None
        """Disks mirrored to standby copies (real guests only): the HA layer says which."""

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT or cancellation, then leave the cluster politely."""
        cfg = self.config
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        self.backend = await trio.to_thread.run_sync(self._open_qemu) if cfg.hypervisor == "qemu" else None
        try:
            uri = self.backend.uri if self.backend else cfg.libvirt_uri or write_node_xml(
                cfg.data_dir / "node.xml", cfg.capacity.vcpus, cfg.capacity.memory_mb)
            daemon = self.backend is not None and self.backend.migration_uri is not None  # embedded: 1 connection
            self.hypervisor = await Hypervisor.connect(uri, DAEMON_CONNECTIONS if daemon else 1)
            self.shard = await trio.to_thread.run_sync(Shard, cfg.data_dir / "dht.sqlite")
            try:
                async with self._asyncio_loop():
                    await self._serve()
            finally:
                if hasattr(self, "host"):
                    self.host.close()
                self.shard.close()
                await self.hypervisor.close()
        finally:
            if self.backend is not None:
                self.backend.close()

    def _asyncio_loop(self) -> AbstractAsyncContextManager[Any]:
        """The trio-asyncio loop the Kademlia overlay runs in (`overlay.kad`), only if it is enabled: without
        Kademlia nothing imports asyncio."""
        if not self.config.kademlia:
            return contextlib.nullcontext()
        import trio_asyncio

        return trio_asyncio.open_loop()

    def _kademlia(self) -> KademliaOverlay | None:
        cfg = self.config
        if not cfg.kademlia:
            return None
        from overlay.kad import KademliaOverlay  # asyncio code: loaded only when enabled

        local_ms = cfg.site_rtt_ms.get(cfg.site, {}).get(cfg.site, 0.0)  # UDP peers' sites are unknown
        return KademliaOverlay(cfg.identity, delay=local_ms / 2000.0)

    def _open_qemu(self) -> QemuBackend:
        cfg = self.config
        port = cfg.libvirtd_port or free_ports(1)[0]
        low, high = cfg.migration_ports
        if not low:
            low = 49152 + 16 * (port % 1000)
            high = low + 15
        return open_backend(cfg.data_dir, cfg.libvirt_uri, port, (low, high), cfg.host, cfg.migration_uri)

    async def _serve(self) -> None:
        cfg = self.config
        async with Transport(cfg.identity, cfg.name, cfg.site, delay=self._delay, speaks=cfg.protocol) as transport:
            self.transport = transport
            host, _, port = cfg.listen.rpartition(":")
            addr = f"{cfg.host}:{await transport.listen(host, int(port))}"
            self.membership = Membership(cfg.name, addr, cfg.site, cfg.suspect_timeout)
            self.membership.me.incarnation = self._bump_incarnation()
            self.ring = Ring(transport, cfg.name, addr, cfg.site, distance=self._estimated_rtt)
            self.dht = DHT(transport, self.ring, self.shard, r=cfg.replicas,
                           members=lambda: len(self.membership.alive()),
                           fixed=FixedSets(self.membership, PINNED_REPLICAS))
            self.overlays = OverlayService(transport, self.membership, self.dht, self._kademlia(),
                                           (host.strip("[]"), cfg.kad_port), cfg.data_dir / "binding.json")
            self.records = self.overlays.records  # what services read and write, on whichever overlay is bound
            self.host = HostService(transport, self.hypervisor, cfg.capacity, cfg.data_dir / "host.sqlite",
                                    *((self.backend.guests, self.backend.migration_uri) if self.backend else ()))
            if cfg.carries_networks:
                self.host.dataplane = DataPlane(cfg.host.strip("[]"), DhcpServers(cfg.data_dir / "dhcp", cfg.name))
            self.gossip = GossipService(transport, self.membership, self.ring, self.notifier, cfg.join,
                                        cfg.data_dir / "members.json", cfg.probe_interval)
            # every RPC we make is now an RTT sample
            self.coordinates = CoordinateService(transport, self.membership, cfg.data_dir / "coordinate.json")
            self.spiral = SpiralService(transport, self.membership, self.coordinates.coordinate_of, self._free)
            self.notifier.subscribe(self.spiral.tell_nowait, {"member_joined"})
            self.notifier.subscribe(self.overlays.tell_nowait, {"member_joined"})
            self.notifier.subscribe(self.events.on_member, MEMBER_EVENTS)
            ring_service = RingService(transport, self.membership, self.ring, cfg.ring_interval)
            self.notifier.subscribe(ring_service.tell_nowait, {"member_dead", "member_left"})
            self.actors += [self.host, self.gossip, self.coordinates, ring_service,
                            RepairService(self.dht, cfg.repair_interval), self.overlays, self.spiral]
            if self.backend is not None:  # real guests: a crashed one is started again where it ran
                uri = self.backend.uri
                self.actors.append(GuestRestarts(self.host, lambda deliver: GuestEvents.open(uri, deliver)))
                self.replication = Replication(self.host)  # and disks are mirrored to standby copies
                self.actors.append(self.replication)
            transport.route(AGENT_STATUS, self._on_status)
            transport.route(AGENT_MEMBERS, self._on_members)
            metrics = await self._metrics()
            for extension in self.extensions:
                await extension(self)
            try:
                await self.overlays.start_kademlia()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch_signals, nursery.cancel_scope)
                    if metrics:
                        nursery.start_soon(self.exporter.serve, metrics)
                    for actor in self.actors:
                        self.supervisor.start_actor(nursery, actor)
                    await self.gossip.join()
                    (cfg.data_dir / "agent.addr").write_text(addr)
                    log.info("agent %s (site %s) serving on %s, speaking protocol %s", cfg.name, cfg.site, addr,
                             cfg.protocol)
                await self.gossip.leave()
            finally:
                await self.overlays.close()

    async def _metrics(self) -> list[trio.SocketListener]:
        """The collectors of this agent's layers (`agents.metrics`; extensions add theirs to `self.exporter`) and,
        unless agent.toml's `metrics` is empty, the endpoint's listeners, its address in data_dir/metrics.addr."""
        cfg = self.config
        self.exporter = Exporter()
        times = RpcTimes()
        self.transport.on_served = times.observe
        host = HostCollector(self.host, self.host.listing)
        info = {"name": cfg.name, "site": cfg.site, "hypervisor": cfg.hypervisor,
                "protocol": f"{cfg.protocol.oldest}..{cfg.protocol.newest}"}
        rejected = lambda: self.transport.rejected_connections  # noqa: E731 - read at each scrape
        for collector in (times, AgentCollector(info, self.supervisor.restarts, rejected),
                          MembershipCollector(self.membership), RingCollector(self.ring.state, self.dht),
                          VivaldiCollector(self.coordinates.client)):
            self.exporter.register(collector)
        self.exporter.register(host, host.refresh)
        self.exporter.register(ProcessCollector(registry=None))
        if not cfg.metrics:
            return []
        listeners = await self.exporter.listen(cfg.metrics)
        (cfg.data_dir / "metrics.addr").write_text(self.exporter.address)
        log.info("metrics on http://%s/metrics", self.exporter.address)
        return listeners

    def _free(self) -> dict[str, int]:
        """This node's free capacity now (what spiral steps report)."""
        return self.host.ledger.free(trio.current_time()).to_wire()

    def _estimated_rtt(self, peer: Peer) -> float | None:
        """Vivaldi's estimate of the RTT to a ring peer, for proximity fingers."""
        member = self.membership.members.get(peer.name)
        return self.coordinates.estimate_to(member) if member is not None else None

    def _delay(self, site: str, peer_site: str) -> float:
        """One-way emulated latency: half the configured RTT between the two sites (or inside one site,
        when the matrix gives a site a latency to itself)."""
        return self.config.site_rtt_ms.get(site, {}).get(peer_site, 0.0) / 2000.0

    def _bump_incarnation(self) -> int:
        """A restarted agent must out-rank the rumours of its death, so incarnations never go back."""
        path = self.config.data_dir / "incarnation"
        value = int(path.read_text()) + 1 if path.exists() else 0
        path.write_text(str(value))
        return value

    async def _watch_signals(self, scope: trio.CancelScope) -> None:
        """SIGTERM or SIGINT: leave; SIGUSR1: log what every task awaits (`agents.tasks`)."""
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGUSR1) as signals:
            async for signum in signals:
                if signum == signal.SIGUSR1:
                    log.warning("tasks on SIGUSR1:\n%s", tasks.dump())
                    continue
                log.info("received %s: leaving", signal.Signals(signum).name)
                scope.cancel()
                return

    async def _on_status(self, caller: Caller, request: NoArgs) -> AgentStatus:
        state = self.ring.state
        return AgentStatus(self.config.name, self.config.site, self.membership.me.addr,
                           [p.name for p in state.successor_list()],
                           state.predecessor.name if state.predecessor else None, len(self.shard.records),
                           dict(self.dht.stats), self.records.name, dict(self.supervisor.restarts),
                           self.hypervisor.uri, self.backend.reason if self.backend else "test driver",
                           self.transport.rejected_connections, self._protocol(caller))

    def _protocol(self, caller: Caller) -> ProtocolVersions | None:
        """The versions spoken, for a caller whose version knows the field (an older one would refuse it)."""
        if caller.version < ProtocolVersions.SINCE:
            return None
        spoken = self.transport.versions
        return ProtocolVersions(spoken.oldest, spoken.newest, self.transport.peer_versions())

    async def _on_members(self, caller: Caller, request: NoArgs) -> list[MemberRow]:
        return [MemberRow(**m.to_wire(), rtt_ms=round(m.rtt * 1000, 3) if m.rtt is not None else None)
                for m in sorted(self.membership.members.values(), key=lambda m: m.name)]


class GossipService(Actor):
    """SWIM rounds: probe one member per tick with piggybacked updates, expire suspects, retry seeds.

    Joins, seeds and one round every `sync_period` seconds push-pull full tables instead
    (`overlay.membership` explains why); a ping that carries a table, as older agents send, is
    merged and answered with ours.
    """

    name = "gossip"
    sync_period = 30.0  # seconds between full-state push-pulls, as memberlist does

    def __init__(self, transport: Endpoint, membership: Membership, ring: Ring, notifier: Notifier, seeds: list[str],
                 path: Path, interval: float) -> None:
        super().__init__()
        self.transport = transport
        self.membership = membership
        self.ring = ring
        self.notifier = notifier
        self.seeds = seeds
        self.path = path
        """Where the live members' addresses are kept: the seeds after a restart."""
        self.tick_interval = interval
        self.membership.sync_every = max(1, round(self.sync_period / self.tick_interval))
        self._remembered: list[tuple[str, str, str]] = []
        transport.route(MEMBER_PING, self._on_ping)

    async def join(self) -> None:
        await self._contact_seeds()
        await self.ring.join([m.addr for m in self.membership.alive(include_me=False)] or self._seeds())

    async def tick(self) -> None:
        target, full = self.membership.next_round()
        if target is not None:
            await self._probe(target.addr, target.name, full)
        await self._contact_seeds()
        self._publish(self.membership.expire(trio.current_time()))
        self._remember_members()

    async def leave(self) -> None:
        """Tell a few members we are leaving so they do not wait for a timeout to notice."""
        self.membership.leave()
        with trio.move_on_after(2):
            others = [m.addr for m in self.membership.alive(include_me=False)][:3]
            await self.transport.ask_many(others, MEMBER_PING, Gossip(**self.membership.message()), 1.0)

    def _seeds(self) -> list[str]:
        seeds = [a for a in self.seeds if a != self.membership.me.addr]
        return seeds + [m.addr for m in self._remembered_members() if m.addr not in seeds]

    async def _contact_seeds(self) -> None:
        """Probe every seed that is not a live member (Consul's retry-join).

        Stopping at the first seed that answers would let nodes started at the same moment form
        separate islands; asking all of them merges the islands through the seeds' tables, which
        is why these probes push-pull full tables.
        """
        known = {m.addr for m in self.membership.alive()}
        for seed in self._seeds():
            if seed not in known:
                await self._probe(seed, full=True)

    async def _probe(self, addr: str, name: str | None = None, full: bool = False) -> bool:
        try:
            reply = await self.transport.ask(addr, MEMBER_PING, Gossip(**self.membership.message(full)),
                                             timeout=max(0.5, self.tick_interval * 2))
        except RpcError as err:
            log.debug("probe of %s failed: %s", name or addr, err)
            if name is not None:
                self._publish(self.membership.on_probe_failed(name, trio.current_time()))
            return False
        self._publish(self.membership.receive(reply.probe(), trio.current_time()))
        return True

    async def _on_ping(self, caller: Caller, request: Gossip) -> GossipReply:
        reply, events = self.membership.answer(request.probe(), trio.current_time())
        self._publish(events)
        return GossipReply(**reply)

    def _publish(self, events: list[tuple[str, Member]]) -> None:
        for kind, member in events:
            log.info("%s: %s (%s)", kind, member.name, member.addr)
            self.notifier.publish(kind, name=member.name, addr=member.addr, site=member.site)

    def _remember_members(self) -> None:
        """Persist the live members' addresses (seeds after a restart), only when they change."""
        table = sorted((m.name, m.addr, m.site) for m in self.membership.alive(include_me=False))
        if table != self._remembered:
            entries = [{"name": n, "addr": a, "site": s} for n, a, s in table]
            self.path.write_text(json.dumps(entries))
            self._remembered = table

    def _remembered_members(self) -> list[Member]:
        """The live members last written down: this run's, once it knows some (the file holds them too, and
        reading it twice a second costs an idle agent more than its probe), else those a previous run left."""
        if self._remembered:
            return [Member(n, a, s) for n, a, s in self._remembered]
        try:
            return [Member(e["name"], e["addr"], e["site"]) for e in json.loads(self.path.read_text())]
        except (OSError, ValueError, KeyError, TypeError):
            return []


class RingService(Actor):
    """Chord maintenance each tick; membership news arrives in the mailbox.

    A dead or departed member leaves the ring at once instead of at its next timeout, and every live
    member is offered to the ring as a successor hint, which merges rings that formed apart.

    Stabilization runs every tick; fixing a finger too, until the ring around this node has settled (its
    successors and predecessor the same for `QUIET_TICKS` ticks): then one every `QUIET_EVERY` ticks, and the
    first change there (or a member's death or departure) brings back one per tick. Whether a fix changed its
    finger tells nothing: with latency estimates, fingers swap between nodes of one site as the estimates
    move. Fingers only shorten lookups: a dead one is dropped by the lookup that meets it, and routing falls
    back on the successors, so the ring's repair does not wait for them.
    """

    name = "ring"
    QUIET_TICKS = 16
    QUIET_EVERY = 8

    def __init__(self, transport: Endpoint, membership: Membership, ring: Ring, interval: float) -> None:
        super().__init__()
        self.transport = transport
        self.membership = membership
        self.ring = ring
        self.tick_interval = interval
        self._quiet = 0
        """Ticks in a row that left the successors and the predecessor as they were."""
        self._ticks = 0

    async def handle(self, event: Event) -> None:
        for peer in self.ring.state.known_peers():
            if peer.name == event.data["name"]:
                self.ring.state.on_dead(peer)
        self._quiet = 0
        await self.transport.forget(event.data["addr"])

    async def tick(self) -> None:
        state = self.ring.state
        before = (state.successor_list(), state.predecessor)
        for member in self.membership.alive(include_me=False):
            state.consider(Peer(hash_id(member.name), member.name, member.addr, member.site))
        self._ticks += 1
        await self.ring.maintain(fingers=self._quiet < self.QUIET_TICKS or self._ticks % self.QUIET_EVERY == 0)
        self._quiet = self._quiet + 1 if (state.successor_list(), state.predecessor) == before else 0


class RepairService(Actor):
    """Anti-entropy for the DHT shard: compare digests with the other replicas and exchange only what
    differs; hand off records this node no longer replicates (`overlay.dht`)."""

    name = "repair"

    def __init__(self, dht: DHT, interval: float) -> None:
        super().__init__()
        self.dht = dht
        self.tick_interval = interval

    async def tick(self) -> None:
        await self.dht.maintain()
