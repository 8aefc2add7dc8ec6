"""Spiral search on synthetic metric spaces (points in the plane, Euclidean distance): exact answers where the
space is fully known, the walk's properties (order, termination, no revisit) on arbitrary spaces, failures,
the far entries that keep a walk from getting stuck, and learning. Plus a smoke run of the campaign."""

from __future__ import annotations

import gzip
import math
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.sim import spiral as sim_spiral
from overlay.spiral import Entry, SpiralSearch, View, answer, vivaldi_distance
from vivaldi.coordinate import Coordinate


def euclid(a: Entry, b: Entry) -> float:
    return math.dist(a.coord, b.coord)


def points(xy: list[tuple[float, float]]) -> list[Entry]:
    return [Entry(f"n{i}", f"10.0.0.{i}:4000", (float(x), float(y))) for i, (x, y) in enumerate(xy)]


def random_points(n: int, seed: int) -> list[Entry]:
    rng = random.Random(seed)
    return points([(rng.random(), rng.random()) for _ in range(n)])


def nearest(nodes: list[Entry], origin: Entry, count: int) -> list[str]:
    others = [e for e in nodes if e.name != origin.name]
    return [e.name for e in sorted(others, key=lambda e: (euclid(origin, e), e.name))[:count]]


def make_views(nodes: list[Entry], size: int, far: int, known: int, seed: int) -> dict[str, View]:
    """Each node starts from `known` random others (what a fresh node could know)."""
    rng = random.Random(seed)
    views = {}
    for e in nodes:
        view = View(e, euclid, size, far, random.Random(rng.random()))
        view.learn(rng.sample([o for o in nodes if o.name != e.name], min(known, len(nodes) - 1)))
        views[e.name] = view
    return views


class Trace:
    """What the shell saw: the hops in order with their keys, and the names each reply brought."""

    def __init__(self) -> None:
        self.hops: list[Entry] = []
        self.keys: list[float] = []
        self.replies: list[set[str]] = []


def drive(search: SpiralSearch, views: dict[str, View], learn: bool = True, failed: frozenset[str] = frozenset(),
          limit: int = 10_000) -> Trace:
    """The I/O shell, as a function call per RPC; a failed node's view is never consulted."""
    trace = Trace()
    while (node := search.next_hop()) is not None:
        assert len(trace.hops) < limit, "the spiral does not terminate"
        trace.hops.append(node)
        trace.keys.append(search.key(node))
        if node.name in failed:
            search.on_failure(node)
            views[search.origin.name].forget(node.name)
            trace.replies.append(set())
            continue
        sent = search.spiral_view()
        reply = answer(views[node.name], sent) if learn else views[node.name].reply_to(sent)
        trace.replies.append({e.name for e, _ in reply})
        search.on_reply(node, reply)
    return trace


def spiral(views: dict[str, View], origin: Entry, count: int, n: int, far: int = 2, learn: bool = True,
           predicate: Callable[[Entry], bool] = lambda e: True,
           failed: frozenset[str] = frozenset()) -> tuple[SpiralSearch, Trace]:
    search = SpiralSearch(euclid, far, random.Random(7))
    search.start(origin, count, predicate, n, views[origin.name].entries())
    return search, drive(search, views, learn, failed)


# --------------------------------------------------------------------------------------------------------
# View


def test_view_keeps_the_closest_and_rotates_far_entries() -> None:
    nodes = points([(i, 0) for i in range(30)])
    view = View(nodes[0], euclid, size=4, far=2, rng=random.Random(1))
    view.learn(nodes)
    assert [e.name for e in view.near] == ["n1", "n2", "n3", "n4"]
    assert len(view.far) == 2 and not {e.name for e in view.far} & {"n0", "n1", "n2", "n3", "n4"}
    seen = set()
    for _ in range(50):
        view.learn(nodes)
        seen |= {e.name for e in view.far}
        assert [e.name for e in view.near] == ["n1", "n2", "n3", "n4"]
    assert len(seen) > 2  # one far slot changes per learn


