"""The testbed's plan: every name, address, link and routing rule it owns, computed without touching the system.

Layout (PREFIX is 10.213.0.0/16, nothing of it exists outside the namespaces but the root's one link):

    root ns  dtb-root 10.213.0.1/30 ── dtb-up 10.213.0.2/30 ┐
                                             router ns (ROUTER): forwards, delays, partitions
    site s   bridge br<s> 10.213.<s+1>.254/24 ─┬─ p<i> ══ eth0 of node ns dtb-node<i>: 10.213.<s+1>.<k>/32
                                               └─ ...

A node's address is a /32 whose only route is via its site's router address, so every packet, within a site too,
is forwarded by the router: its policy rules decide what is delayed (inter-site packets go through the TUN
device `dly0` to the relay, `relay.py`) and what is dropped (partitions, rule preferences PARTITION_PREFS).

Every name starts with NAME_PREFIX, so `down` finds leftovers of a crashed testbed by name alone.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from overlay.wire.wan import SITES, rtt_matrix

NAME_PREFIX = "dtb-"
ROUTER = "dtb-router"
ROOT_LINK = "dtb-root"
"""The root namespace's end of its veth to the router (the other end, in ROUTER, is UPLINK)."""
UPLINK = "dtb-up"
TUN = "dly0"
PREFIX = "10.213.0.0/16"
ROOT_ADDR = "10.213.0.1"
ROUTER_UPLINK_ADDR = "10.213.0.2"
ROUTER_HOST = 254
DELAY_TABLE = 100
DELAY_PREFS = range(3000, 3100)
PARTITION_PREFS = range(1000, 2000)
MAX_NODES_PER_SITE = 250
MAX_SITES = 200


class SpecError(ValueError):
    """A one-line reason a testbed spec cannot be built."""


@dataclass(frozen=True)
class Node:
    name: str
    site: int
    """Index into Plan.sites."""
    namespace: str
    address: str
    port: str
    """The router's end of the node's veth (its bridge port)."""


@dataclass(frozen=True)
class Plan:
    sites: tuple[str, ...]
    rtt_ms: tuple[tuple[float, ...], ...]
    """Emulated RTT between sites (index by site), symmetric, 0 on the diagonal."""
    bandwidth_mbit: float
    nodes: tuple[Node, ...]

    def subnet(self, site: int) -> str:
        return f"10.213.{site + 1}.0/24"

    def gateway(self, site: int) -> str:
        return f"10.213.{site + 1}.{ROUTER_HOST}"

    def bridge(self, site: int) -> str:
        return f"br{site}"

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise SpecError(f"no node {name!r} in this testbed ({', '.join(n.name for n in self.nodes)})")

    def site_of(self, address: str) -> int | None:
        """The site whose subnet holds `address` (None: the root's link or outside the testbed)."""
        parts = address.split(".")
        if len(parts) != 4 or parts[:2] != ["10", "213"]:
            return None
        site = int(parts[2]) - 1
        return site if 0 <= site < len(self.sites) else None

    def one_way_s(self, src: str, dst: str) -> float:
        """How long the relay holds a packet from `src` to `dst`: half the sites' RTT (0 within a site)."""
        a, b = self.site_of(src), self.site_of(dst)
        if a is None or b is None or a == b:
            return 0.0
        return self.rtt_ms[a][b] / 2000.0

    def delay_rules(self) -> list[list[str]]:
        """`ip rule add` arguments in the router: packets coming back from the relay and those staying within a
        site or going to the root are routed at once; those between sites go to the relay's TUN."""
        prefs = iter(DELAY_PREFS)
        rules = [["pref", str(next(prefs)), "iif", TUN, "lookup", "main"],
                 ["pref", str(next(prefs)), "to", f"{ROOT_ADDR}/30", "lookup", "main"]]
        for s in range(len(self.sites)):
            rules.append(["pref", str(next(prefs)), "iif", self.bridge(s), "to", self.subnet(s), "lookup", "main"])
        for s in range(len(self.sites)):
            rules.append(["pref", str(next(prefs)), "iif", self.bridge(s), "to", PREFIX,
                          "lookup", str(DELAY_TABLE)])
        return rules

    def partition_rules(self, target: str, oneway: bool, first_pref: int) -> list[list[str]]:
        """`ip rule add` arguments in the router that cut `target` (a node or a site name) from the rest.
        Both ways by default; `oneway`: only what the target sends is dropped (it still hears the others)."""
        if target in self.sites:
            net = self.subnet(self.sites.index(target))
            rules = [["from", net, "to", net, "lookup", "main"], ["from", net, "blackhole"]]
            if not oneway:
                rules.append(["to", net, "blackhole"])
        else:
            addr = f"{self.node(target).address}/32"
            rules = [["from", addr, "blackhole"]] + ([] if oneway else [["to", addr, "blackhole"]])
        if first_pref + len(rules) > PARTITION_PREFS.stop:
            raise SpecError("too many partitions at once; 'testbed heal' first")
        return [["pref", str(first_pref + k), *rule] for k, rule in enumerate(rules)]


