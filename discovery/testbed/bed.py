"""The testbed's life cycle behind `discovery testbed`: build the plan's namespaces, start the relay and the
agents, cut and heal links, measure them, and tear everything down (also what a crashed run left).

State lives in D/testbed.json (the plan, the relay's PID, the partitions in force) beside `cluster up`'s
D/cluster.json and D/client.toml: the agents are started and stopped by `local_cluster`, in the nodes'
namespaces, so every client command works from the root namespace through its link to the router.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from discovery.cli import local_cluster
from discovery.testbed import hosts, net
from discovery.testbed.plan import (
    DELAY_TABLE,
    NAME_PREFIX,
    PARTITION_PREFS,
    PREFIX,
    ROOT_ADDR,
    ROOT_LINK,
    ROUTER,
    ROUTER_UPLINK_ADDR,
    TUN,
    UPLINK,
    Node,
    Plan,
    SpecError,
    within,
)
from discovery.testbed.relay import COUNTS_FILE, plan_from_state, read_counts

STATE_FILE = "testbed.json"


class TestbedError(Exception):
    """A one-line reason a testbed command could not do what was asked."""


def _load(directory: Path) -> dict[str, Any]:
    try:
        return local_cluster.load_state(directory, "testbed", STATE_FILE)
    except local_cluster.ClusterError as err:
        raise TestbedError(str(err)) from None


def _save(directory: Path, state: dict[str, Any]) -> None:
    (directory / STATE_FILE).write_text(json.dumps(state, indent=2))


def _check_free() -> None:
    """Refuse before anything is built (so the clean-up of a failed `up` never removes another testbed)."""
    if os.geteuid() != 0:
        raise TestbedError("the testbed needs root (network namespaces)")
    if ROUTER in net.namespaces() or Path(f"/sys/class/net/{ROOT_LINK}").exists():
        raise TestbedError(f"a testbed is already up on this machine ({ROUTER}); 'discovery testbed down' first")


def build(plan: Plan) -> None:
    """Namespaces, bridges, veths, shaping and routing of `plan`; the caller removes them if this raises."""
    net.ip("netns", "add", ROUTER)
    r = ROUTER
    for key in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0",
                "net.ipv4.conf.all.send_redirects=0", "net.ipv4.conf.default.send_redirects=0"):
        net.in_ns(r, "sysctl", "-q", "-w", key)
    net.ip("-n", r, "link", "set", "lo", "up")
    net.ip("link", "add", ROOT_LINK, "type", "veth", "peer", "name", UPLINK, "netns", r)
    net.ip("addr", "add", f"{ROOT_ADDR}/30", "dev", ROOT_LINK)
    net.ip("link", "set", ROOT_LINK, "up")
    net.ip("route", "add", PREFIX, "via", ROUTER_UPLINK_ADDR, "dev", ROOT_LINK)
    net.ip("-n", r, "addr", "add", f"{ROUTER_UPLINK_ADDR}/30", "dev", UPLINK)
    net.ip("-n", r, "link", "set", UPLINK, "up")
    for s in range(len(plan.sites)):
        br = plan.bridge(s)
        net.ip("-n", r, "link", "add", br, "type", "bridge")
        net.ip("-n", r, "addr", "add", f"{plan.gateway(s)}/24", "dev", br)
        net.ip("-n", r, "link", "set", br, "up")
    for node in plan.nodes:
        ns, gw = node.namespace, plan.gateway(node.site)
        net.ip("netns", "add", ns)
        net.in_ns(ns, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1")  # IPv4 only: all of it routed
        net.in_ns(ns, "sysctl", "-q", "-w", "net.ipv6.conf.default.disable_ipv6=1")
        net.ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", node.port, "netns", r)
        net.ip("-n", r, "link", "set", node.port, "master", plan.bridge(node.site), "up")
        net.ip("-n", ns, "addr", "add", f"{node.address}/32", "dev", "eth0")
        for dev in ("lo", "eth0"):
            net.ip("-n", ns, "link", "set", dev, "up")
        net.ip("-n", ns, "route", "add", gw, "dev", "eth0", "scope", "link")
        net.ip("-n", ns, "route", "add", "default", "via", gw, "dev", "eth0")
        net.shape(ns, "eth0", plan.bandwidth_mbit)  # the node's uplink
        net.shape(r, node.port, plan.bandwidth_mbit)  # its downlink
    net.ip("-n", r, "tuntap", "add", "dev", TUN, "mode", "tun")
    net.ip("-n", r, "link", "set", TUN, "txqueuelen", "10000", "up")
    net.ip("-n", r, "route", "add", "default", "dev", TUN, "table", str(DELAY_TABLE))
    for rule in plan.delay_rules():
        net.ip("-n", r, "rule", "add", *rule)


def _start_relay(directory: Path) -> int:
    (directory / COUNTS_FILE).unlink(missing_ok=True)  # an earlier testbed's
    with open(directory / "relay.log", "ab") as log:
        proc = subprocess.Popen(["ip", "netns", "exec", ROUTER, sys.executable, "-m", "discovery.testbed.relay",
                                 str(directory / STATE_FILE), str(directory / COUNTS_FILE)],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 10.0  # attached once the TUN has a reader: its carrier comes up
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TestbedError(f"the delay relay exited at start; see {directory / 'relay.log'}")
        if "LOWER_UP" in net.ip("-n", ROUTER, "link", "show", TUN):
            return proc.pid
        time.sleep(0.05)
    raise TestbedError("the delay relay did not attach to its TUN within 10 s")


def up(directory: Path, plan: Plan, hypervisor: str = "test", wait: float = 60.0, bare: bool = False,
       image_copies: int = 3) -> dict[str, Any]:
    """Build the testbed, start its relay and one agent per node; returns the state written to testbed.json.
    `bare`: no agents, but each node a host with an sshd of its own, for a deployment tool (`hosts`).
    `image_copies`: with real guests, how many nodes hold the tiny guest's image at first."""
    if hypervisor not in ("test", "qemu"):
        raise TestbedError(f"--hypervisor must be test or qemu, not {hypervisor!r}")
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    _check_free()
    try:
        build(plan)
        state: dict[str, Any] = {"dir": str(directory), "plan": dataclasses.asdict(plan), "relay_pid": None,
                                 "partitions": []}
        _save(directory, state)
        state["relay_pid"] = _start_relay(directory)
        _save(directory, state)
        if bare:
            sshd = hosts.start(directory, plan)
            state["nodes"] = [{"name": n.name, "site": plan.sites[n.site], "address": n.address, "pid": None,
                               "sshd_pid": sshd[n.name], "namespace": n.namespace} for n in plan.nodes]
            state["inventory"] = str(directory / hosts.INVENTORY)
            _save(directory, state)
            return state
        kind = "qemu-system" if hypervisor == "qemu" else hypervisor  # a node is a host: its own system libvirtd
        cluster = local_cluster.up(directory, len(plan.nodes), len(plan.sites), wait=wait, hypervisor=kind,
                                   netns=[(n.namespace, n.address) for n in plan.nodes], site_names=list(plan.sites),
                                   emulate_wan=False, image_copies=image_copies)
    except BaseException:
        with contextlib.suppress(Exception):
            teardown(directory)
        raise
    pids = {n["name"]: n["pid"] for n in cluster["nodes"]}
    state["nodes"] = [{"name": n.name, "site": plan.sites[n.site], "address": n.address, "pid": pids[n.name],
                       "namespace": n.namespace} for n in plan.nodes]
    state["client_config"] = cluster["client_config"]
    _save(directory, state)
    return state


