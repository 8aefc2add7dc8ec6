"""Spiral search campaign: recall of the true nearest nodes on a measured RTT matrix, before and after learning.

Every node is an `overlay.spiral.View` and every spiral runs the sans-IO `SpiralSearch` / `answer` code the
agents will run; only the network is simulated (an RPC is a function call that returns the matrix RTT).

What the nodes know. Coordinates come from the production Vivaldi code (`sim_vivaldi.run`: 200 rounds,
32 neighbours), or are given. Every node has measured `BOOTSTRAP` random members (a Vivaldi node has
measured 32 random neighbours; the campaign draws its own set). Its initial view, the closest known nodes
by its oracle plus `far` random ones, comes from one of `INITIAL_VIEWS`:

* ``coordinates`` (what a running agent has): membership gossip carries every member's coordinate, so a
  node knows every member; under ``measured`` it also probes its `view_probes` nearest members by estimate
  (those it has not measured yet: two messages per probe, once per node, reported apart as
  ``view_probes_per_node``), so its view ranks its candidates by what it measured;
* ``random`` (the baseline, a freshly joined node): a node knows only its `BOOTSTRAP` members, no probes.

Three oracles:

* ``vivaldi``: coordinate estimates only, nothing measured anywhere;
* ``measured``: a node ranks by the RTTs it measured itself (its own direction of the matrix), by estimate
  otherwise; the asker times every reply (an RPC is an RTT sample: free); a contacted node measures each
  node of the received spiral view it has not measured yet, then learns: two messages per probe, reported
  as ``learning_probes`` per learning spiral;
* ``rtt``: the true RTT as the oracle, information no node has: the upper bound of the algorithm itself
  (with ``coordinates`` every view then holds the true nearest: the ceiling, not a test of the walk).

What is measured. Recall = |result ∩ true `count` nearest by RTT| / count (the only use of the full matrix),
messages (requests + replies), hops and backtracks per spiral, over `spirals` origins drawn at random once
and reused for every point and oracle. A point is measured with frozen views: contacted nodes answer but
neither learn nor probe, and the origin keeps nothing. Under ``vivaldi`` a point also gives the recall of
the `count` nearest *by estimate*: whether the walk finds what its oracle calls nearest. Learning: a round
is one spiral from every node, in a shuffled order, whose contacted nodes and origin learn; points after
1/8, 1/4 and 1/2 of the first round and after every round. ``estimate_ceiling`` is the recall with no
search at all and every coordinate known, and how many nearest-by-estimate a node would have to measure
to hold 80 % / 95 % of its true nearest.
"""
from __future__ import annotations

import math
import random
import time
from pathlib import Path

import numpy as np

from overlay.spiral import Distance, Entry, SpiralSearch, View, answer, vivaldi_distance
from vivaldi import sim as sim_vivaldi
from vivaldi.coordinate import Coordinate

ORACLES = ("vivaldi", "measured", "rtt")
BOOTSTRAP = 32  # members a node has measured before anything else, as many as the Vivaldi campaign's neighbours
INITIAL_VIEWS = ("coordinates", "random")
VIEW_PROBES = 40  # nearest members by estimate a node probes to build its view ("coordinates")
VIVALDI_ROUNDS, VIVALDI_NEIGHBOURS = 200, 32
TARGETS = {"without_learning": 0.8, "after_learning": 0.95}


