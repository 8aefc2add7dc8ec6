"""What the cluster benchmarks share: their options, a local cluster that is always stopped, and matplotlib
without a display."""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from discovery.cli import local_cluster as cluster
from overlay.wire import tls


def cluster_parser(doc: str, ves: int, plot: str) -> argparse.ArgumentParser:
    """A parser with the options of a benchmark on a local cluster of VEs; `doc`'s first line describes it."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=12)
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--ves", type=int, default=ves)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--plot", help=plot)
    return parser


@contextlib.contextmanager
def local_cluster(directory: Path, nodes: int, sites: int, **up_args: Any) -> Iterator[tuple[dict[str, Any],
                                                                                           tls.Identity]]:
    """Start `nodes` agents on `sites` sites under `directory/cluster` (`discovery.cli.local_cluster.up`, its
    emulated WAN latency included); yield the cluster state and the operator identity to call agents with. The
    agents are stopped on the way out, whatever happened, also when `up` itself failed after starting them."""
    os.environ["DISCOVERY_HOME"] = str(directory / "home")  # leave the user's client config alone
    where = directory / "cluster"
    try:
        state = cluster.up(where, nodes, sites, **up_args)
        yield state, tls.Identity(cert=where / "operator.pem", key=where / "operator.key", ca=where / "ca" / "ca.pem")
    finally:
        if (where / cluster.STATE_FILE).exists():
            cluster.down(where)


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (PNG files, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
