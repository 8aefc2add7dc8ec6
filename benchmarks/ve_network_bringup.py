"""Time to bring a VE network up on a host, per VM created: the data plane's `carry` (bridge, VXLAN device,
forwarding entries, DHCP server), timed inside a network namespace standing for the host, next to the same
commands run without the reconciler.

    sudo python benchmarks/ve_network_bringup.py [--networks 10] [--vms 4] [--remotes 3] [--rounds 3] [--plot out.png]

The host is a fresh network namespace whose underlay is a veth (MTU 1500) to a second one; this script runs
itself again inside it (`ip netns exec`, as the data plane's tests do), with a `DataPlane` and its
`DhcpServers`, and times each `await plane.carry(...)` there. Each round, the host gets `--networks` VE networks'
VMs one after another, `--vms` per network, each segment listing `--remotes` other hosts with one VM each (the
first is the peer namespace, the others unreachable addresses: forwarding entries need no live peer):

- first VM of a network: bridge, VXLAN device, forwarding entries, the gateway's namespace and dnsmasq started;
- next VM of a network: dnsmasq restarted with the new host list;
- idle pass (nothing changed; what the agent's forwarding pass pays every 2 s), after each VM added;
- VM leaves (others stay: dnsmasq restarted), then teardown (the last VM leaves: devices, namespace, dnsmasq).

`carry` returns once dnsmasq is spawned; "DHCP serving" is from the start of the `carry` until the new dnsmasq
listens on UDP 67 (read from its /proc/<pid>/net/udp), when a booting VM's DISCOVER could first be answered.

Baseline, the same work without the reconciler (no reads of what the kernel holds, no plan, no trio): the plan's
own `ip`/`bridge` commands for the segment in one `sh` script, the gateway's namespace in another, dnsmasq
started directly and waited for until it serves; dnsmasq restarted directly for a next VM; and the floor of the
devices and entries, the same commands in one `ip -batch` and one `bridge -batch`.

Prints JSON; nothing here asserts a result. Root only; every namespace made (`bu-<pid>-*`, and the data plane's
own `dvn<vni>.bu-<pid>`) is deleted on the way out, and every process started inside (dnsmasq) dies with the run
there (`ALONE`), whatever happened.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import trio
from harness import pyplot, save  # benchmarks/, beside this
from stats import percentile

from agents.network.dhcp import DhcpServers, Leases, gateway_mac, gateway_port
from agents.network.linux import DataPlane
from agents.network.plan import Seen, Segment, bridge_name, plan, vxlan_name
from discovery.testbed import net

UNDERLAY = "10.250.0"
"""The /24 of the host (.1), its peer namespace (.2) and the unreachable remotes (.3 on)."""
SUBNET = "10.0.0.0/24"
"""Every VE network's subnet (each segment's gateway has a namespace of its own, as with VEs sharing one)."""
VNI = {"dataplane": 1000, "baseline": 2000, "batch": 3000}
"""The first VNI of each kind of run, so that no run meets another's devices."""
KINDS = ("first_vm", "next_vm", "idle", "vm_leaves", "teardown")
SERVING_PATIENCE = 5.0
ALONE = ("unshare", "--pid", "--mount-proc", "--kill-child")
"""The run inside the host as PID 1 of a PID namespace of its own: whatever it started (dnsmasq) dies with it.
Killing by namespace from out here would miss dnsmasq: the data plane's namespaces are mounted only in the
mount namespace `ip netns exec` gives the run (here /run/netns/dvn... is an empty file)."""
Record = dict[str, Any]


def sh(*argv: str, timeout: float = 30) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)}: {(done.stderr.strip().splitlines() or ['failed'])[-1]}")
    return done.stdout


def segment(vni: int, network: int, remotes: int) -> Segment:
    """Network `network`'s segment: each other host with one VM of it."""
    return Segment(vni, {f"{UNDERLAY}.{2 + k}": frozenset({f"02:b2:00:00:{network:02x}:{k:02x}"})
                         for k in range(remotes)})


def vm_mac(network: int, vm: int) -> str:
    return f"02:b1:00:00:{network:02x}:{vm:02x}"


def vm_address(vm: int) -> str:
    return f"10.0.0.{10 + vm}"