class _Nodes:
    """The simulated nodes under one oracle: their views and the RTTs each has measured. `rtt` is the truth
    (symmetrised), `probe[i][j]` what node i measures to j (its own direction of the matrix)."""

    def __init__(self, oracle: str, entries: list[Entry], rtt: list[list[float]], probe: list[list[float]],
                 view_size: int, far: int, rng: random.Random, initial_view: str = "random",
                 view_probes: int = 0) -> None:
        self.oracle, self.entries, self.rtt, self.probe = oracle, entries, rtt, probe
        n = len(entries)
        self.measured: list[dict[str, float]] = [{} for _ in range(n)]
        self.distance = [self._oracle(i) for i in range(n)]
        self.views = []
        self.setup_probes: list[int] = []  # per node: members probed to build its initial view
        for i in range(n):
            others = [j for j in range(n) if j != i]
            peers = rng.sample(others, min(BOOTSTRAP, n - 1))
            known = others if initial_view == "coordinates" else peers
            probed: list[int] = []
            if oracle == "measured":
                self.measured[i].update((str(j), probe[i][j]) for j in peers)
                if initial_view == "coordinates":
                    measured = self.measured[i]
                    by_estimate = sorted(others, key=lambda j: (vivaldi_distance(entries[i], entries[j]), j))
                    probed = [j for j in by_estimate[:view_probes] if str(j) not in measured]
                    measured.update((str(j), probe[i][j]) for j in probed)
            self.setup_probes.append(len(probed))
            view = View(entries[i], self.distance[i], view_size, far, random.Random(rng.random()))
            view.learn(entries[j] for j in known)
            self.views.append(view)

    def _oracle(self, i: int) -> Distance:
        if self.oracle == "vivaldi":
            return vivaldi_distance
        if self.oracle == "rtt":
            return lambda a, b: self.rtt[int(a.name)][int(b.name)]
        me, known = str(i), self.measured[i]

        def measured_or_estimate(a: Entry, b: Entry) -> float:
            rtt = known.get(b.name) if a.name == me else None
            return vivaldi_distance(a, b) if rtt is None else rtt

        return measured_or_estimate

    def spiral(self, origin: int, count: int, n: int, far: int, learn: bool, rng: random.Random) -> dict:
        """One spiral from `origin`; with `learn`, contacted nodes (after their probes) and the origin learn."""
        search = SpiralSearch(self.distance[origin], far, rng)
        search.start(self.entries[origin], count, lambda _: True, n, self.views[origin].entries())
        probes = 0
        while (node := search.next_hop()) is not None:
            j = int(node.name)
            sent = search.spiral_view()
            if learn:
                probes += self._probe(j, sent)
                reply = answer(self.views[j], sent)
            else:
                reply = self.views[j].reply_to(sent)
            timed = None  # the asker times the reply: under `rtt` it reads the truth, under `vivaldi` nothing
            if self.oracle != "vivaldi":
                timed = (self.probe if self.oracle == "measured" else self.rtt)[origin][j]
            if learn and self.oracle == "measured" and timed is not None:
                self.measured[origin][node.name] = timed
            search.on_reply(node, reply, timed)
        if learn:
            self.views[origin].learn(search.spiral_view())
        return {"found": [int(e.name) for e in search.result()], "messages": search.messages, "hops": search.hops,
                "backtracks": search.backtracks, "probes": probes}

    def _probe(self, node: int, spiral_view: list[Entry]) -> int:
        """Under `measured`, the contacted node measures the spiral view's nodes it has not measured yet."""
        if self.oracle != "measured":
            return 0
        known = self.measured[node]
        fresh = [e.name for e in spiral_view if e.name != str(node) and e.name not in known]
        known.update((name, self.probe[node][int(name)]) for name in fresh)
        return len(fresh)


def _nearest(distances: np.ndarray, count: int) -> list[set[int]]:
    """Each row's `count` smallest columns (the diagonal must hold inf)."""
    return [set(row.tolist()) for row in np.argsort(distances, axis=1)[:, :count]]


def _point(nodes: _Nodes, origins: list[int], truths: dict[str, list[set[int]]], count: int, n: int, far: int,
           rng: random.Random) -> dict:
    """Spirals from `origins` with frozen views: mean (and 10th percentile) recall of each truth, cost."""
    runs = [nodes.spiral(o, count, n, far, False, rng) for o in origins]
    out = {}
    for name, truth in truths.items():
        recall = np.array([len(truth[o].intersection(r["found"])) / count for o, r in zip(origins, runs, strict=True)])
        out[name] = float(recall.mean())
        if name == "recall":
            out |= {"recall_p10": float(np.percentile(recall, 10)), "perfect_share": float((recall == 1).mean())}
    return out | {k: float(np.mean([r[k] for r in runs])) for k in ("messages", "hops", "backtracks")}