def test_view_prefers_higher_sequence_and_forgets() -> None:
    me, other = Entry("a", coord=(0.0, 0.0)), Entry("b", coord=(5.0, 0.0))
    view = View(me, euclid, size=2, far=0)
    view.learn([other, Entry("a", coord=(9.0, 9.0), seq=99)])
    view.learn([Entry("b", coord=(1.0, 0.0), seq=0)])  # not newer: ignored
    assert view.near == [other]
    view.learn([Entry("b", coord=(1.0, 0.0), seq=1)])
    assert view.near[0].coord == (1.0, 0.0)
    view.forget("b")
    assert view.entries() == []


def test_answer_replies_with_what_the_asker_lacks_then_learns() -> None:
    nodes = points([(0, 0), (1, 0), (10, 0), (20, 0), (2, 0)])
    view = View(nodes[1], euclid, size=2, far=0)
    view.learn([nodes[2], nodes[3]])
    reply = answer(view, [nodes[0], nodes[3], nodes[4]])
    assert reply == [(nodes[2], 9.0)]  # nodes[3] was in the spiral view; distances are the replier's
    assert {e.name for e in view.near} == {"n0", "n4"}


def test_vivaldi_distance_is_the_coordinate_estimate() -> None:
    a = Coordinate((0.01, 0.0), 0.2, 0.001, 0.002)
    b = Coordinate((0.0, 0.03), 0.2, -0.0005, 0.001)
    assert vivaldi_distance(Entry("a", coord=a), Entry("b", coord=b)) == a.distance_to(b)
    with pytest.raises(TypeError):
        vivaldi_distance(Entry("a", coord=(0, 0)), Entry("b", coord=b))


# --------------------------------------------------------------------------------------------------------
# Exact answers and the protocol


@pytest.mark.parametrize("seed", range(5))
def test_fully_known_space_gives_the_exact_nearest_in_dijkstra_order(seed: int) -> None:
    nodes = random_points(40, seed)
    views = make_views(nodes, size=39, far=0, known=39, seed=seed)
    origin = nodes[seed]
    search, trace = spiral(views, origin, count=8, n=10)
    assert [e.name for e in search.result()] == nearest(nodes, origin, 8)
    assert trace.keys == sorted(trace.keys) and search.backtracks == 0
    assert [e.name for e in trace.hops] == nearest(nodes, origin, 10)  # settles n, not more
    assert search.messages == 2 * search.hops == 20


def test_failed_nodes_are_skipped_never_retried_and_never_returned() -> None:
    nodes = random_points(30, 3)
    views = make_views(nodes, size=29, far=0, known=29, seed=3)
    origin = nodes[0]
    failed = frozenset(nearest(nodes, origin, 3))
    search, trace = spiral(views, origin, count=5, n=5, failed=failed)
    live = [e for e in nodes if e.name not in failed]
    assert [e.name for e in search.result()] == nearest(live, origin, 5)
    assert search.failures == 3 and search.messages == 2 * search.hops - 3
    assert len({e.name for e in trace.hops}) == len(trace.hops)
    assert not failed & {e.name for e in views[origin.name].entries()}  # the shell forgot them


def test_measured_rtt_replaces_the_estimate_and_path_bounds_lower_it() -> None:
    me, a, b = Entry("me", coord=(0.0, 0.0)), Entry("a", coord=(1.0, 0.0)), Entry("b", coord=(50.0, 0.0))
    search = SpiralSearch(euclid, far=0)
    search.start(me, count=2, predicate=lambda e: True, n=2, known=[a, b])
    assert search.next_hop() == a
    search.on_reply(a, [(b, 2.0)], rtt=3.0)  # b is really close to a: the estimate (50) was wrong
    assert search.key(a) == 3.0 and search.key(b) == 5.0
    assert search.next_hop() == b
    search.on_reply(b, [], rtt=2.5)
    assert search.result() == [b, a] and search.next_hop() is None


