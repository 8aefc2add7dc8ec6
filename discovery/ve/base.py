"""What every `ve.*` operation shares: reading a VE's record under its lock, talking to its VMs' hosts,
and finding the nodes a VM may go to.

`discovery.ve.service.VEService` is assembled from one class per concern, each a subclass of `VEBase`:
creation, listing and lifecycle in `discovery.ve.service`, moves in `discovery.ve.relocation`, snapshots in
`discovery.ve.snapshots`, standby copies and failover in `discovery.ve.replicas`, rebuilds in
`discovery.ve.rebuilds`. They share the narrow
interfaces the agent is wired with (`VEBase.__init__`, wired in `discovery.agent`), the per-VE locks and
the helpers below, and nothing else, so each module reads on its own. None of them sees the agent.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Protocol

import trio

from agents.eventlog import EventLog
from agents.host.capacity import Ledger
from agents.runtime import Actor
from agents.spiral import Predicate, SpiralResult
from discovery.ve.directory import Directory, Stored
from discovery.ve.index import Unindexing
from discovery.ve.records import Place, Standby, VERecord, domain_name
from discovery.ve.shipped_log import ShippedLogs
from discovery.ve.spec import DEFAULT_IMAGE, VESpec, VMSpec
from discovery.ve.transaction import Candidate
from discovery.ve.vnis import Vnis
from images.messages import ImageEntry, tagged
from overlay.membership import ALIVE, SUSPECT, Member, Membership
from overlay.wire.rpc import Caller, Conflict, Endpoint, Forbidden, NotFound, RemoteError, RequestError, RpcError
from vivaldi.coordinate import Coordinate

log = logging.getLogger(__name__)
HOST_TIMEOUT = 40.0  # a graceful stop may take the hypervisor's shutdown timeout
FORWARD_TIMEOUT = 2.0
"""Seconds a host has to take note that a VE's VMs moved (`VEBase._moved`)."""
PREPARE_LIMIT = 60.0
"""A coordinator gives up (and rolls back) a VM move whose preparation (reserve, export, import) takes longer."""
MOVE_LEASE = 2 * PREPARE_LIMIT
"""An intent this old whose coordinator cannot be asked may be finished or undone by any agent."""
PULL_TIMEOUT = 3600.0
"""Bringing a whole image onto a node (`image.pull`)."""
DOWN_PROBE_TIMEOUT = 5.0
"""How long a failover or a rebuild waits for a VM's host to answer before taking it for down."""
PAUSE_ENV = "DISCOVERY_TEST_PAUSE"
"""Test-only fault hook, `<point>:<seconds>[,...]`: the coordinator sleeps at those points (`pause_for_test`)."""


class Finder(Protocol):
    """The nearest live nodes that satisfy a predicate (`agents.spiral.SpiralService`)."""

    async def search(self, count: int, predicate: Predicate | None = None, n: int | None = None) -> SpiralResult: ...


class Distances(Protocol):
    """Network coordinates (`agents.coordinates.CoordinateService`)."""

    def coordinate_of(self, member: Member) -> Coordinate | None: ...

    def estimate_to(self, member: Member) -> float | None: ...


class LocalHost(Protocol):
    """This node's host service as the VE layer reads it (`agents.host.service.HostService`): its ledger (the
    room it has free, and what it holds room for), the VMs it holds off (since its start, or frozen), and
    whether one may run there now (`discovery.ha.service`)."""

    @property
    def ledger(self) -> Ledger: ...

    @property
    def held(self) -> Mapping[str, str]: ...

    def may_run(self, name: str) -> bool: ...


class Images(Protocol):
    """The images as the VE layer uses them (`images.service.ImageService`): the catalogue's entries, and the
    shipped snapshots' upkeep (`discovery.ve.shipping`)."""

    async def get(self, name: str) -> ImageEntry | None: ...

    async def remove(self, name: str) -> ImageEntry: ...

    async def replicate(self, name: str, copies: int) -> ImageEntry: ...