def _simulate(oracle: str, entries: list[Entry], rtt: list[list[float]], probe: list[list[float]],
              truths: dict[str, list[set[int]]], count: int, view_size: int, far: int, origins: list[int],
              learning_rounds: int, seed: int, initial_view: str = "random", view_probes: int = 0) -> dict:
    """One oracle: a point before learning, after 1/8, 1/4 and 1/2 of the first round, and after each round."""
    rng = random.Random(f"{seed}:{oracle}")
    nodes = _Nodes(oracle, entries, rtt, probe, view_size, far, rng, initial_view, view_probes)
    curve = [{"spirals": 0, **_point(nodes, origins, truths, count, view_size, far, rng)}]
    size = len(entries)
    early = {size // 8, size // 4, size // 2} - {0}
    runs: list[dict] = []
    for r in range(learning_rounds):
        order = list(range(size))
        rng.shuffle(order)
        for k, origin in enumerate(order, 1):
            runs.append(nodes.spiral(origin, count, view_size, far, True, rng))
            if k == size or (r == 0 and k in early):
                curve.append({"spirals": r * size + k, **_point(nodes, origins, truths, count, view_size, far, rng),
                              "learning_messages": float(np.mean([x["messages"] for x in runs])),
                              "learning_probes": float(np.mean([x["probes"] for x in runs]))})
                runs = []
    setup = float(np.mean(nodes.setup_probes))
    return {"curve": curve, "without_learning": curve[0], "after_learning": curve[-1],
            "view_probes_per_node": setup,
            "messages": {"search_without_learning": curve[0]["messages"],
                         "view_probes_once_per_node": 2 * setup,
                         "first_spiral_with_view_probes": curve[0]["messages"] + 2 * setup,
                         "search_after_learning": curve[-1]["messages"]},
            "meets_targets": {"without_learning": curve[0]["recall"] >= TARGETS["without_learning"],
                              "after_learning": curve[-1]["recall"] >= TARGETS["after_learning"]}}


def _estimate_ceiling(est: np.ndarray, meas: np.ndarray, truth: list[set[int]], count: int) -> dict:
    """Recall if every node knew every coordinate and took its `count` nearest by estimate (no search at all),
    how many nearest-by-estimate it would have to measure to hold 80 % / 95 % of the true ones, and the
    estimates' median relative error on the true nearest pairs."""
    rank = np.argsort(np.argsort(est, axis=1), axis=1)  # rank[i, j]: position of j in i's estimate order
    pairs = [(i, j) for i in range(len(est)) for j in sorted(truth[i])]
    ranks = np.sort(np.array([rank[i, j] for i, j in pairs]).reshape(len(est), count), axis=1)
    return {"recall": float(np.mean(ranks < count)),
            **{f"measure_for_{round(q * 100)}pct": float(np.mean(ranks[:, math.ceil(q * count) - 1] + 1))
               for q in (0.8, 0.95)},
            "median_error_on_true_nearest": float(np.median([abs(est[i, j] - meas[i, j]) / meas[i, j]
                                                             for i, j in pairs]))}


def run(matrix_path: str, count: int = 10, view_size: int = 16, far: int = 4, spirals: int = 200,
        learning_rounds: int = 4, seed: int = 1, coordinates: list | None = None,
        initial_view: str = "coordinates", view_probes: int = VIEW_PROBES, unit: str | None = None) -> dict:
    """The campaign on one matrix (in `unit`: see `vivaldi.sim.load_matrix`). `coordinates` are wire-format
    Vivaldi coordinates (as `sim_vivaldi.run` returns them); None runs Vivaldi first. The spiral keeps
    n = `view_size` near nodes. `initial_view` is one of `INITIAL_VIEWS`; under ``coordinates`` a node
    probes its `view_probes` nearest by estimate."""
    if initial_view not in INITIAL_VIEWS:
        raise ValueError(f"initial view must be one of {', '.join(INITIAL_VIEWS)}")
    if view_probes < 0:
        raise ValueError("view probes must be >= 0")
    start = time.perf_counter()
    raw = sim_vivaldi.load_matrix(matrix_path, unit)
    meas = sim_vivaldi.symmetrise(raw)
    n = len(meas)
    if not 1 <= count < n:
        raise ValueError(f"count must be in [1, {n - 1}]")
    vivaldi = None
    if coordinates is None:
        vivaldi = sim_vivaldi.run(raw, VIVALDI_ROUNDS, VIVALDI_NEIGHBOURS, seed)
        coordinates = vivaldi["coordinates"]
    coords = [c for c in map(Coordinate.from_wire, coordinates) if c is not None]
    if len(coords) != n or len(coords) < len(coordinates):
        raise ValueError(f"need {n} valid coordinates, one per node of the matrix")
    rtt = np.where(np.isnan(meas), np.inf, meas)
    probe = np.where(np.isnan(raw), rtt, raw).tolist()  # a direction not measured: the other one
    est = sim_vivaldi.estimates(coords)
    np.fill_diagonal(est, np.inf)
    truth = _nearest(rtt, count)
    entries = [Entry(str(i), coord=c) for i, c in enumerate(coords)]
    origins = random.Random(seed).sample(range(n), min(spirals, n))
    oracles = {}
    for oracle in ORACLES:  # under vivaldi, also: does the walk find what the estimates call nearest?
        truths = {"recall": truth} | ({"recall_of_estimate_nearest": _nearest(est, count)} if oracle == "vivaldi"
                                      else {})
        oracles[oracle] = _simulate(oracle, entries, rtt.tolist(), probe, truths, count, view_size, far, origins,
                                    learning_rounds, seed, initial_view, view_probes)
    return {
        "matrix": str(matrix_path), "nodes": n, "count": count, "view_size": view_size, "far": far,
        "spirals": len(origins), "learning_rounds": learning_rounds, "seed": seed, "bootstrap": BOOTSTRAP,
        "initial_view": initial_view, "view_probes": view_probes if initial_view == "coordinates" else 0,
        "vivaldi": None if vivaldi is None else {k: vivaldi[k] for k in ("rounds", "neighbours",
                                                                         "median_relative_error")},
        "targets": TARGETS,
        "estimate_ceiling": _estimate_ceiling(est, rtt, truth, count),
        "oracles": oracles,
        "seconds": round(time.perf_counter() - start, 1),
    }


def _initial(result: dict) -> str:
    """How the initial views were built, in a few words."""
    if result.get("initial_view", "random") == "random":
        return f"initial view: {result['bootstrap']} random"
    return f"initial view: coordinates + {result['view_probes']} probes"


def plot(result: dict, path: str) -> None:
    """Left: recall vs spirals run so far (the learning curve) per oracle, targets dashed. Right: messages per
    spiral (search), learning probes per spiral and, at 0, the view probes each node made once, per oracle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for name, res in result["oracles"].items():
        x = [p["spirals"] for p in res["curve"]]
        line, = left.plot(x, [p["recall"] for p in res["curve"]], marker="o", label=name)
        right.plot(x, [p["messages"] for p in res["curve"]], marker="o", color=line.get_color(),
                   label=f"{name}: search messages")
        if any(p.get("learning_probes") for p in res["curve"]):
            right.plot(x[1:], [2 * p["learning_probes"] for p in res["curve"][1:]], ls=":", marker="x",
                       color=line.get_color(), label=f"{name}: learning probe messages (since previous point)")
        if res.get("view_probes_per_node"):
            right.plot([0], [2 * res["view_probes_per_node"]], ls="", marker="s", color=line.get_color(),
                       label=f"{name}: view probe messages per node, once")
    for name, target in result["targets"].items():
        left.axhline(target, ls="--", color="grey", lw=0.8)
        left.annotate(f"target {name.replace('_', ' ')}", (0, target), fontsize=8, va="bottom")
    left.axhline(result["estimate_ceiling"]["recall"], ls=":", color="black", lw=0.8)
    left.annotate("every coordinate known, top by estimate", (0, result["estimate_ceiling"]["recall"]),
                  fontsize=8, va="bottom")
    left.set(xlabel="learning spirals run so far", ylabel=f"recall of the true {result['count']} nearest",
             ylim=(0, 1.02))
    left.set_title(f"{Path(result['matrix']).name}: spiral recall\n(view {result['view_size']}+{result['far']}, "
                   f"{_initial(result)}, {result['spirals']} origins)", fontsize=10)
    right.set(xlabel="learning spirals run so far", ylabel="messages per spiral", yscale="log",
              title="cost")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
