"""Campaign files: the YAML a researcher writes (examples/campaigns/), validated into a `Campaign` with the VE
spec's one-line errors that name the file, the line and the field (`discovery.yamlfields`).

    name: ci
    testbed: {nodes: 6, sites: 3, site_rtt: 20, bandwidth: 100, hypervisor: test}
    duration: 120s
    sample_every: 1s
    create: {rate: 0.5, count: 60, vms: 2, ha: restart, lifetime: 60s}  # also: via, image, web_port, ...
    actions:
      - {at: 35s, kill: node2}
      - {at: 65s, partition: nancy}
      - {at: 85s, heal: true}

Each action is `at` and one of: `kill: NODE` (its agent, kill -9: with real guests they live on, and with
HA a watcher may start them again elsewhere: see the HA limits in docs/architecture.md), `poweroff: NODE` (its
host: agent, hypervisor and guests), `start: NODE`, `partition: NODE-or-SITE`, `heal: true`,
`capacity: CPU` (every node's CPU as DVMS counts it, percent of one vCPU), `load: CPU` with `vms: N` (the CPU
demand of the first N VMs of the workload: burned inside them when the workload has a `web_port`, else pinned;
see `discovery.campaign.plan`). Whether the nodes and sites named exist (actions, `create.via`) is the
target's to say (`check_targets`), once it is known. `create.image` names an image of the cluster's catalogue:
a testbed of real guests imports the tiny guest as `tiny`; on other hosts, `discovery image import` it first.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from discovery.campaign.plan import ACTIONS, ON_NODES, Action, Campaign, CreateSpec, TestbedSpec
from discovery.ve.spec import DISK_GB_RANGE, HA_MODES, MAX_VMS, MEMORY_MB_RANGE, VCPUS_RANGE
from discovery.yamlfields import FieldError, Fields, check_text, compose, read

MAX_BYTES = 64 * 1024
MAX_DEPTH = 8
MAX_ACTIONS = 1000
DURATION_RANGE = (10, 24 * 3600)
SAMPLE_RANGE = (1, 60)
_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?")
_NAME_RULE = "1-40 characters of a-z, 0-9 or '-', starting and ending with a letter or digit"
_TARGET_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_TARGET_RULE = "a node or site name (1-64 characters of A-Z, a-z, 0-9, '.', '_' or '-')"
_TOP = ("name", "testbed", "duration", "sample_every", "create", "actions")
_TESTBED = ("nodes", "sites", "site_rtt", "bandwidth", "hypervisor", "image_copies")
_CREATE = ("rate", "count", "vms", "vcpus", "memory_mb", "disk_gb", "image", "ha", "lifetime", "via", "web_port")
WEB_PORT_RANGE = (1024, 65535)
_ACTION = ("at", *ACTIONS, "vms")
_IMAGE_RE = re.compile(r"[A-Za-z0-9._:/-]{1,128}")


def parse_campaign(text: str, source: str = "<campaign>") -> Campaign:
    check_text(text, source, MAX_BYTES)
    root = compose(text, source, MAX_DEPTH)
    if root is None:
        raise FieldError(f"{source}: empty document; expected a mapping with keys {', '.join(_TOP)}")
    return _Reader(source).campaign(root)


def load_campaign(path: Path) -> Campaign:
    return parse_campaign(read(path, MAX_BYTES), str(path))


def check_targets(campaign: Campaign, nodes: Iterable[tuple[str, str]]) -> None:
    """FieldError naming `create.via` or the first action whose node (or site, for a partition) is not among
    `nodes` ((name, site) pairs): caught before the run, not halfway through it."""
    names, sites = set(), set()
    for name, site in nodes:
        names.add(name)
        sites.add(site)
    if campaign.create is not None and campaign.create.via and campaign.create.via not in names:
        raise FieldError(f"create.via: no node {campaign.create.via!r} here (nodes: {', '.join(sorted(names))})")
    for index, action in enumerate(campaign.actions):
        known = names | sites if action.kind == "partition" else names
        if action.kind in (*ON_NODES, "partition") and action.target not in known:
            what = "node or site" if action.kind == "partition" else "node"
            raise FieldError(f"actions[{index}].{action.kind}: no {what} {action.target!r} here (nodes: "
                             f"{', '.join(sorted(names))}; sites: {', '.join(sorted(sites))})")


class _Reader(Fields):
    def campaign(self, root: object) -> Campaign:
        fields = self.mapping(root, "", _TOP, required=("name", "duration"))
        duration = self.duration(fields["duration"], "duration", DURATION_RANGE)
        create = self.create(fields["create"]) if "create" in fields else None
        in_guests = create is not None and create.web_port is not None
        return Campaign(
            name=self.text(fields["name"], "name", _NAME_RE, _NAME_RULE),
            duration=float(duration),
            sample_every=float(self.duration(fields["sample_every"], "sample_every", SAMPLE_RANGE)
                               if "sample_every" in fields else 2),
            testbed=self.testbed(fields["testbed"]) if "testbed" in fields else TestbedSpec(),
            create=create,
            actions=self.actions(fields["actions"], duration, in_guests) if "actions" in fields else (),
        )

    def testbed(self, obj: object) -> TestbedSpec:
        fields = self.mapping(obj, "testbed", _TESTBED, required=())
        default = TestbedSpec()
        nodes = self.integer(fields["nodes"], "testbed.nodes", (2, 64)) if "nodes" in fields else default.nodes
        return TestbedSpec(
            nodes=nodes,
            sites=self.integer(fields["sites"], "testbed.sites", (1, nodes)) if "sites" in fields else min(
                default.sites, nodes),
            site_rtt=(self.number(fields["site_rtt"], "testbed.site_rtt", (0.0, 1000.0))
                      if "site_rtt" in fields else default.site_rtt),
            bandwidth=(self.number(fields["bandwidth"], "testbed.bandwidth", (1.0, 10000.0))
                       if "bandwidth" in fields else default.bandwidth),
            hypervisor=(self.choice(fields["hypervisor"], "testbed.hypervisor", ("test", "qemu"))
                        if "hypervisor" in fields else default.hypervisor),
            image_copies=(self.integer(fields["image_copies"], "testbed.image_copies", (1, nodes))
                          if "image_copies" in fields else default.image_copies),
        )

    def create(self, obj: object) -> CreateSpec:
        fields = self.mapping(obj, "create", _CREATE, required=("rate", "count"))

        def whole(key: str, bounds: tuple[int, int], default: int) -> int:
            return self.integer(fields[key], f"create.{key}", bounds) if key in fields else default

        count, vms = self.integer(fields["count"], "create.count", (1, 100_000)), whole("vms", (1, MAX_VMS), 1)
        port = None
        if "web_port" in fields:
            port = self.integer(fields["web_port"], "create.web_port", WEB_PORT_RANGE)
            if "image" not in fields:
                raise self.error(fields["web_port"], "create.web_port", "needs an image whose guests serve port 80 "
                                 "(the testbed's image: tiny)")
            if port + count * vms - 1 > WEB_PORT_RANGE[1]:
                raise self.error(fields["web_port"], "create.web_port", f"{count * vms} VMs need ports {port} to "
                                 f"{port + count * vms - 1}, past {WEB_PORT_RANGE[1]}")
        return CreateSpec(
            rate=self.number(fields["rate"], "create.rate", (0.001, 50.0)),
            count=count,
            vms=vms,
            vcpus=whole("vcpus", VCPUS_RANGE, 1),
            memory_mb=whole("memory_mb", MEMORY_MB_RANGE, 256),
            disk_gb=whole("disk_gb", DISK_GB_RANGE, 1),
            image=self.text(fields["image"], "create.image", _IMAGE_RE, "an image NAME[:TAG]")
            if "image" in fields else "none",
            ha=self.choice(fields["ha"], "create.ha", HA_MODES) if "ha" in fields else "none",
            lifetime=float(self.duration(fields["lifetime"], "create.lifetime", DURATION_RANGE))
            if "lifetime" in fields else None,
            via=self.text(fields["via"], "create.via", _TARGET_RE, _TARGET_RULE) if "via" in fields else "",
            web_port=port,
        )

    def actions(self, obj: object, duration: int, in_guests: bool) -> tuple[Action, ...]:
        items = self.items(obj, "actions", "a list of actions")
        if len(items) > MAX_ACTIONS:
            raise self.error(obj, "actions", f"must list at most {MAX_ACTIONS} actions, got {len(items)}")
        return tuple(self.action(item, f"actions[{index}]", duration, in_guests) for index, item in enumerate(items))

    def action(self, obj: object, path: str, duration: int, in_guests: bool) -> Action:
        """One action; a load burned in guests (`in_guests`) is at most 100 (the tiny guest burns one vCPU)."""
        fields = self.mapping(obj, path, _ACTION, required=("at",))
        at = self.duration(fields["at"], f"{path}.at", (0, duration))
        kinds = [kind for kind in ACTIONS if kind in fields]
        if len(kinds) != 1:
            raise self.error(obj, path, f"must say one action of {', '.join(ACTIONS)}, got "
                             f"{', '.join(kinds) or 'none'}")
        kind = kinds[0]
        value = fields[kind]
        if "vms" in fields and kind != "load":
            raise self.error(fields["vms"], f"{path}.vms", f"only a load is given to VMs, not a {kind}")
        if kind in (*ON_NODES, "partition"):
            return Action(float(at), kind, target=self.text(value, f"{path}.{kind}", _TARGET_RE, _TARGET_RULE))
        if kind == "heal":
            if not self.boolean(value, f"{path}.heal"):
                raise self.error(value, f"{path}.heal", "must be true (heal every partition)")
            return Action(float(at), kind)
        cpu = self.integer(value, f"{path}.{kind}", (1, 100_000) if kind == "capacity" else (
            0, 100 if in_guests else 100_000))
        if kind == "capacity":
            return Action(float(at), kind, cpu=cpu)
        if "vms" not in fields:
            raise self.error(obj, path, "a load needs vms: how many of the workload's first VMs it is given to")
        return Action(float(at), kind, cpu=cpu, vms=self.integer(fields["vms"], f"{path}.vms", (1, 100_000)))