def wait_serving(pid: int) -> None:
    """Return once process `pid` (dnsmasq) listens on UDP port 67 in its namespace (blocking: nothing else runs
    here meanwhile)."""
    end = time.perf_counter() + SERVING_PATIENCE
    while time.perf_counter() < end:
        try:
            rows = Path(f"/proc/{pid}/net/udp").read_text().splitlines()[1:]
        except OSError:
            rows = []
        if any(row.split()[1].endswith(":0043") for row in rows):
            return
        time.sleep(0.0005)
    raise SystemExit(f"dnsmasq {pid} not serving DHCP within {SERVING_PATIENCE:g} s")


async def dataplane_round(plane: DataPlane, directory: Path, networks: int, vms: int, remotes: int,
                          round_: int) -> list[Record]:
    """One round of VMs created, then removed, through `plane`; a record per timed `carry`, in order."""
    held: dict[int, dict[str, str]] = {}  # VNI -> this host's VMs: MAC -> address
    records: list[Record] = []

    async def step(kind: str, vni: int) -> None:
        segments = [segment(v, v - VNI["dataplane"], remotes) for v in sorted(held)]
        leases = {v: Leases(SUBNET, dict(hosts)) for v, hosts in held.items()}  # a copy: `held` changes
        start = time.perf_counter()
        commands = await plane.carry(segments, leases)
        record = {"run": "dataplane", "round": round_, "kind": kind, "segments": len(held), "commands": commands,
                  "ms": (time.perf_counter() - start) * 1000}
        if kind in ("first_vm", "next_vm", "vm_leaves"):
            wait_serving(int((directory / f"{vni:06x}.pid").read_text()))
            record["serving_ms"] = (time.perf_counter() - start) * 1000
        records.append(record)

    for network in range(networks):
        vni = VNI["dataplane"] + network
        for vm in range(vms):
            held.setdefault(vni, {})[vm_mac(network, vm)] = vm_address(vm)
            await step("first_vm" if vm == 0 else "next_vm", vni)
            await step("idle", vni)
    for network in range(networks):
        vni = VNI["dataplane"] + network
        for vm in reversed(range(vms)):
            del held[vni][vm_mac(network, vm)]
            if not held[vni]:
                del held[vni]
            await step("vm_leaves" if vni in held else "teardown", vni)
    return records


class ShellNetwork:
    """One VE network's segment made by plain commands, without the reconciler: the baseline."""

    def __init__(self, vni: int, network: int, remotes: int, local: str, tag: str) -> None:
        self.vni, self.network, self.local = vni, network, local
        self.segment = segment(vni, network, remotes)
        self.ns = f"{tag}-gw{vni:06x}"
        self.dnsmasq: subprocess.Popen[bytes] | None = None

    def devices_script(self) -> str:
        """The plan's own commands for this segment on a host that holds nothing yet, one process each."""
        return "set -e\n" + "\n".join(shlex.join(argv) for argv in plan([self.segment], Seen(), self.local, 1500))

    def gateway_script(self) -> str:
        """The gateway's namespace and veth, as `agents.network.dhcp` makes them."""
        port, ns = gateway_port(self.vni), self.ns
        return "\n".join(["set -e", f"ip netns add {ns}", f"ip link add {port} type veth peer eth0 netns {ns}",
                          f"ip link set {port} master {bridge_name(self.vni)} up", f"ip -n {ns} link set lo up",
                          f"ip -n {ns} link set eth0 address {gateway_mac(self.vni)} up",
                          f"ip -n {ns} addr add 10.0.0.1/24 dev eth0"])

    def serve(self, vms: int) -> None:
        """dnsmasq for the first `vms` VMs, started directly (the flags `agents.network.dhcp` gives it), once it
        serves."""
        self.dnsmasq = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
             "--interface=eth0", "--bind-interfaces", "--no-hosts", "--no-resolv", "--leasefile-ro", "--pid-file=",
             "--dhcp-range=10.0.0.0,static,255.255.255.0,12h", "--dhcp-option=option:router,10.0.0.1",
             *(f"--dhcp-host={vm_mac(self.network, vm)},{vm_address(vm)}" for vm in range(vms))],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_serving(self.dnsmasq.pid)

    def end_dnsmasq(self) -> None:
        if self.dnsmasq is not None:
            self.dnsmasq.terminate()
            self.dnsmasq.wait()
            self.dnsmasq = None

    def teardown_script(self) -> str:
        return "\n".join(["set -e", f"ip netns del {self.ns}", f"ip link del {vxlan_name(self.vni)}",
                          f"ip link del {bridge_name(self.vni)}"])


