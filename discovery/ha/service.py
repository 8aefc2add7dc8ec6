"""The HA service of an agent: its lease and its watches (`discovery.ha.shell`), acting on real VMs.

What the cores ask, done here:

- **which VEs the lease lists**: the protected ones (`ha:` mode other than none) with a VM on this host. The
  host knows its domains (`<ve>:<vm>`); the policies come from the VE records, read when a VE first shows up
  here and every POLICY_REFRESH seconds after, and saved in `ha.json` so that a restarted agent knows at once
  which of its VMs must wait for the lease;
- **freeze / thaw**: the host pauses and holds the listed VEs' VMs, and releases them
  (`agents.host.freezing`). Meanwhile the host refuses to run a protected VM that the lease does not cover
  (`HostBase.may_run`): no verb, restart or release runs one on a host whose lease lapsed;
- **fence**: the lease was revoked, so watchers run these VEs elsewhere: the host forces its VMs of them off
  and holds them for good (`agents.host.freezing`): they leave the lease and never run here again (`may_run`,
  kept in `ha.json`); the VE layer's fencing pass removes each once the directory places it on the node that
  holds it now. One the watchers cannot move (no room anywhere) stays off, and they retry; `ve rebuild
  --force` moves it too;
- **recover**: a watcher that revoked a host's lease runs the host's VEs elsewhere, higher `priority` first,
  each through the VE layer's own transactions: `failover` onto the nearest standby copy for a `standby`
  VE that has one on a live node, else `rebuild` (the newest shipped snapshot, else the image), both
  forced (the host's copy is condemned, whether it answers or not). Then the protection is made whole
  again: the standby copies the policy asks for. A VE that cannot be recovered now is retried
  (`discovery.ha.watch.RETRY`). A watcher that follows another's revocation only checks, while the revoker
  lives, that the VEs left the host, and recovers them itself once SWIM holds the revoker dead: a second
  recovery would lose its first conditional write of the record to the revoker's (`discovery.ve.directory`),
  but only after work a check spares;
- **a VM stranded here**: one whose guest kept crashing (the host's restart budget spent,
  `agents.host.restart_budget`), or one fenced here that the directory still places here 30 s later, the host
  itself recovers elsewhere the same way.

A host that *leaves* (SIGTERM) is not recovered: an operator stopping an agent means to start it again,
and a VM of a host that left for good is moved with `ve rebuild` / `ve failover`.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import trio

from agents.host.replication import MirrorWant, Replication
from agents.host.service import HostService
from agents.runtime import Actor
from discovery.ha.lease import TERM, Lease, lease_key
from discovery.ha.messages import HA_LEASE, HA_STATUS, HaStatus, LeaseOf, LeaseRecord
from discovery.ha.shell import UNANSWERED, HaShell, lease_of
from discovery.ha.watch import RETRY
from discovery.ve.base import pause_for_test
from discovery.ve.directory import Directory
from discovery.ve.records import VERecord, domain_name
from discovery.ve.service import VEService
from overlay.dht import DHT
from overlay.membership import ALIVE, SUSPECT, Membership
from overlay.messages import NoArgs
from overlay.wire.rpc import Caller, Endpoint, NotFound, RequestError

log = logging.getLogger(__name__)
POLICY_REFRESH = 10.0
"""Seconds between two reads of a local VE's policy (`ve ha` changes it on another node)."""
FENCED_GRACE = 30.0
"""Seconds a fenced VM may stay placed here before this host has it recovered elsewhere itself: the watchers
move it within a few seconds when all goes well."""
RECOVERY_LIMIT = 180.0
"""Seconds one VE's recovery may take (its steps have their own timeouts: this bounds a hang): it is given up as
a dead coordinator's would be, and tried again (its intent settled first)."""