class VEBase:
    """The interfaces, state and helpers the VE operations share; `VEService` combines the operations.

    What it is given, and nothing else: `node`, this agent's name; `joins`, whether it joins a cluster (its
    records are elsewhere until it has); the `directory` of VE records; the `transport` that calls hosts and
    agents and serves `ve.*`; the `membership` view; the spiral search (`nearest`); the network coordinates
    (`distances`); this node's `host`; the images (`images`); the shipped-snapshot logs (`shipped`); the node's
    `events`, where it notes the VEs it created or destroyed and the VMs it moved, failed over or rebuilt."""

    def __init__(self, *, node: str, joins: bool, directory: Directory, transport: Endpoint, membership: Membership,
                 nearest: Finder, distances: Distances, host: LocalHost, images: Images, shipped: ShippedLogs,
                 events: EventLog) -> None:
        self.node, self.joins, self.directory, self.transport = node, joins, directory, transport
        self.membership, self.nearest, self.distances, self.host = membership, nearest, distances, host
        self.images, self.shipped, self.events = images, shipped, events
        self._locks: dict[str, trio.Lock] = {}
        self.unindexing = Unindexing(directory.index)
        """Removes destroyed VEs' index entries after the answer (an actor, for the agent to run)."""
        self.vnis = Vnis(directory)
        """The VXLAN identifiers of the VEs' networks, claimed at create and released at destroy."""
        self.forwarding: Actor | None = None
        """This host's forwarding entries (`discovery.ve.forwarding`), where it carries VE networks: wired later."""

    def joined(self) -> bool:
        """Whether the records may be found from here: this agent joins nobody, or it has joined (another
        member is live); background passes wait for it."""
        return not self.joins or len(self.membership.alive()) >= 2

    async def _moved(self, ve: VERecord) -> None:
        """Tell every host of VE `ve`'s networks that its VMs moved, so that their forwarding entries follow at
        once (a live relocation loses connectivity for as long as they lag). Best effort: each host's own
        pass catches up within FORWARD_EVERY seconds anyway."""
        if ve.nics:
            addrs = sorted({slot.addr for slot in ve.placement.values()})
            await self.transport.call_many(addrs, "ve.forward", {"name": ve.name}, FORWARD_TIMEOUT)

    def _lock(self, name: str) -> trio.Lock:
        """The VE's lock on this agent: every operation that changes the VE holds it."""
        return self._locks.setdefault(name, trio.Lock())

    @contextlib.asynccontextmanager
    async def _locked(self, caller: Caller, name: str, settle: bool = True) -> AsyncIterator[Stored]:
        """VE `name`'s record for an operation that changes it: read under the VE's lock (one read: the
        lock is named by the request, and a refused caller only waited its turn), and with what
        interrupted operations left in it settled (`_settle`)."""
        async with self._lock(name):
            record = await self._record(caller, name)
            if settle:
                record = await self._settle(record)
            yield record

    async def _settle(self, record: Stored) -> Stored:
        """Finish or undo what interrupted operations left in the record (`VEService._settle`)."""
        raise NotImplementedError

    async def _record(self, caller: Caller, name: str) -> Stored:
        record = await self.directory.get(name)
        if record is None:
            raise NotFound(f"no VE named {name!r}")
        if not may_act(caller, record.ve):
            raise Forbidden(f"VE {name!r} belongs to {record.ve.owner!r}; {caller.cn!r} may not act on it")
        return record

    async def _candidates(self, spec: VESpec, everyone: bool) -> list[Candidate]:
        """Where VMs may go, nearest first: this node, then the nodes with room for the smallest VM that
        the spiral search found; with `everyone`, then every other live member by measured (else
        estimated) RTT, each asked for its free room, so a short spiral never refuses what some node
        could host (one that does not answer is left out of plans: its room is unknown)."""
        me = self.membership.me
        site = spec.site
        members = {m.name: m for m in self.membership.alive() if site is None or m.site == site}
        if not members:
            sites = sorted({m.site for m in self.membership.alive()})
            raise RequestError(f"no live node in site {site!r} (sites: {', '.join(sites)})")
        vcpus, memory = min(v.vcpus for v in spec.vms), min(v.memory_mb for v in spec.vms)

        def has_room(entry: Any, reply: dict[str, Any]) -> bool:
            free = reply.get("free") or {}
            return ((site is None or reply.get("site") == site) and free.get("vcpus", 0) >= vcpus
                    and free.get("memory_mb", 0) >= memory)

        # The spiral view only as wide as the answer: a plan needs this many nodes with room, nearest first,
        # and a view of the default width (16) would visit every node of a small cluster, one hop at a time.
        count = len(spec.vms) + 1
        found = await self.nearest.search(count, has_room, n=count)
        keys = found.keys()
        ranked = [candidate(members[e.name], keys[e.name] * 1000 if e.name in keys else None, "spiral",
                            found.replies[e.name].get("free")) for e in found.nodes if e.name in members]
        if me.name in members:
            ranked.insert(0, candidate(me, 0.0, free=self.host.ledger.free(trio.current_time()).to_wire()))
        if not everyone:
            return await self._near_images(spec, ranked)

        def rtt_ms(m: Member) -> float | None:
            """Measured RTT if we have one, else the coordinates' estimate."""
            rtt = m.rtt if m.rtt is not None else self.distances.estimate_to(m)
            return rtt * 1000 if rtt is not None else None

        tried = {c.node for c in ranked}
        rest = sorted(((m, rtt_ms(m)) for m in members.values() if m.name not in tried),
                      key=lambda found: (found[1] is None, found[1] or 0.0, found[0].name))
        infos = await self.transport.call_many([m.addr for m, _ in rest], "host.info", {}, 5.0)
        for m, rtt in rest:
            info = infos.get(m.addr)
            ranked.append(candidate(m, rtt, free=info.get("free") if isinstance(info, dict) else None))
        return await self._near_images(spec, ranked)

    async def image_holders(self, spec: VESpec) -> set[str] | None:
        """The nodes that hold every image the VE's VMs boot (None: it boots none); RequestError naming the
        first image the catalogue lacks."""
        holders: set[str] | None = None
        for image in sorted({vm.image for vm in spec.vms if vm.image != DEFAULT_IMAGE}):
            entry = await self.images.get(tagged(image))
            if entry is None:
                raise RequestError(f"no image named {image!r} (see: discovery image list)")
            holders = set(entry.holders) if holders is None else holders & set(entry.holders)
        return holders

    async def _bring_image(self, vm: VMSpec, node: str, addr: str, token: str | None = None) -> None:
        """Have `node` hold the image `vm` boots before the VM arrives there (a relocation, a standby copy):
        `image.pull` fetches only the chunks it lacks; with the `token` of a reservation, `host.prefetch`,
        which keeps that reservation alive meanwhile. RequestError naming the node if it cannot."""
        if vm.image == DEFAULT_IMAGE:
            return
        try:
            if token is None:
                await self.transport.call(addr, "image.pull", {"name": tagged(vm.image)}, timeout=PULL_TIMEOUT)
            else:
                await self.transport.call(addr, "host.prefetch", {"token": token, "image": vm.image},
                                          timeout=PULL_TIMEOUT)
        except RpcError as err:
            raise RequestError(f"{node} cannot bring image {vm.image!r}: {err}") from None

    async def _near_images(self, spec: VESpec, ranked: list[Candidate]) -> list[Candidate]:
        """Image locality: the candidates that hold the VE's images first, nearest first among them, then the
        others, nearest first (they fetch the image: `image pull`)."""
        holders = await self.image_holders(spec)
        if holders is None:
            return ranked
        marked = [replace(c, holds_image=c.node in holders) for c in ranked]
        return sorted(marked, key=lambda c: not c.holds_image)

    async def _host(self, where: Place, method: str, args: dict[str, Any], timeout: float = HOST_TIMEOUT) -> Any:
        """Call a host (a slot, an intent or a standby copy: its `addr`); a failure becomes one RequestError
        naming the node."""
        try:
            return await self.transport.call(where.addr, method, args, timeout=timeout)
        except RpcError as err:
            raise RequestError(f"{where.node}: {err}") from None

    async def _holds(self, where: Place, domain: str) -> bool:
        """Whether the host holds `domain` (defined and persisted; a mere reservation does not count)."""
        try:
            await self.transport.call(where.addr, "host.vm.info", {"name": domain}, timeout=10)
        except RemoteError as err:
            if err.kind == "not_found":
                return False
            raise RequestError(f"cannot tell whether {where.node} holds {domain}: {err}") from None
        except RpcError as err:
            raise RequestError(f"{where.node} cannot be reached: {err}") from None
        return True

    async def _asked_down(self, ve: VERecord, vms: Sequence[str] | None, host: str | None, force: bool, verb: str,
                          forced: str) -> dict[str, str | None]:
        """`_hosts_down` of the VMs `vms` of `ve` (None: every VM), only those still placed on `host` if it is
        given (a watcher recovering that host: none left is nothing to do, not a Conflict). NotFound for a VM
        the VE does not have."""
        placement = ve.placement
        unknown = sorted(set(vms or ()) - set(placement))
        if unknown:
            raise NotFound(f"VE {ve.name!r} has no VM {unknown[0]!r} (VMs: {', '.join(sorted(placement))})")
        asked = sorted(placement if vms is None else set(vms))
        if host is not None:
            asked = [vm for vm in asked if placement[vm].node == host]
        every = vms is None and host is None
        return await self._hosts_down(ve, None if every else asked, force, verb, forced) if asked else {}

    async def _hosts_down(self, ve: VERecord, vms: Sequence[str] | None, force: bool, verb: str,
                          forced: str) -> dict[str, str | None]:
        """Which of `vms` (None: every VM) to bring up elsewhere, each with why its host counts as down
        (`_down`), or None if it is alive and answering but `force`d. Conflict in one line naming the hosts
        if there is none: `verb` says what would be done ("fail over"), `forced` what --force does."""
        asked = sorted(ve.placement) if vms is None else list(vms)
        down: dict[str, str | None] = {}
        for vm in asked:
            why = await self._down(ve, vm)
            if why is not None or force:
                down[vm] = why
        if not down:
            hosts = sorted({ve.placement[vm].node for vm in asked})
            whose = "its host" if len(asked) == 1 else f"the host{'s' if len(hosts) > 1 else ''} of its VMs"
            named = f"{ve.name}/{asked[0]}" if vms is not None and len(asked) == 1 else ve.name
            raise Conflict(f"cannot {verb} {named}: {whose} {', '.join(hosts)} {'is' if len(hosts) == 1 else 'are'} "
                           f"alive and answering (--force {forced} anyway, switching the running copy off first)")
        return down

    async def _down(self, ve: VERecord, vm: str) -> str | None:
        """Why the VM's host counts as down, or None if it is a live member that answers holding the VM."""
        slot = ve.placement[vm]
        member = self.membership.members.get(slot.node)
        if member is None or member.status not in (ALIVE, SUSPECT):
            return f"{slot.node} is {member.status if member else 'not a member'}"
        try:
            await self.transport.call(slot.addr, "host.vm.info", {"name": domain_name(ve.name, vm)},
                                      timeout=DOWN_PROBE_TIMEOUT)
        except RemoteError as err:
            return f"{slot.node} does not hold it" if err.kind == "not_found" else None
        except RpcError as err:
            log.info("%s does not answer: %s", slot.node, err)
            return f"{slot.node} does not answer"
        return None

    def _rtt_ms(self, node: str) -> float | None:
        member = self.membership.members.get(node)
        return member.rtt * 1000 if member is not None and member.rtt is not None else None

    async def _drop_copy(self, record: Stored, vm: str, node: str) -> Stored:
        """Drop the standby copy of `vm` that `node` keeps, if any (the VM is about to move there, where a
        copy would protect nothing and takes the room the VM needs): out of the record first, then freed."""
        ve = record.ve
        gone = [e for e in ve.standbys_of(vm) if e.node == node]
        if not gone:
            return record
        record = await self.directory.put(ve.with_standbys(vm, (e for e in ve.standbys_of(vm) if e.node != node)),
                                          after=record)
        await self._unstandby(ve.name, {vm: gone})
        return record

    async def _unstandby(self, ve: str, copies: Mapping[str, Iterable[Standby]]) -> None:
        """Free standby copies the record no longer lists; best effort: a node that cannot be told now frees
        its copy itself once it reads the record (`discovery.ve.standbys.Fencing`)."""
        for vm, entries in sorted(copies.items()):
            answers = await self.transport.call_many([e.addr for e in entries], "host.unstandby",
                                                     {"name": domain_name(ve, vm)}, 10.0)
            for addr, answer in answers.items():
                if isinstance(answer, Exception):
                    log.info("standby of %s/%s at %s not freed yet: %s", ve, vm, addr, answer)