def test_protocol_misuse_is_refused() -> None:
    nodes = points([(0, 0), (1, 0), (2, 0)])
    search = SpiralSearch(euclid)
    with pytest.raises(ValueError):
        search.start(nodes[0], count=0, predicate=lambda e: True, n=2, known=nodes)
    search.start(nodes[0], count=1, predicate=lambda e: True, n=2, known=nodes)
    hop = search.next_hop()
    with pytest.raises(RuntimeError):
        search.next_hop()
    with pytest.raises(ValueError):
        search.on_reply(nodes[2], [])
    search.on_reply(hop, [])


def test_far_entries_keep_the_walk_from_getting_stuck() -> None:
    """Only the remote cluster satisfies the predicate; every near entry of every local view is local."""
    local = points([(i % 5, i // 5) for i in range(20)])
    remote = [Entry(f"r{i}", coord=(1000.0 + i, 0.0)) for i in range(5)]
    predicate = lambda e: e.name.startswith("r")  # noqa: E731
    found = {}
    for far in (0, 1):
        views = {e.name: View(e, euclid, size=6, far=far, rng=random.Random(1)) for e in local + remote}
        for e in local:
            views[e.name].learn(local)
        for e in remote:
            views[e.name].learn(remote)
        if far:
            views["n0"].far = [remote[0]]
        search, _ = spiral(views, local[0], count=3, n=6, far=far, predicate=predicate)
        found[far] = [e.name for e in search.result()]
    assert found == {0: [], 1: ["r0", "r1", "r2"]}


# --------------------------------------------------------------------------------------------------------
# Properties on arbitrary spaces and views


@st.composite
def scenarios(draw: st.DrawFn) -> dict:
    size = draw(st.integers(2, 40))
    xy = draw(st.lists(st.tuples(st.integers(0, 60), st.integers(0, 60)), min_size=size, max_size=size))
    return {
        "nodes": points(xy),  # integer points: ties and collinear triples included
        "view": draw(st.integers(1, 8)), "far": draw(st.integers(0, 3)), "known": draw(st.integers(1, 12)),
        "n": draw(st.integers(1, 10)), "count": draw(st.integers(1, 6)), "seed": draw(st.integers(0, 2**16)),
        "origin": draw(st.integers(0, size - 1)),
        "failed": draw(st.sets(st.integers(0, size - 1), max_size=size // 3)),
        "matching": draw(st.sets(st.integers(0, size - 1))),
        "learn": draw(st.booleans()),
    }


@settings(max_examples=150, deadline=None)
@given(scenarios())
def test_walk_properties(s: dict) -> None:
    nodes = s["nodes"]
    views = make_views(nodes, s["view"], s["far"], s["known"], s["seed"])
    origin = nodes[s["origin"]]
    failed = frozenset(nodes[i].name for i in s["failed"]) - {origin.name}
    matching = {nodes[i].name for i in s["matching"]}
    search, trace = spiral(views, origin, s["count"], s["n"], s["far"], s["learn"],
                           lambda e: e.name in matching, failed)
    names = [e.name for e in trace.hops]
    # termination, no revisit, never the origin
    assert len(names) == len(set(names)) <= len(nodes) - 1 and origin.name not in names
    assert search.next_hop() is None
    # what is monotonic: a hop nearer than the previous one was named by the previous reply
    decreases = [i for i in range(1, len(names)) if trace.keys[i] < trace.keys[i - 1]]
    assert search.backtracks == len(decreases)
    assert all(names[i] in trace.replies[i - 1] for i in decreases)
    # keys are the distances (path bounds never beat the direct distance in a metric space)
    assert all(math.isclose(k, euclid(origin, h), abs_tol=1e-9) for k, h in zip(trace.keys, trace.hops, strict=True))
    # the result: answered, matching, nearest first, at most count
    result = search.result()
    assert len(result) <= s["count"] and not failed & {e.name for e in result}
    assert all(e.name in matching and e.name in names for e in result)
    assert [search.key(e) for e in result] == sorted(search.key(e) for e in result)
    assert search.hops == len(names) and search.messages == 2 * search.hops - search.failures


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 30), st.integers(1, 8), st.integers(0, 2**16))
def test_fully_known_space_is_exact_for_any_count(size: int, count: int, seed: int) -> None:
    nodes = random_points(size, seed)
    views = make_views(nodes, size - 1, 0, size - 1, seed)
    origin = nodes[seed % size]
    search, trace = spiral(views, origin, count, n=count)
    assert [e.name for e in search.result()] == nearest(nodes, origin, count)
    assert trace.keys == sorted(trace.keys)


# --------------------------------------------------------------------------------------------------------
# Learning


def recall(nodes: list[Entry], views: dict[str, View], count: int, n: int) -> float:
    """Mean recall of the true `count` nearest over every origin, with frozen views."""
    hits = 0
    for origin in nodes:
        search, _ = spiral(views, origin, count, n, learn=False)
        hits += len(set(nearest(nodes, origin, count)) & {e.name for e in search.result()})
    return hits / (count * len(nodes))


def test_learning_improves_recall() -> None:
    nodes = random_points(200, 0)
    views = make_views(nodes, size=8, far=2, known=10, seed=0)
    before = recall(nodes, views, count=5, n=8)
    rng = random.Random(0)
    for _ in range(2):  # two rounds: every node starts one spiral per round
        for origin in rng.sample(nodes, len(nodes)):
            search, _ = spiral(views, origin, count=5, n=8)
            views[origin.name].learn(search.spiral_view())
    after = recall(nodes, views, count=5, n=8)
    assert before < 0.6 and after >= 0.97  # measured 0.447 -> 1.0


# --------------------------------------------------------------------------------------------------------
# Campaign


def test_campaign_smoke(tmp_path: Path) -> None:
    """A 40-node plane in milliseconds through the whole campaign, Vivaldi included; the exact oracle learns."""
    rng = random.Random(2)
    xy = [(rng.uniform(0, 100), rng.uniform(0, 100)) for _ in range(40)]
    path = tmp_path / "plane.tsv.gz"
    with gzip.open(path, "wt") as f:
        for p in xy:
            f.write("\t".join(f"{math.dist(p, q) + 1.0 if p != q else 0.0:.3f}" for q in xy) + "\n")
    result = sim_spiral.run(str(path), count=3, view_size=4, far=1, spirals=20, learning_rounds=2, seed=1)
    assert set(result["oracles"]) == set(sim_spiral.ORACLES) and result["vivaldi"]["rounds"] == 200
    for res in result["oracles"].values():
        assert [p["spirals"] for p in res["curve"]] == [0, 5, 10, 20, 40, 80]
        assert all(0 <= p["recall"] <= 1 and math.isclose(p["messages"], 2 * p["hops"]) for p in res["curve"])
    assert result["oracles"]["rtt"]["after_learning"]["recall"] >= 0.9
    assert result["initial_view"] == "coordinates" and result["view_probes"] == sim_spiral.VIEW_PROBES
    cost = result["oracles"]["measured"]["messages"]
    assert 0 < cost["view_probes_once_per_node"] <= 2 * 39  # 40 nodes: at most every other one probed
    assert cost["first_spiral_with_view_probes"] == cost["search_without_learning"] + cost["view_probes_once_per_node"]
    with pytest.raises(ValueError):
        sim_spiral.run(str(path), initial_view="all-knowing")
    sim_spiral.plot(result, str(tmp_path / "spiral.png"))
    assert (tmp_path / "spiral.png").stat().st_size > 10_000


# --------------------------------------------------------------------------------------------------------
# Initial views: what a node may know before any spiral


class Tape:
    """A matrix that records each (row, column) it is read at."""

    def __init__(self, rows: list[list[float]]) -> None:
        self.rows, self.reads = rows, []

    def __getitem__(self, i: int) -> Tape.Row:
        return Tape.Row(self, i)

    class Row:
        def __init__(self, tape: Tape, i: int) -> None:
            self.tape, self.i = tape, i

        def __getitem__(self, j: int) -> float:
            self.tape.reads.append((self.i, j))
            return self.tape.rows[self.i][j]


class Sealed:
    """The truth, which no node under the `measured` oracle may read."""

    def __getitem__(self, i: int) -> list[float]:
        raise AssertionError("a node read a true RTT it never measured")


def noisy_plane(size: int, seed: int) -> tuple[list[Entry], list[list[float]]]:
    """Nodes in a plane (RTT = distance + 1) whose Vivaldi coordinates are off by up to 20 units: estimates
    rank near nodes wrongly, as on PlanetLab, so measuring is worth something."""
    rng = random.Random(seed)
    xy = [(rng.uniform(0, 100), rng.uniform(0, 100)) for _ in range(size)]
    entries = [Entry(str(i), coord=Coordinate((x + rng.uniform(-20, 20), y + rng.uniform(-20, 20)), 0.5, 0.0, 0.0))
               for i, (x, y) in enumerate(xy)]
    return entries, [[math.dist(p, q) + 1.0 if p != q else 0.0 for q in xy] for p in xy]


@pytest.mark.parametrize("initial_view", sim_spiral.INITIAL_VIEWS)
def test_initial_views_use_only_what_nodes_measured_and_count_every_probe(
        initial_view: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sim_spiral, "BOOTSTRAP", 5)
    entries, rtt = noisy_plane(60, 4)
    probe = Tape(rtt)
    nodes = sim_spiral._Nodes("measured", entries, Sealed(), probe, 6, 2, random.Random(4), initial_view, 12)
    for i, e in enumerate(entries):
        reads = {j for r, j in probe.reads if r == i}
        assert {int(name) for name in nodes.measured[i]} == reads  # measured: exactly what it read
        assert len(reads) == 5 + nodes.setup_probes[i]  # every read beyond the bootstrap members is counted
        by_estimate = sorted((o for o in entries if o is not e), key=lambda o: (vivaldi_distance(e, o), int(o.name)))
        if initial_view == "random":
            assert nodes.setup_probes[i] == 0 and {x.name for x in nodes.views[i].entries()} <= nodes.measured[i].keys()
        else:
            assert {o.name for o in by_estimate[:12]} <= nodes.measured[i].keys()
    probe.reads.clear()
    for origin in range(0, 60, 7):
        run = nodes.spiral(origin, 3, 6, 2, False, random.Random(origin))
        assert len(probe.reads) == run["hops"] and {r for r, _ in probe.reads} == {origin}  # the asker times replies
        assert run["probes"] == 0 and run["messages"] == 2 * run["hops"]
        probe.reads.clear()


def test_coordinate_views_find_more_than_random_ones_without_learning() -> None:
    entries, rtt = noisy_plane(150, 5)
    truth = sim_spiral._nearest(np.where(np.eye(150) == 1, np.inf, np.array(rtt)), 5)
    origins = list(range(0, 150, 3))
    recall = {}
    for initial_view, probes in (("random", 0), ("coordinates", 0), ("coordinates", 20)):
        nodes = sim_spiral._Nodes("measured", entries, Sealed(), rtt, 8, 2, random.Random(5), initial_view, probes)
        point = sim_spiral._point(nodes, origins, {"recall": truth}, 5, 8, 2, random.Random(5))
        recall[initial_view, probes] = point["recall"]
    assert recall["random", 0] < recall["coordinates", 0] < recall["coordinates", 20]  # measured 0.70, 0.79, 0.87