def baseline_round(networks: int, vms: int, remotes: int, local: str, tag: str, round_: int) -> list[Record]:
    """The same VMs created and removed by plain commands (`ShellNetwork`), the first VM's parts timed too; then
    the floor of each segment's devices and entries (`ip -batch`, `bridge -batch`). A record per timed step."""
    records: list[Record] = []

    def done(kind: str, start: float) -> None:
        records.append({"run": "baseline", "round": round_, "kind": kind,
                        "ms": (time.perf_counter() - start) * 1000})

    for network in range(networks):
        shell = ShellNetwork(VNI["baseline"] + network, network, remotes, local, tag)
        try:
            start = part = time.perf_counter()
            sh("sh", "-c", shell.devices_script())
            done("devices_sh", part)
            part = time.perf_counter()
            sh("sh", "-c", shell.gateway_script())
            done("gateway_sh", part)
            part = time.perf_counter()
            shell.serve(1)
            done("dnsmasq_serving", part)
            done("first_vm", start)
            for count in range(2, vms + 1):
                start = time.perf_counter()
                shell.end_dnsmasq()
                shell.serve(count)
                done("next_vm", start)
            start = time.perf_counter()
            shell.end_dnsmasq()
            sh("sh", "-c", shell.teardown_script())
            done("teardown", start)
        finally:
            shell.end_dnsmasq()
        vni = VNI["batch"] + network
        commands = plan([segment(vni, network, remotes)], Seen(), local, 1500)
        start = time.perf_counter()
        for tool in ("ip", "bridge"):
            script = "".join(shlex.join(argv[1:]) + "\n" for argv in commands if argv[0] == tool)
            subprocess.run([tool, "-batch", "-"], input=script, text=True, check=True, timeout=30)
        done("devices_batch", start)
        sh("ip", "link", "del", vxlan_name(vni))
        sh("ip", "link", "del", bridge_name(vni))
    return records


def inside(args: argparse.Namespace) -> None:
    """In the host's namespace: the rounds, the data plane's then the baseline's; the records as JSON."""
    directory = Path(args.directory)
    records: list[Record] = []
    plane = DataPlane(args.local, DhcpServers(directory, args.tag))
    try:
        for round_ in range(args.rounds):
            records += trio.run(dataplane_round, plane, directory, args.networks, args.vms, args.remotes, round_)
            records += baseline_round(args.networks, args.vms, args.remotes, args.local, args.tag, round_)
    finally:
        plane.close()
    json.dump(records, sys.stdout)


def summary(values: list[float]) -> dict[str, Any]:
    return {"count": len(values), "p50_ms": round(percentile(values, 50), 2),
            "p90_ms": round(percentile(values, 90), 2), "max_ms": round(max(values), 2)}


def measure(networks: int, vms: int, remotes: int, rounds: int) -> list[Record]:
    """Build the host and its underlay peer, run the rounds inside the host, delete everything made."""
    tag = f"bu-{os.getpid()}"
    host, peer = f"{tag}-host", f"{tag}-peer"
    made = [peer, host]
    try:
        for ns in made:
            sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", "u0", "netns", host, "mtu", "1500", "type", "veth", "peer", "u0", "netns", peer)
        for ns, address in ((host, f"{UNDERLAY}.1"), (peer, f"{UNDERLAY}.2")):
            sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "u0")
            sh("ip", "-n", ns, "link", "set", "u0", "up")
        with tempfile.TemporaryDirectory(prefix="ve-bringup-") as work:
            out = sh("ip", "netns", "exec", host, *ALONE, sys.executable, __file__, "--inside",
                     "--local", f"{UNDERLAY}.1", "--directory", work, "--tag", tag, "--networks", str(networks),
                     "--vms", str(vms), "--remotes", str(remotes), "--rounds", str(rounds),
                     timeout=120 + 20 * rounds * networks * vms)
        return json.loads(out)
    finally:
        net.remove([*made, *(ns for ns in net.namespaces() if ns.endswith(f".{tag}") or ns.startswith(f"{tag}-gw"))])


