"""One node's agent, composed: the layers of `agents/` plus the VE service and the DVMS scheduler.

This is the one place where the product's services are wired into a `NodeAgent`; `discovery agent run`
and `python -m discovery.agent` (`main`) call `run`. Each service receives from here the few interfaces it
uses (the VE directory, the transport, the membership view, the spiral search...), never the agent, so none
of them imports another's module just to find it; their methods are routed and their subscriptions made
here too, not in their constructors; each service's metrics collector is registered here too.
"""

from __future__ import annotations

import argparse
import logging
import sys
from functools import partial
from pathlib import Path

import trio

from agents.hypervisor.actor import HypervisorError
from agents.node import NodeAgent
from agents.runtime import Periodic
from discovery.agent_config import load_agent_config
from discovery.ha.lease import TERM
from discovery.ha.service import HaService
from discovery.metrics import DvmsCollector, HaCollector, ImagesCollector
from discovery.scheduler.service import DvmsService
from discovery.scheduler.settings import DvmsSettings
from discovery.toml_config import ConfigError
from discovery.top.service import TopService
from discovery.ve.directory import PREFIX as DIRECTORY_PREFIX
from discovery.ve.directory import Directory
from discovery.ve.forwarding import Forwarding
from discovery.ve.replicas import Fencing
from discovery.ve.service import Recovery, VEService
from discovery.ve.shipped_log import ShippedLogs
from discovery.ve.shipping import Shipper
from discovery.ve.vnis import PREFIX as VNI_PREFIX
from dvms.model import Node
from images.catalogue import Catalogue
from images.messages import tagged
from images.service import UPKEEP_INTERVAL, Bases, ImageService
from images.store import ChunkStore
from overlay.wire import tls


async def install(agent: NodeAgent) -> None:
    """Agent extension hook: the image service; the VE service, its recovery of interrupted operations, its
    fencing of failed-over copies and its shipped snapshots; the HA service (the host's lease, and the
    watchers that recover the VEs of a dead host); the DVMS service, which moves nothing unless
    some VM demands CPU (`dvms.load`, real guests, or the injector of agent.toml's `[dvms]`); and the cluster's
    view for `discovery top`. DVMS relocates through the VE service and reads the VEs' rules from the directory
    they share."""
    cfg = agent.config
    for prefix in (DIRECTORY_PREFIX, VNI_PREFIX):  # one history per record across a partition (`overlay.quorum`)
        agent.dht.pin(prefix)
    directory = Directory(agent.records)
    catalogue = Catalogue(agent.records)
    bases = agent.host.domains.bases
    images = ImageService(ChunkStore(cfg.data_dir / "images"), catalogue, agent.transport, agent.membership,
                          users=partial(ves_using, directory),
                          bases=Bases(bases, agent.host.images_in_use) if bases is not None else None)
    ve = VEService(node=cfg.name, joins=bool(cfg.join), directory=directory, transport=agent.transport,
                   membership=agent.membership, nearest=agent.spiral, distances=agent.coordinates, host=agent.host,
                   images=images, shipped=ShippedLogs(agent.records), events=agent.events)
    settings = cfg.extra.get("dvms")
    dvms = DvmsService(
        node=Node(cfg.name, cfg.site, 100 * cfg.capacity.vcpus, cfg.capacity.memory_mb),
        settings=settings if isinstance(settings, DvmsSettings) else DvmsSettings(),
        measured=cfg.hypervisor == "qemu",  # real guests: demand from libvirt's stats
        transport=agent.transport, membership=agent.membership,
        nearest=lambda: [e.name for e in agent.spiral.view.entries()],
        successors=lambda: [p.name for p in agent.ring.state.successor_list()],
        hypervisor=agent.hypervisor, holds_vms=lambda: bool(agent.host.ledger.allocated or agent.host.ledger.reserved),
        set_metadata=agent.host.set_metadata, directory=directory, relocate=ve.relocate)
    ha = HaService(cfg.name, agent.membership, agent.dht, agent.host, ve, directory, cfg.data_dir / "ha.json",
                   float(cfg.extra.get("ha_lease_term", TERM)))
    ha.replication = agent.replication
    top = TopService(name=cfg.name, site=cfg.site, transport=agent.transport, membership=agent.membership,
                     host=agent.host, scheduler=dvms, events=agent.events)
    images.serve(agent.transport)
    agent.host.images = images  # a host brings a new VM's image while holding its room, and boots it
    ve.serve(agent.transport)
    dvms.serve(agent.transport)
    ha.serve(agent.transport)
    top.serve(agent.transport)
    agent.notifier.subscribe(dvms.tell_nowait, {"member_dead", "member_left"})
    agent.exporter.register(DvmsCollector(dvms))
    agent.exporter.register(ImagesCollector(images.fetcher))
    agent.exporter.register(HaCollector(ha))
    agent.notifier.subscribe(ha.tell_nowait, {"member_joined", "member_dead", "member_left"})
    agent.actors += [Recovery(ve), ve.unindexing, Fencing(ve), Shipper(ve), dvms, ha,
                     Periodic("image-upkeep", UPKEEP_INTERVAL, images.upkeep)]
    if agent.host.dataplane is not None:  # the VE networks' forwarding entries, from the directory
        ve.forwarding = Forwarding(cfg.name, agent.host, directory)
        agent.actors.append(ve.forwarding)


async def ves_using(directory: Directory, image: str) -> list[str]:
    """The VEs one of whose VMs boots `image` (NAME:TAG): `image rm` refuses while there are some."""
    return sorted(r.ve.name for r in await directory.scan()
                  if any(tagged(vm.image) == image for vm in r.ve.spec.vms))


def run(config: Path) -> None:
    """Serve as the node that `config` (agent.toml) describes, until SIGTERM."""
    trio.run(NodeAgent(load_agent_config(config), [install]).run)


def serve(config: Path, log_level: str = "info") -> str | None:
    """`run`, logging at `log_level` (debug, info, warning); the one-line reason the agent could not start or
    went down, or None once it stopped on SIGTERM."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if log_level.lower() != "debug":
        logging.getLogger("kademlia").setLevel(logging.WARNING)  # it logs every datagram at INFO
    try:
        run(config)
    except (ConfigError, tls.TLSError, HypervisorError) as err:
        return str(err)
    except OSError as err:  # e.g. the listen address is taken
        return f"{config}: {err.strerror or err}"
    return None


def main(argv: list[str] | None = None) -> None:
    """`python -m discovery.agent --config agent.toml` (or `discovery-agent`): what `discovery agent run` does, in
    a process without the CLI's framework, which costs every agent memory (typer loads pydantic: ~11 MiB).
    `discovery cluster up` starts its agents this way."""
    parser = argparse.ArgumentParser(prog="discovery-agent", description="Run this node's agent until SIGTERM.")
    parser.add_argument("--config", type=Path, required=True, help="agent.toml")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning"))
    parser.add_argument("--check", action="store_true",
                        help="read the config and exit (what deploy tools validate a new agent.toml with)")
    args = parser.parse_args(argv)
    if args.check:
        try:
            load_agent_config(args.config)
        except (ConfigError, tls.TLSError) as err:
            sys.exit(f"error: {err}")
        return
    why = serve(args.config, args.log_level)
    if why is not None:
        sys.exit(f"error: {why}")


if __name__ == "__main__":
    main()