def teardown(directory: Path | None) -> list[str]:
    """Stop the agents (if `directory` has a cluster), close the SSH connections to bare nodes, and remove every
    namespace and link named NAME_PREFIX*, whatever run made them; returns what was removed."""
    if directory is not None and (directory / local_cluster.STATE_FILE).exists():
        with contextlib.suppress(local_cluster.ClusterError):
            local_cluster.down(directory)
    if directory is not None:
        hosts.close_connections(directory)
    ours = [ns for ns in net.namespaces() if ns.startswith(NAME_PREFIX)]
    net.remove(sorted(ours, key=lambda ns: ns == ROUTER))  # the router last: `remove` goes in reverse
    removed = list(ours)
    if Path(f"/sys/class/net/{ROOT_LINK}").exists():  # gone with the router's end, unless that never moved
        net.ip("link", "del", ROOT_LINK, check=False)
        removed.append(ROOT_LINK)
    if directory is not None:
        with contextlib.suppress(FileNotFoundError):
            (directory / STATE_FILE).unlink()
    return removed


def down(directory: Path) -> list[str]:
    """`teardown` of the testbed in `directory` (its relay and agents end with their namespaces)."""
    directory = directory.resolve()
    _load(directory)
    return teardown(directory)


def leftovers() -> dict[str, list[str]]:
    """What of a testbed is on this machine now: namespaces, the root's link, processes inside namespaces."""
    ours = [ns for ns in net.namespaces() if ns.startswith(NAME_PREFIX)]
    pids = [p for ns in ours for p in net.ip("netns", "pids", ns, check=False).split()]
    links = [ROOT_LINK] if Path(f"/sys/class/net/{ROOT_LINK}").exists() else []
    return {"namespaces": ours, "links": links, "pids": pids}


