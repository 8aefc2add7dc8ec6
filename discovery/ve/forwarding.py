"""Where the other VMs of this host's VE networks are: read from the directory, handed to the host's data plane
(`agents.host.networking`) as its segments' forwarding entries.

`remotes` (pure) turns VE records into, for each VNI, the other hosts of the network (their underlay address:
the host part of the agent's address) and the MACs of the VMs of that network there. `Forwarding` (an actor of
agents that carry VE networks) reads the records of the VEs with a VM on this host (or arriving by live
migration) every FORWARD_EVERY seconds and tells the host; a move, failover or rebuild that ends tells every
host of the VE at once (`ve.forward`, `discovery.ve.base.VEBase._moved`). While it is under way, its VM's
frames are flooded to both of its places (`remotes`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from agents.host.networking import Networking
from agents.runtime import Actor
from discovery.ve.directory import Directory
from discovery.ve.records import VERecord
from overlay.wire.rpc import RequestError, RpcError, split_addr

log = logging.getLogger(__name__)
FORWARD_EVERY = 2.0

Remotes = dict[int, dict[str, frozenset[str]]]


def remotes(ves: Iterable[VERecord], node: str) -> Remotes:
    """For each VNI of a network with a VM on `node` (or on its way here), the other hosts of that network and
    their VMs' MACs on it. A VM being moved, failed over or rebuilt is at its host *or* its target until the
    operation ends: both hosts are listed, its MAC at neither, so frames to it are flooded to both (each
    host's bridge delivers them only where the VM is) and it is reached through the switch-over, which the
    hosts' next pass after the intent was written prepares."""
    found: dict[int, dict[str, set[str]]] = {}
    for ve in ves:
        local = {nic.network for vm, slot in ve.placement.items() if node in slot.named()
                 for nic in ve.nics.get(vm, ())}
        for vm, slot in ve.placement.items():
            places = [(slot.node, slot.addr)] + [(i.node, i.addr) for i in slot.intents()]
            for nic in ve.nics.get(vm, ()):
                net = ve.networks.get(nic.network)
                if nic.network not in local or net is None:
                    continue
                for where, addr in places:
                    if where != node:
                        macs = found.setdefault(net.vni, {}).setdefault(split_addr(addr)[0], set())
                        if len(places) == 1:
                            macs.add(nic.mac)
    return {vni: {host: frozenset(macs) for host, macs in hosts.items()} for vni, hosts in found.items()}


class Forwarding(Actor):
    """Keeps this host's forwarding entries in step with the directory (module docstring)."""

    name = "ve-forwarding"
    tick_interval = FORWARD_EVERY

    def __init__(self, node: str, host: Networking, directory: Directory) -> None:
        super().__init__()
        self.node, self.host, self.directory = node, host, directory

    async def handle(self, message: object) -> None:
        """A VE's VMs moved (`ve.forward`): look now, not at the next pass."""
        await self.tick()

    async def tick(self) -> None:
        names = sorted({domain.split(":", 1)[0] for domain in (*self.host.ledger.allocated, *self.host.incoming)})
        records = []
        for name in names:
            try:
                stored = await self.directory.get(name)
            except (RequestError, RpcError) as err:
                log.info("forwarding: VE %s unread (%s); its entries stay as they are", name, err)
                return
            if stored is not None:
                records.append(stored.ve)
        await self.host.set_remotes(remotes(records, self.node))  # also repairs what the kernel lost meanwhile