def candidate(member: Member, rtt_ms: float | None, found_by: str = "", free: Mapping[str, int] | None = None,
              ) -> Candidate:
    return Candidate(member.name, member.addr, member.site, rtt_ms, found_by, free)


async def pause_for_test(point: str) -> None:
    """Test-only fault hook: with DISCOVERY_TEST_PAUSE=<point>:<seconds>[,<point>:<seconds>...] in its
    environment, a coordinator sleeps at each `point` named so that a test can kill it there. Points:
    `placed` (a new VE's placement written, its VMs reserved, none started), `confirmed` (every VM of a new
    VE started, its record still `creating`), `prepared` (target reserved, source exported and frozen,
    target not yet confirmed), `started` (the target runs the VM, the source still holds its frozen copy),
    `snapshot` (the VE's running VMs paused, no snapshot stored yet), `failover` (the failover's intent
    written, the standby not yet promoted), `rebuild` (the rebuild's intent written, its node reserved, the VM
    not yet defined there), `recover` (an HA watcher revoked a host's lease, and recovers nothing yet),
    `follow` (the same, for a watcher that confirmed another's revocation). Unset, it does nothing."""
    for item in os.environ.get(PAUSE_ENV, "").split(","):
        where, _, seconds = item.partition(":")
        if where == point:
            try:
                delay = float(seconds)
            except ValueError:
                return
            log.warning("%s: pausing %g s at %s", PAUSE_ENV, delay, point)
            await trio.sleep(delay)


def may_act(caller: Caller, ve: VERecord) -> bool:
    """A VE's owner (the certificate that created it) and operators may act on it; nobody else."""
    return caller.role == "operator" or ve.owner == caller.cn