def partition(directory: Path, target: str, oneway: bool) -> list[list[str]]:
    directory = directory.resolve()
    state = _load(directory)
    plan = plan_from_state(state)
    first = PARTITION_PREFS.start + sum(len(p["rules"]) for p in state["partitions"])
    try:
        rules = plan.partition_rules(target, oneway, first)
    except SpecError as err:
        raise TestbedError(str(err)) from None
    for rule in rules:
        net.ip("-n", ROUTER, "rule", "add", *rule)
    state["partitions"].append({"target": target, "oneway": oneway, "rules": rules})
    _save(directory, state)
    return rules


def heal(directory: Path) -> int:
    directory = directory.resolve()
    state = _load(directory)
    healed = 0
    for part in state["partitions"]:
        for rule in part["rules"]:
            net.ip("-n", ROUTER, "rule", "del", "pref", rule[1], check=False)
            healed += 1
    state["partitions"] = []
    _save(directory, state)
    return healed


def _is_relay(pid: int) -> bool:
    try:
        return b"discovery.testbed.relay" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _relay_packets(directory: Path, router_up: bool) -> dict[str, Any] | None:
    """The relay's counts (at most relay.COUNTS_EVERY old), with what the kernel dropped before the relay could
    read it (`tun_full`: the TUN's queue full, the relay behind); None before the relay first wrote them."""
    counts = read_counts(directory / COUNTS_FILE)
    if counts is not None and router_up:
        link = json.loads(net.ip("-n", ROUTER, "-s", "-j", "link", "show", TUN, check=False) or "[{}]")[0]
        counts["dropped"]["tun_full"] = link.get("stats64", {}).get("tx", {}).get("dropped")
    return counts


def status(directory: Path) -> dict[str, Any]:
    directory = directory.resolve()
    state = _load(directory)
    try:
        agents = {r["name"]: r for r in local_cluster.status(directory)} if "inventory" not in state else {}
    except local_cluster.ClusterError as err:
        raise TestbedError(str(err)) from None
    present = set(net.namespaces())
    relay = state.get("relay_pid")
    none = {"process": "none", "answers": False}  # a bare node: no agent of the testbed's
    nodes = [{**n, "namespace_up": n["namespace"] in present, "process": agents.get(n["name"], none)["process"],
              "answers": agents.get(n["name"], none)["answers"]} for n in state.get("nodes", [])]
    return {"dir": state["dir"], "router_up": ROUTER in present,
            "relay": "running" if relay and _is_relay(relay) else "gone",
            "relay_packets": _relay_packets(directory, ROUTER in present),
            "partitions": [{"target": p["target"], "oneway": p["oneway"]} for p in state["partitions"]],
            "nodes": nodes}


def validate(directory: Path, seconds: float = 2.0, tolerance: float = 0.10) -> dict[str, Any]:
    """Measure RTT (TCP connect to the agent's port, median of 9) and bandwidth (one TCP flow, counted after 20
    RTTs or 1 s) from the first node of each site to the first node of every other site (to the second node within
    a site); compare with the spec, ±tolerance."""
    directory = directory.resolve()
    state = _load(directory)
    plan = plan_from_state(state)
    first: dict[int, Node] = {}
    for node in plan.nodes:
        first.setdefault(node.site, node)
    pairs = []
    for a in range(len(plan.sites)):
        for b in range(len(plan.sites)):
            if a == b and sum(n.site == a for n in plan.nodes) < 2:
                continue
            src = first[a]
            dst = first[b] if a != b else next(n for n in plan.nodes if n.site == b and n is not src)
            rtt = net.connect_rtt_ms(src.namespace, dst.address, local_cluster.NETNS_PORT)
            spec_rtt = plan.rtt_ms[a][b]
            warmup = max(1.0, 20 * spec_rtt / 1000)  # slow start over a long RTT
            mbit = net.throughput([(src.namespace, src.address)], (dst.namespace, dst.address), seconds, warmup)[0]
            pairs.append({"from": plan.sites[a], "to": plan.sites[b], "nodes": [src.name, dst.name],
                          "rtt_ms": round(rtt, 2), "spec_rtt_ms": spec_rtt,
                          "rtt_ok": within(rtt, spec_rtt, tolerance) if spec_rtt else rtt < 1.0,
                          "mbit": mbit, "spec_mbit": plan.bandwidth_mbit,
                          "mbit_ok": within(mbit, plan.bandwidth_mbit, tolerance)})
    return {"tolerance": tolerance, "ok": all(p["rtt_ok"] and p["mbit_ok"] for p in pairs), "pairs": pairs}
