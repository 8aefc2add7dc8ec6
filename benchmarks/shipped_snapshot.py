"""Bytes sent and time of a VM's first and incremental shipped snapshots, beside rsync of its qcow2, printed as JSON.

    python benchmarks/shipped_snapshot.py [--fill-mib 512] [--write-mib 10] [--runs 3]

Each run starts 2 real-guest agents on 2 sites (`cluster up --hypervisor qemu`) and creates a one-VM VE through
node1 (the tiny guest on a 1 GiB disk). Its disk is given content: the VE stopped, `--fill-mib` MiB of random
data are written into it past the guest's file system (`qemu-io`), and the VE started again. Then:
- first: `ve ship` — node1 pauses the guest for a copy of its overlay and makes the disk an image in its store,
  node2 (the other site, which holds the tiny image already) pulls the chunks it lacks;
- incremental: the VE stopped, `--write-mib` MiB of random data written at a random offset of that region,
  started, `ve ship` again: node2 holds the first snapshot and fetches what changed.
`sent` is what node2 fetched (zstd chunk frames and the manifest), `seconds` the `ve ship` call's wall time
(image making, pull, catalogue and log writes), `paused` how long the guest was paused. The baseline is
`rsync --no-whole-file --stats` of the VM's qcow2 file (copied aside at each point, the VE stopped) into a
directory: the whole file first, then onto that copy (rsync's delta transfer); `sent` is its "Total bytes
sent", `seconds` its wall time. Everything runs on one machine over loopback: no link is the bottleneck, so
the seconds are what CPU and disks cost.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import cli, guest_dirs, local_cluster, share_images, wait_ready

FIRST_FREE = 64 << 20
"""Where the random data goes: past the tiny guest's 32 MiB file system, so the guest still boots."""


def write_random(disk: Path, offset: int, mib: int, scratch: Path) -> None:
    """`mib` MiB of random bytes at `offset` of the qcow2 `disk` (its VM stopped)."""
    data = scratch / "random.bin"
    data.write_bytes(os.urandom(mib << 20))
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -q -s {data} {offset} {mib << 20}", str(disk)],
                   check=True, capture_output=True)
    data.unlink()


def rsync(source: Path, dest: Path) -> dict[str, float]:
    started = time.perf_counter()
    done = subprocess.run(["rsync", "--no-whole-file", "--stats", str(source), str(dest)],
                          check=True, capture_output=True, text=True)
    sent = re.search(r"Total bytes sent: ([\d,]+)", done.stdout)
    assert sent is not None, done.stdout
    return {"sent": int(sent.group(1).replace(",", "")), "seconds": round(time.perf_counter() - started, 3)}


def restarted(state: dict[str, Any], console: Path) -> None:
    console.unlink(missing_ok=True)
    cli(state, "ve", "start", "shipped")
    wait_ready(console)


def shipped(state: dict[str, Any]) -> dict[str, Any]:
    done = cli(state, "--agent", "node1", "ve", "ship", "shipped")["vms"]["a"]
    return {"sent": sum(done["sent"].values()), "seconds": done["seconds"], "paused": done["paused"],
            "holders": sorted(done["sent"])}


def one_run(directory: Path, fill_mib: int, write_mib: int, rng: random.Random) -> dict[str, Any]:
    with local_cluster(directory, 2, 2, hypervisor="qemu") as (state, _):
        spec = directory / "shipped.yaml"
        spec.write_text("name: shipped\nvms:\n  - {name: a, vcpus: 1, memory_mb: 128, disk_gb: 1, image: tiny}\n")
        host = cli(state, "--agent", "node1", "ve", "create", str(spec))["placement"]["a"]["node"]
        guests = guest_dirs(state)[host]
        disk, console = guests / "shipped--a.qcow2", guests / "shipped--a.log"
        wait_ready(console)
        cli(state, "ve", "stop", "shipped")
        write_random(disk, FIRST_FREE, fill_mib, directory)
        at_first = directory / "first.qcow2"
        shutil.copyfile(disk, at_first)
        restarted(state, console)
        first = shipped(state)
        cli(state, "ve", "stop", "shipped")
        write_random(disk, FIRST_FREE + rng.randrange(0, (fill_mib - write_mib) << 20, 4096), write_mib, directory)
        at_second = directory / "second.qcow2"
        shutil.copyfile(disk, at_second)
        restarted(state, console)
        second = shipped(state)
        mirror = directory / "mirror"
        mirror.mkdir()
        rsync_first = rsync(at_first, mirror / "disk.qcow2")
        rsync_second = rsync(at_second, mirror / "disk.qcow2")
        return {"qcow2_bytes": [at_first.stat().st_size, at_second.stat().st_size],
                "shipped": {"first": first, "incremental": second},
                "rsync": {"first": rsync_first, "incremental": rsync_second}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fill-mib", type=int, default=512)
    parser.add_argument("--write-mib", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if shutil.which("rsync") is None:
        raise SystemExit("rsync is not installed (Debian package rsync; `make deps` installs it)")
    rng = random.Random(args.seed)
    runs = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="shipped-", dir="/var/tmp") as tmp:
            share_images(Path(tmp))
            runs.append(one_run(Path(tmp), args.fill_mib, args.write_mib, rng))

    def median(how: str, case: str, key: str) -> float:
        return statistics.median(run[how][case][key] for run in runs)

    result = {"benchmark": "shipped_snapshot", "disk_gib": 1, "fill_mib": args.fill_mib, "write_mib": args.write_mib,
              "runs": args.runs, "load": os.getloadavg()[0],
              "median": {how: {case: {key: median(how, case, key) for key in ("sent", "seconds")}
                               for case in ("first", "incremental")} for how in ("shipped", "rsync")},
              "paused_s": [run["shipped"][case]["paused"] for run in runs for case in ("first", "incremental")],
              "all": runs}
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
