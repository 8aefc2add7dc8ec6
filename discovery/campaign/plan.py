"""A campaign as data, and its timeline (sans-IO): what a campaign file says (`discovery.campaign.spec` reads
it), and the timed steps the runner carries out.

A campaign is a bring-up (a testbed of `nodes` on `sites`, or hosts already running agents), a workload (VEs
created at a steady `rate`, each destroyed `lifetime` after it was due, if given), actions at given times
(faults: `kill -9` a node's agent (`kill`: its guests live on) or power its host off (`poweroff`: the agent,
hypervisor and guests), `start` it again, `partition` a node or a site off the rest, `heal`; DVMS: `capacity`
shrinks every node's CPU as DVMS counts it (a test hook), `load` gives the first VMs created a CPU demand),
for `duration` seconds, the cluster sampled every `sample_every` seconds.

A workload of real guests may expose each VM's web server (port 80) on its host at a port of its own
(`web_port`): a `load` is then burned inside those guests (the tiny guest's `/cgi-bin/load?cpu=N`) and DVMS
measures it as it would any guest's; without one, the load is pinned through DVMS's `dvms.load` hook.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

ActionKind = Literal["kill", "poweroff", "start", "partition", "heal", "capacity", "load"]
ACTIONS: tuple[ActionKind, ...] = ("kill", "poweroff", "start", "partition", "heal", "capacity", "load")
ON_NODES: tuple[ActionKind, ...] = ("kill", "poweroff", "start")
"""The actions whose target is a node (a partition's is a node or a site)."""


@dataclass(frozen=True)
class TestbedSpec:
    """The testbed a campaign brings up when it is not up yet (`discovery testbed up`'s options)."""

    __test__ = False  # not a pytest class, whatever its name
    nodes: int = 6
    sites: int = 3
    site_rtt: float = 20.0
    bandwidth: float = 100.0
    hypervisor: str = "test"
    image_copies: int = 3


@dataclass(frozen=True)
class CreateSpec:
    """The VEs a campaign creates: `count` at `rate` per second, each of `vms` alike VMs and HA mode `ha`,
    destroyed `lifetime` seconds after it was due (None: kept to the end), all created and destroyed through
    node `via` while it is up ('': the live nodes in turn). `web_port`: each VM's port 80 exposed on its host at
    `web_port` plus its number in the workload (`web_port()`), None for none."""

    rate: float
    count: int
    vms: int = 1
    vcpus: int = 1
    memory_mb: int = 256
    disk_gb: int = 1
    image: str = "none"
    ha: str = "none"
    lifetime: float | None = None
    via: str = ""
    web_port: int | None = None


@dataclass(frozen=True)
class Action:
    """One timed action: `kind` at `at` seconds; `target` a node (ON_NODES) or a node or site (partition);
    `cpu` the percent of one vCPU (capacity, load), `vms` how many VMs a load is pinned on."""

    at: float
    kind: ActionKind
    target: str = ""
    cpu: int = 0
    vms: int = 0


@dataclass(frozen=True)
class Campaign:
    name: str
    duration: float
    sample_every: float = 2.0
    testbed: TestbedSpec = field(default_factory=TestbedSpec)
    create: CreateSpec | None = None
    actions: tuple[Action, ...] = ()


@dataclass(frozen=True, order=True)
class Step:
    """What the runner does at `at`: create or destroy VE number `index`, or carry out `action`."""

    at: float
    kind: str
    index: int = 0
    action: Action | None = field(default=None, compare=False)


def ve_name(campaign: Campaign, index: int) -> str:
    return f"{campaign.name}-{index:03d}"


def vm_name(vm: int) -> str:
    return f"vm{vm + 1}"


def web_port(create: CreateSpec, index: int, vm: int) -> int:
    """The host port of VM number `vm` of VE number `index`'s web server: one per VM of the workload, so no two
    VMs on one host ask for the same (`create.web_port` must be set)."""
    assert create.web_port is not None
    return create.web_port + index * create.vms + vm


def ve_spec(campaign: Campaign, index: int) -> dict[str, Any]:
    """The spec (as `VESpec.to_dict` writes one) of VE number `index` of the workload."""
    create = campaign.create
    assert create is not None
    vms = [{"name": vm_name(i), "vcpus": create.vcpus, "memory_mb": create.memory_mb, "disk_gb": create.disk_gb,
            **({"image": create.image} if create.image != "none" else {})} for i in range(create.vms)]
    ha = {"ha": {"mode": create.ha}} if create.ha != "none" else {}
    expose = {"expose": [{"vm": vm_name(i), "port": 80, "host_port": web_port(create, index, i)}
                         for i in range(create.vms)]} if create.web_port is not None else {}
    return {"name": ve_name(campaign, index), "vms": vms, **ha, **expose}


def timeline(campaign: Campaign) -> list[Step]:
    """Every step of the campaign in time order (creations first among steps due at once); none after
    `duration`."""
    steps = [Step(action.at, "action", action=action) for action in campaign.actions]
    if campaign.create is not None:
        for index in range(campaign.create.count):
            due = index / campaign.create.rate
            steps.append(Step(due, "create", index))
            if campaign.create.lifetime is not None:
                steps.append(Step(due + campaign.create.lifetime, "destroy", index))
    order = {"create": 0, "action": 1, "destroy": 2}
    return sorted((s for s in steps if s.at <= campaign.duration), key=lambda s: (s.at, order[s.kind], s.index))
