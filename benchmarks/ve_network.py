"""A VE network on the testbed: the overlay's cost against the hosts' own link, and connectivity through a live
relocation.

    sudo python benchmarks/ve_network.py [--site-rtt 10] [--bandwidth 100] [--seconds 10] [--plot out.png]

(needs iperf3: `apt-get install iperf3`).

Three nodes on three sites (`discovery testbed`, real guests under QEMU): a VE of two tiny guests, `a` and `b`,
on two nodes; each gets its address by DHCP from its host. Two probes, network namespaces whose veth joins the
VE network's bridge on a's and b's hosts (as a guest's tap does: the same bridge, VXLAN device and underlay,
without the guest's virtio and TCG), give the overlay's figures next to the hosts' own (the nodes' namespaces,
over the same router and HTB-limited links):

- RTT (ping, 100 samples every 20 ms): probe to probe, and node to node; also probe a to guest b (TCG);
- throughput (iperf3 TCP, `--seconds`): probe to probe, and node to node;
- a live relocation of `b` to the third node while probe a pings it every 10 ms: the longest gap between two
  replies, and the replies lost.

Prints JSON; nothing here asserts a result.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness import cli, guest_dirs, pyplot, save, testbed  # benchmarks/, beside this

from agents.network.plan import bridge_name
from discovery.testbed.net import join_segment
from images import tinyguest

NODES = ("node1", "node2", "node3")


def run(*argv: str, timeout: float = 120) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)}: {(done.stderr.strip().splitlines() or ['failed'])[-1]}")
    return done.stdout


@contextlib.contextmanager
def probe(name: str, node: str, vni: int, address: str) -> Iterator[str]:
    """Namespace `name` on node `node`'s segment `vni`, with `address`/24."""
    run("ip", "netns", "add", name)
    try:
        join_segment(f"dtb-{node}", bridge_name(vni), name, f"{address}/24")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def rtt(ns: str, target: str, count: int = 100) -> dict[str, float]:
    out = run("ip", "netns", "exec", ns, "ping", "-c", str(count), "-i", "0.02", "-W", "2", target, timeout=120)
    samples = [float(m) for m in re.findall(r"time=([0-9.]+) ms", out)]
    return {"p50_ms": round(statistics.median(samples), 3), "mean_ms": round(statistics.fmean(samples), 3),
            "replies": len(samples), "sent": count}