def report(records: list[Record], networks: int, vms: int, remotes: int, rounds: int) -> dict[str, Any]:
    by: dict[tuple[str, str], list[Record]] = defaultdict(list)
    for record in records:
        by[record["run"], record["kind"]].append(record)
    dataplane = {kind: {**summary([r["ms"] for r in by["dataplane", kind]]),
                        "commands_p50": percentile([r["commands"] for r in by["dataplane", kind]], 50)}
                 for kind in KINDS}
    serving = {kind: summary([r["serving_ms"] for r in by["dataplane", kind]])
               for kind in ("first_vm", "next_vm", "vm_leaves")}
    idle = defaultdict(list)
    for record in by["dataplane", "idle"]:
        idle[record["segments"]].append(record["ms"])
    return {"benchmark": "ve_network_bringup", "networks": networks, "vms_per_network": vms,
            "remotes_per_segment": remotes, "rounds": rounds, "dataplane_carry": dataplane,
            "dataplane_dhcp_serving": serving,
            "idle_p50_ms_by_segments": {n: round(percentile(ms, 50), 2) for n, ms in sorted(idle.items())},
            "baseline": {kind: summary([r["ms"] for r in rs]) for (run, kind), rs in by.items() if run == "baseline"}}


def plot(path: str, records: list[Record], result: dict[str, Any]) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1.6, 1]})
    rows = [("first VM", "first_vm", "serving_ms"), ("next VM", "next_vm", "serving_ms"), ("idle pass", "idle", None),
            ("teardown", "teardown", None)]
    labels, data, colours = [], [], []
    for label, kind, serving in rows:
        own = [r for r in records if r["run"] == "dataplane" and r["kind"] == kind]
        labels.append(f"{label}\ncarry")
        data.append([r["ms"] for r in own])
        colours.append("tab:blue")
        if serving:
            labels.append(f"{label}\nserving")
            data.append([r[serving] for r in own])
            colours.append("tab:cyan")
        base = [r["ms"] for r in records if r["run"] == "baseline" and r["kind"] == kind]
        if base:
            labels.append(f"{label}\nbaseline")
            data.append(base)
            colours.append("tab:orange")
        if kind == "first_vm":
            labels.append("devices only\nip -batch")
            data.append([r["ms"] for r in records if r["kind"] == "devices_batch"])
            colours.append("tab:olive")
    boxes = left.boxplot(data, patch_artist=True, showfliers=True)
    for box, colour in zip(boxes["boxes"], colours, strict=True):
        box.set_facecolor(colour)
    left.set_xticks(range(1, len(labels) + 1), labels, fontsize=7)
    left.set_ylabel("ms")
    left.set_title("DataPlane.carry, until dnsmasq serves, and plain commands (baseline)", fontsize=9)
    first = [r for r in records if r["run"] == "dataplane" and r["round"] == 0]
    for kind, colour in (("first_vm", "tab:red"), ("next_vm", "tab:blue"), ("idle", "tab:grey"),
                         ("vm_leaves", "tab:green"), ("teardown", "black")):
        points = [(i, r["ms"]) for i, r in enumerate(first) if r["kind"] == kind]
        right.scatter([i for i, _ in points], [ms for _, ms in points], s=12, color=colour, label=kind)
    right.set_xlabel("carry, in order (round 1)")
    right.set_ylabel("ms")
    right.legend(fontsize=7)
    right.set_title("segments held grow, then shrink", fontsize=9)
    fig.suptitle(f"VE network bring-up on a host: {result['networks']} networks x {result['vms_per_network']} VMs, "
                 f"{result['remotes_per_segment']} remote hosts per segment, {result['rounds']} rounds")
    save(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", type=int, default=10)
    parser.add_argument("--vms", type=int, default=4, help="VMs per network")
    parser.add_argument("--remotes", type=int, default=3, help="other hosts in each segment's forwarding entries")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--plot")
    for hidden in ("--local", "--directory", "--tag"):  # this script's own run inside the host's namespace
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        inside(args)
        return
    if os.geteuid() != 0:
        raise SystemExit("needs root: network namespaces (ip netns add)")
    records = measure(args.networks, args.vms, args.remotes, args.rounds)
    result = report(records, args.networks, args.vms, args.remotes, args.rounds)
    print(json.dumps(result, indent=2))
    if args.plot:
        plot(args.plot, records, result)


if __name__ == "__main__":
    main()