def make_plan(nodes: int, sites: list[str], rtt_ms: list[list[float]], bandwidth_mbit: float) -> Plan:
    """Nodes node1..nodeN spread round robin over `sites` (as `discovery cluster up` spreads them)."""
    if not 1 <= len(sites) <= min(nodes, MAX_SITES):
        raise SpecError(f"--sites must be between 1 and {min(nodes, MAX_SITES)}")
    if nodes > MAX_NODES_PER_SITE * len(sites):
        raise SpecError(f"at most {MAX_NODES_PER_SITE} nodes per site")
    if not 0 < bandwidth_mbit <= 10_000:
        raise SpecError("--bandwidth must be between 0 and 10000 Mbit/s")
    n = len(sites)
    if len(rtt_ms) != n or any(len(row) != n for row in rtt_ms):
        raise SpecError(f"the RTT matrix must be {n}x{n}")
    for a in range(n):
        for b in range(n):
            if a != b and not 0 <= rtt_ms[a][b] <= 2000:
                raise SpecError(f"RTT {sites[a]} -> {sites[b]} must be between 0 and 2000 ms, not {rtt_ms[a][b]}")
    matrix = tuple(tuple(0.0 if a == b else (rtt_ms[a][b] + rtt_ms[b][a]) / 2 for b in range(n)) for a in range(n))
    placed = []
    for i in range(nodes):
        site, k = i % n, i // n + 1
        placed.append(Node(f"node{i + 1}", site, f"{NAME_PREFIX}node{i + 1}", f"10.213.{site + 1}.{k}", f"p{i + 1}"))
    for node in placed:
        ipaddress.IPv4Address(node.address)
    return Plan(tuple(sites), matrix, float(bandwidth_mbit), tuple(placed))


def uniform_rtt(sites: int, rtt_ms: float) -> list[list[float]]:
    """`--site-rtt MS`: the same RTT between every two sites."""
    return [[0.0 if a == b else float(rtt_ms) for b in range(sites)] for a in range(sites)]


def within(measured: float, spec: float, tolerance: float = 0.10) -> bool:
    """`testbed validate`'s test: `measured` within ±tolerance of `spec`."""
    return abs(measured - spec) <= tolerance * spec


def site_names(sites: int) -> list[str]:
    """The emulated WAN's site names (overlay.wire.wan.SITES), then site7, site8, ... beyond them."""
    return SITES[:sites] + [f"site{k + 1}" for k in range(len(SITES), sites)]


def default_rtt(names: list[str]) -> list[list[float]]:
    """The RTTs `discovery cluster up` emulates between these sites (wan.SITE_RTT_MS; 20 ms where it has none)."""
    known = rtt_matrix(names)
    return [[0.0 if a == b else known[a].get(b, 20.0) for b in names] for a in names]


def matrix_rtt(matrix: list[list[float]], sites: int) -> list[list[float]]:
    """`--rtt MATRIX`: the first `sites` rows and columns of a measured matrix (vivaldi.sim.load_matrix, in ms;
    the diagonal is ignored)."""
    if len(matrix) < sites:
        raise SpecError(f"the RTT matrix has {len(matrix)} rows, fewer than --sites {sites}")
    rows = [[float(matrix[a][b]) for b in range(sites)] for a in range(sites)]
    if any(rows[a][b] != rows[a][b] for a in range(sites) for b in range(sites) if a != b):
        raise SpecError(f"the RTT matrix has missing values among its first {sites} rows")
    return rows