def throughput(server_ns: str, client_ns: str, address: str, seconds: float) -> float:
    """Mbit/s iperf3 carried over TCP from the client's namespace to the server's."""
    server = subprocess.Popen(["ip", "netns", "exec", server_ns, "iperf3", "-s", "-1"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        out = json.loads(run("ip", "netns", "exec", client_ns, "iperf3", "-c", address, "-t", str(seconds), "-J",
                             timeout=seconds + 60))
        return round(out["end"]["sum_received"]["bits_per_second"] / 1e6, 1)
    finally:
        server.kill()
        server.wait()


def gap_during(ns: str, target: str, action: Any) -> dict[str, Any]:
    """Ping `target` every 10 ms from `ns` while `action()` runs: the longest gap between two replies, and the
    echo requests that got none (ping's own count)."""
    pinger = subprocess.Popen(["ip", "netns", "exec", ns, "ping", "-D", "-i", "0.01", "-W", "1", target],
                              stdout=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(pinger.stdout or []))
    reader.start()
    time.sleep(1)
    result = action()
    time.sleep(3)
    pinger.send_signal(signal.SIGINT)  # ping prints its count as it ends
    reader.join()
    replies = [float(m.group(1)) for line in lines if (m := re.match(r"\[([0-9.]+)\].*time=", line))]
    count = next((m for line in lines if (m := re.search(r"([0-9]+) packets transmitted, ([0-9]+) received", line))),
                 None)
    gaps = [b - a for a, b in zip(replies, replies[1:], strict=False)]
    return {"longest_gap_s": round(max(gaps, default=0.0), 3), "sent": int(count.group(1)) if count else None,
            "lost": int(count.group(1)) - int(count.group(2)) if count else None, "action": result}


def measure(work: Path, site_rtt: float, bandwidth: float, seconds: float) -> dict[str, Any]:
    if shutil.which("iperf3") is None:
        raise SystemExit("iperf3 is missing: apt-get install iperf3")
    with testbed(work, 3, 3, bandwidth, site_rtt, hypervisor="qemu") as (state, _):
        spec = work / "net.yaml"
        tiny = "vcpus: 1, memory_mb: 128, disk_gb: 1, image: tiny"
        spec.write_text(f"name: net\nvms:\n  - {{name: a, {tiny}}}\n  - {{name: b, {tiny}}}\n"
                        "constraints: {anti_affinity: [[a, b]]}\n")
        ve = cli(state, "--agent", "node1", "ve", "create", str(spec))
        vni = ve["networks"]["default"]["vni"]
        hosts = {vm: slot["node"] for vm, slot in ve["placement"].items()}
        address = {vm: nics[0]["address"] for vm, nics in ve["nics"].items()}
        consoles = guest_dirs(state)
        for vm in ("a", "b"):
            console = consoles[hosts[vm]] / f"net--{vm}.log"
            end = time.monotonic() + 240
            while tinyguest.NET not in (console.read_text(errors="replace") if console.exists() else ""):
                if time.monotonic() > end:
                    raise SystemExit(f"net/{vm} got no address within 240 s")
                time.sleep(0.2)
        nodes = {slot["node"]: slot["addr"].rpartition(":")[0] for slot in ve["placement"].values()}
        third = next(n for n in NODES if n not in hosts.values())
        with (probe("dvp-pa01", hosts["a"], vni, "10.0.0.250") as pa,
              probe("dvp-pb01", hosts["b"], vni, "10.0.0.251") as pb):
            result = {
                "rtt": {"probe_to_probe": rtt(pa, "10.0.0.251"),
                        "node_to_node": rtt(f"dtb-{hosts['a']}", nodes[hosts["b"]]),
                        "probe_to_guest": rtt(pa, address["b"])},
                "throughput_mbit": {"probe_to_probe": throughput(pb, pa, "10.0.0.251", seconds),
                                    "node_to_node": throughput(f"dtb-{hosts['b']}", f"dtb-{hosts['a']}",
                                                               nodes[hosts["b"]], seconds)},
            }
            relocation = gap_during(pa, address["b"], lambda: cli(
                state, "--agent", third, "ve", "relocate", "net", "--vm", "b", "--to", third
            )["placement"]["b"]["transfer"])
        result["relocation"] = relocation
        return {"site_rtt_ms": site_rtt, "bandwidth_mbit": bandwidth, **result}


def plot(path: str, result: dict[str, Any]) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    rtts = result["rtt"]
    left.bar(["node to node", "VM net: probe to probe", "probe to guest (TCG)"],
             [rtts["node_to_node"]["p50_ms"], rtts["probe_to_probe"]["p50_ms"], rtts["probe_to_guest"]["p50_ms"]])
    left.set_ylabel("RTT p50 (ms)")
    left.tick_params(axis="x", labelrotation=15)
    tput = result["throughput_mbit"]
    right.bar(["node to node", "VM net: probe to probe"], [tput["node_to_node"], tput["probe_to_probe"]])
    right.set_ylabel("TCP throughput (Mbit/s)")
    fig.suptitle(f"VE network overlay, {result['site_rtt_ms']:g} ms between sites, {result['bandwidth_mbit']:g} Mbit/s")
    save(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site-rtt", type=float, default=10.0)
    parser.add_argument("--bandwidth", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--plot")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ve-network-") as work:
        result = {"benchmark": "ve_network", **measure(Path(work), args.site_rtt, args.bandwidth, args.seconds)}
    print(json.dumps(result, indent=2))
    if args.plot:
        plot(args.plot, result)


if __name__ == "__main__":
    main()