class HaService(Actor):
    """Runs the node's `HaShell` (`run`), and its policies' refresh; membership events kick the shell."""

    name = "ha"
    tick_interval = 1.0

    def __init__(self, node: str, membership: Membership, dht: DHT, host: HostService, ves: VEService,
                 directory: Directory, state: Path, term: float = TERM) -> None:
        super().__init__()
        self.host, self.ves, self.directory, self.state = host, ves, directory, state
        self.shell = HaShell(node, membership, dht, self, term, ready=ves.joined)
        self.modes: dict[str, str] = {}
        """VE -> its HA mode as last read (VEs with a VM here)."""
        self._read_at: dict[str, float] = {}
        self._frozen: list[str] = []
        self.fenced: set[str] = set()
        """VMs switched off here for good by a fence: never listed nor run again; the VE layer's fencing pass
        removes each once the directory places it elsewhere (kept in `state` across restarts)."""
        self._fenced_at: dict[str, float] = {}
        """Fenced VM -> since when (this run's clock)."""
        self._retry_at: dict[str, float] = {}
        """Crashed or fenced VM -> when its recovery elsewhere may be tried again."""
        self.recovered = 0
        """VEs this node recovered elsewhere, as a watcher or for a crashing guest (what the metrics show)."""
        self.replication: Replication | None = None
        """Where this host's disks are mirrored to their standby copies (real guests only)."""
        self._mirrors: dict[str, dict[str, MirrorWant]] = {}
        """VE -> the mirrors its policy wants of its VMs here, as last read."""
        self._load()
        host.may_run = self.may_run
        host.forgotten = self._forgotten

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.shell.run)
            await super().run()

    async def handle(self, message: Any) -> None:
        """A membership event: the watches look again now."""
        self.shell.kick()

    async def tick(self) -> None:
        await self._refresh()
        await self._recover_stranded()
        if self.replication is not None:
            here = set(self._domains())
            self.replication.want({d: w for wants in self._mirrors.values() for d, w in wants.items() if d in here})

    def serve(self, endpoint: Endpoint) -> None:
        endpoint.route(HA_STATUS, self._on_status)
        endpoint.route(HA_LEASE, self._on_lease)

    async def _on_status(self, caller: Caller, request: NoArgs) -> HaStatus:
        keeper, now = self.shell.keeper, trio.current_time()
        held = keeper.held_until is not None and now < keeper.held_until and not keeper.frozen
        return HaStatus(self.shell.name, keeper.epoch, list(keeper.listed), keeper.frozen, list(self._frozen),
                        {host: w.state.value for host, w in sorted(self.shell.watches.items())}, self.recovered,
                        round(keeper.held_until - now, 3) if held and keeper.held_until is not None else None)

    async def _on_lease(self, caller: Caller, request: LeaseOf) -> LeaseRecord | None:
        """`request.node`'s lease record, read from a majority of its replicas as the watchers read it."""
        try:
            record = await self.shell.read(lease_key(request.node))
        except UNANSWERED as err:
            raise RequestError(f"cannot read {request.node}'s lease: {err}") from None
        lease = lease_of(record)
        return None if lease is None or record is None else LeaseRecord(lease, record.version, record.writer)

    def may_run(self, domain: str) -> bool:
        """A fenced VM never; a VM of a protected VE only while the lease covers its VE; any other, always."""
        ve = domain.partition(":")[0]
        return domain not in self.fenced and (self.modes.get(ve, "none") == "none" or self.shell.covered(ve))

    def _forgotten(self, domain: str) -> None:
        """The host removed `domain`: a VM of that name defined here later (a recovery may bring the VE back) is
        not the one fenced. Cleared at once, not at the next refresh: the next may come within the same second
        (the campaign caught a new VM taken for its fenced namesake: left out of the lease, it was not frozen)."""
        if domain in self.fenced:
            self.fenced.discard(domain)
            self._fenced_at.pop(domain, None)
            self._save()

    # -- hooks of the shell ---------------------------------------------------------------------------------

    def protected(self) -> frozenset[str]:
        local = {d.partition(":")[0] for d in self._domains() if d not in self.fenced}
        return frozenset(ve for ve in local if self.modes.get(ve, "none") != "none")

    async def freeze(self) -> None:
        listed = set(self.shell.keeper.listed) | set(self.shell.keeper.wanted)
        self._frozen += await self.host.freeze(d for d in self._domains() if d.partition(":")[0] in listed)

    async def thaw(self) -> None:
        frozen, self._frozen = self._frozen, []
        await self.host.thaw(frozen)

    async def fence(self, ves: tuple[str, ...], epoch: int) -> None:
        doomed = [d for d in self._domains() if d.partition(":")[0] in ves]
        self.fenced.update(doomed)  # before the host acts: from now on nothing runs them
        for domain in doomed:
            self._fenced_at.setdefault(domain, trio.current_time())
        self._save()
        await self.host.fence(doomed)

    def revoked(self, host: str, lease: Lease) -> None:
        pass  # the shell logs it; what was recovered is counted by `recover`

    async def recover(self, host: str, ves: tuple[str, ...], epoch: int, by: str | None) -> bool:
        await pause_for_test("recover" if by == self.shell.name else "follow")
        records = {}
        for name in ves:
            try:
                record = await self.directory.get(name)
            except UNANSWERED as err:
                log.warning("ha: cannot read VE %s to recover it: %s", name, err)
                return False
            if record is not None and any(s.node == host for s in record.ve.placement.values()):
                records[name] = record
        if records and by not in (None, self.shell.name) and self._alive(by):
            return False  # a follower leaves the recovery to the revoker while it lives (module docstring)
        done = True
        for name, record in sorted(records.items(), key=lambda r: (-r[1].ve.spec.ha.priority, r[0])):
            reason = f"{host}'s HA lease (epoch {epoch}) revoked by {by or '?'}"
            done = await self._recover_ve(name, record.ve.spec.ha.mode, reason, host=host) and done
        return done

    def _alive(self, node: str) -> bool:
        member = self.shell.membership.members.get(node)
        return member is not None and member.status in (ALIVE, SUSPECT)

    async def _recover_stranded(self) -> None:
        """A protected VM that cannot run here any more runs elsewhere, this host asking as a watcher would for a
        dead one: one whose guest kept crashing (the host's restart budget spent, `agents.host.restart_budget`),
        and one fenced here that the directory still places here FENCED_GRACE seconds later (its recovery went
        astray: say it was moved here by a watcher on the side of a partition that then lost this host's lease).
        Only a VM the directory places on this host is moved (`host=`)."""
        now, me = trio.current_time(), self.shell.name
        stranded = {d: f"its guest kept crashing on {me}" for d in self.host.crashed}
        stranded |= {d: f"fenced on {me} and still placed there" for d, since in self._fenced_at.items()
                     if now - since >= FENCED_GRACE}
        for domain in set(self._retry_at) - set(stranded):
            del self._retry_at[domain]
        for domain, reason in sorted(stranded.items()):
            ve, _, vm = domain.partition(":")
            mode = self.modes.get(ve, "none")
            if mode == "none" or now < self._retry_at.get(domain, -math.inf):
                continue
            self._retry_at[domain] = now + RETRY
            await self._recover_ve(ve, mode, reason, host=me, vms=[vm])

    async def _recover_ve(self, name: str, mode: str, reason: str, host: str | None = None,
                          vms: list[str] | None = None) -> bool:
        """Run VE `name`'s VMs `vms` (None: all), or those still on `host`, elsewhere, forced: on a standby copy
        if the VE has one on a live node, else rebuilt; then its copies made whole again. Whether it is done."""
        try:
            with trio.fail_after(RECOVERY_LIMIT):
                if mode == "standby":
                    try:
                        ve, moved = await self.ves.failover(name, vms, reason, host=host, force=True)
                    except RequestError as err:  # no copy on a live node: from its snapshot or image instead
                        log.warning("ha: %s: %s; rebuilding instead", name, err)
                        ve, moved = await self.ves.rebuild(name, vms, reason, host=host, force=True)
                else:
                    ve, moved = await self.ves.rebuild(name, vms, reason, host=host, force=True)
        except trio.TooSlowError:  # as if this coordinator had died: the next attempt settles what it left
            log.warning("ha: recovering VE %s (%s) took over %g s; trying again", name, reason, RECOVERY_LIMIT)
            return False
        except NotFound:
            return True  # destroyed meanwhile
        except UNANSWERED as err:
            log.warning("ha: cannot recover VE %s (%s) yet: %s", name, reason, err)
            return False
        if moved:  # else it needed nothing (another agent recovered it): its copies are that one's to restore
            self.recovered += 1
            log.warning("ha: VE %s recovered (%s): %s", name, reason,
                        ", ".join(f"{vm} on {node}" for vm, node in sorted(moved.items())))
            await self.ves.restore_protection(ve.name)
        return True

    # -- what runs here, and how it is protected ----------------------------------------------------------

    def _domains(self) -> list[str]:
        """The VMs defined on this host (standby copies, `<domain>/...`, are not VMs)."""
        return [key for key in self.host.ledger.allocated if "/" not in key and ":" in key]

    def _local_ves(self) -> set[str]:
        return {domain.partition(":")[0] for domain in self._domains()}

    async def _refresh(self) -> None:
        """Read the policy of each VE with a VM here first seen, or not read for POLICY_REFRESH seconds."""
        local, now = self._local_ves(), trio.current_time()
        changed = bool(self.fenced - set(self._domains()))
        self.fenced &= set(self._domains())  # removed since: forgotten
        self._fenced_at = {d: self._fenced_at.get(d, now) for d in self.fenced}
        for gone in set(self.modes) - local:
            del self.modes[gone]
            self._read_at.pop(gone, None)
            changed = True
        for gone in set(self._mirrors) - local:
            del self._mirrors[gone]
        for name in sorted(local):
            if now - self._read_at.get(name, -POLICY_REFRESH) < POLICY_REFRESH:
                continue
            try:
                record = await self.directory.get(name)
            except UNANSWERED as err:  # cut off, say: what was read last holds
                log.debug("ha: cannot read VE %s's policy: %s", name, err)
                continue
            if record is None:  # destroyed (its VMs go with it), or replicas that do not have it yet: a VM
                continue  # known protected stays so (taking it for unprotected would let it run unleased)
            self._read_at[name] = now
            self._mirrors[name] = self._mirror_wants(record.ve)
            mode = record.ve.spec.ha.mode
            if self.modes.get(name) != mode:
                self.modes[name], changed = mode, True
        if changed:
            self._save()
            self.shell.kick()

    def _mirror_wants(self, ve: VERecord) -> dict[str, MirrorWant]:
        """The mirrors VE `ve`'s policy wants of its VMs here: each to its first listed copy on a live node
        (the copy a failover promotes, `discovery.ve.replicas.Replicas.failover`), if it replicates."""
        policy = ve.spec.ha
        if policy.mode != "standby" or policy.replication == "off":
            return {}
        me, alive = self.shell.name, {m.name for m in self.shell.membership.alive()}
        wants = {}
        for vm in (vm for vm, slot in ve.placement.items() if slot.node == me):
            copy = next((e for e in ve.standbys_of(vm) if e.node in alive and e.node != me), None)
            if copy is not None:
                wants[domain_name(ve.name, vm)] = MirrorWant(copy.node, copy.addr, policy.replication == "sync",
                                                             (policy.bandwidth or 0) << 20, policy.max_lag)
        return wants

    def _load(self) -> None:
        try:
            saved = json.loads(self.state.read_text())
            self.modes = {str(k): str(v) for k, v in saved["modes"].items()}
            self.fenced = {str(d) for d in saved["fenced"]}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return  # none yet, or unreadable: the policies are read again, and a fence comes again

    def _save(self) -> None:
        tmp = self.state.with_suffix(".tmp")
        tmp.write_text(json.dumps({"modes": self.modes, "fenced": sorted(self.fenced)}, sort_keys=True))
        tmp.replace(self.state)
