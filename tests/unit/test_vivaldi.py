"""Vivaldi coordinates: synthetic topologies with known answers, robustness to bad input, update-rule properties.

A cycle is every node sampling one random other node (seeded). Bounds are on the average and the maximum
relative error over all pairs, with margin over the measured values noted next to each.
"""

import dataclasses
import gzip
import itertools
import math
import random

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vivaldi import sim as sim_vivaldi
from vivaldi.coordinate import Client, Config, Coordinate, estimate

MS = 1e-3
DEFAULT = Config()
Matrix = list[list[float]]


def simulate(m: Matrix, cycles: int, config: Config = DEFAULT, seed: int = 1,
             clients: list[Client] | None = None) -> list[Client]:
    rng = random.Random(seed)
    n = len(m)
    clients = clients or [Client(config, random.Random(rng.random())) for _ in range(n)]
    for _ in range(cycles):
        for i in range(n):
            j = rng.choice([k for k in range(n) if k != i])
            clients[i].update(str(j), clients[j].coordinate, m[i][j])
    return clients


def errors(m: Matrix, clients: list[Client]) -> tuple[float, float]:
    """(average, maximum) relative error over all pairs."""
    rel = [abs(clients[i].distance_to(clients[j].coordinate) - m[i][j]) / m[i][j]
           for i, j in itertools.combinations(range(len(m)), 2)]
    return sum(rel) / len(rel), max(rel)


def centroid(clients: list[Client]) -> list[float]:
    vecs = [c.coordinate.vec for c in clients]
    return [sum(col) / len(vecs) for col in zip(*vecs, strict=True)]


def from_points(points: list[tuple[float, ...]]) -> Matrix:
    return [[math.dist(p, q) * MS for q in points] for p in points]


def line(n: int = 10) -> Matrix:
    return from_points([(10.0 * i,) for i in range(n)])


def grid(k: int = 5) -> Matrix:
    return from_points([(10.0 * x, 10.0 * y) for x in range(k) for y in range(k)])


def two_lans(k: int = 5) -> Matrix:
    """1 ms inside each LAN, 1 ms + a 10 ms WAN link between them."""
    return [[0.0 if i == j else (1 if (i < k) == (j < k) else 11) * MS for j in range(2 * k)] for i in range(2 * k)]


def hub(leaves: int = 12, r: float = 10.0) -> Matrix:
    """A circle of nodes around a centre node, every path through the centre: r to it, 2r between leaves.
    In a plane only heights embed it (all positions equal, leaves at height r)."""
    n = leaves + 1
    return [[0.0 if i == j else (r if 0 in (i, j) else 2 * r) * MS for j in range(n)] for i in range(n)]


def random_latencies(n: int = 20) -> Matrix:
    """Uniform in [50, 100] ms: every triangle holds, but the metric is not Euclidean: no exact embedding."""
    rng = random.Random(7)
    m = [[0.0] * n for _ in range(n)]
    for i, j in itertools.combinations(range(n), 2):
        m[i][j] = m[j][i] = rng.uniform(50.0, 100.0) * MS
    return m


# -- synthetic topologies ---------------------------------------------------------------------------------


def test_line():
    avg, worst = errors(line(), simulate(line(), 400))
    assert avg < 0.01 and worst < 0.05  # measured 0.0017 / 0.010


def test_grid():
    avg, worst = errors(grid(), simulate(grid(), 500))
    assert avg < 0.02 and worst < 0.1  # measured 0.0041 / 0.041


def test_two_lans_joined_by_a_wan_link():
    avg, worst = errors(two_lans(), simulate(two_lans(), 200))
    assert avg < 0.005 and worst < 0.02  # measured 0.0006 / 0.002


def test_hub_needs_height():
    plane = Config(dimensionality=2)
    with_height = errors(hub(), simulate(hub(), 800, plane))
    without = errors(hub(), simulate(hub(), 800, dataclasses.replace(plane, use_height=False)))
    assert with_height[0] < 0.035 and with_height[1] < 0.25  # measured 0.018 / 0.14
    assert without[0] > 0.1 and without[0] > 4 * with_height[0]  # measured 0.14 / 0.72


def test_random_latencies_looser_bound():
    avg, worst = errors(random_latencies(), simulate(random_latencies(), 300))
    assert avg < 0.2 and worst < 1.0  # measured 0.10 / 0.50


def wander(m: Matrix, config: Config, warm: int = 300, more: int = 2000, every: int = 100) -> float:
    """Largest distance (ms) of the map's centroid from where it was after `warm` cycles."""
    clients = simulate(m, warm, config)
    start = centroid(clients)
    worst = 0.0
    for k in range(more // every):
        simulate(m, every, config, seed=1000 + k, clients=clients)
        worst = max(worst, math.dist(start, centroid(clients)))
    return worst / MS


def test_converged_embeddable_map_stays_put():
    assert wander(grid(), DEFAULT) < 0.5  # measured 0.06 ms


def test_gravity_holds_a_map_that_cannot_settle():
    """Non-Euclidean latencies never settle, so the map drifts as a whole. Serf's rho = 150 s pulls with
    (d / rho)^2 s: nothing at millisecond scale (it stops runaways seconds away). Gravity scaled to the map
    holds it in place."""
    m = random_latencies()
    free = wander(m, Config(gravity_rho=math.inf))
    serf = wander(m, DEFAULT)
    held = wander(m, Config(gravity_rho=1.0))
    assert free > 4 and abs(serf - free) < 0.01 * free  # measured 7.7 ms for both
    assert held < free / 5  # measured 0.36 ms


# -- bad input never moves the coordinate -------------------------------------------------------------------


def trained_pair() -> tuple[Client, Client]:
    a, b = Client(rng=random.Random(1)), Client(rng=random.Random(2))
    for _ in range(5):
        a.update("b", b.coordinate, 0.02)
        b.update("a", a.coordinate, 0.02)
    return a, b


@pytest.mark.parametrize("rtt", [-0.01, 0.0, 10.000001, 60.0, math.nan, math.inf, -math.inf, True, "0.1", None])
def test_bad_rtt_is_refused_and_changes_nothing(rtt):
    a, b = trained_pair()
    twin, _ = trained_pair()
    with pytest.raises(ValueError, match="RTT sample"):
        a.update("b", b.coordinate, rtt)
    assert a.coordinate == twin.coordinate
    assert a.update("b", b.coordinate, 0.03) == twin.update("b", b.coordinate, 0.03)  # filter history untouched


def other_coordinates() -> list[object]:
    good = Coordinate((0.01,) * 8, 0.5, 0.0, 1e-5)
    return [
        dataclasses.replace(good, vec=(math.nan,) * 8),
        dataclasses.replace(good, vec=(math.inf,) + (0.0,) * 7),
        dataclasses.replace(good, vec=(0.01,) * 3),
        dataclasses.replace(good, vec=()),
        dataclasses.replace(good, error=math.nan),
        dataclasses.replace(good, error=-1.0),
        dataclasses.replace(good, adjustment=math.inf),
        dataclasses.replace(good, height=-0.01),
        dataclasses.replace(good, height="x"),
        good.to_wire(),
        None,
    ]


@pytest.mark.parametrize("other", other_coordinates())
def test_malformed_other_coordinate_is_refused_and_changes_nothing(other):
    a, _ = trained_pair()
    twin, _ = trained_pair()
    with pytest.raises(ValueError, match="coordinate"):
        a.update("b", other, 0.02)
    assert a.coordinate == twin.coordinate


def test_non_finite_result_resets_to_origin_and_is_counted():
    a, _ = trained_pair()
    far = Coordinate((1e300,) * 8, 0.1, 0.0, 1e-5)  # valid, but any move towards it overflows
    c = a.update("far", far, 0.02)
    assert a.resets == 1
    assert c == Coordinate.origin(Config()) and c.is_valid()


def test_set_coordinate_validates_and_restores():
    a, b = trained_pair()
    fresh = Client()
    fresh.set_coordinate(a.coordinate)
    assert fresh.coordinate == a.coordinate
    assert fresh.distance_to(b.coordinate) == a.distance_to(b.coordinate)
    for bad in other_coordinates():
        with pytest.raises(ValueError):
            fresh.set_coordinate(bad)
    assert fresh.coordinate == a.coordinate


def test_config_is_validated():
    for bad in ({"dimensionality": 0}, {"ce": 0}, {"cc": -1}, {"latency_filter": 0}, {"gravity_rho": 0},
                {"fixed_step": 0}, {"adjustment_window": -1}):
        with pytest.raises(ValueError, match="vivaldi config"):
            Config(**bad)


# -- latency filter, distance, estimate -------------------------------------------------------------------


def test_latency_filter_takes_the_median_and_forget_drops_the_history():
    probe = Coordinate((0.0,) * 8, 1.5, 0.0, 1e-5)

    def fed(rtts: tuple[float, ...], latency_filter: int = 1, forget: bool = False) -> Client:
        client = Client(Config(latency_filter=latency_filter), random.Random(3))
        for k, rtt in enumerate(rtts):
            if forget and k == len(rtts) - 1:
                client.forget("p")
            client.update("p", probe, rtt)
        return client

    spike = (0.02, 0.02, 2.0)
    assert fed(spike, latency_filter=3).coordinate == fed((0.02, 0.02, 0.02), latency_filter=3).coordinate
    assert fed(spike, latency_filter=3, forget=True).coordinate.vec == fed(spike).coordinate.vec
    assert fed(spike).coordinate.vec != fed((0.02, 0.02, 0.02)).coordinate.vec


def test_latency_filter_rides_out_spikes():
    """2% of the samples are 10x spikes (a queue, a GC pause): the median of three ignores isolated ones."""
    m = grid()

    def avg_error(config: Config) -> float:
        rng = random.Random(1)
        clients = [Client(config, random.Random(rng.random())) for _ in m]
        for _ in range(300):
            for i in range(len(m)):
                j = rng.choice([k for k in range(len(m)) if k != i])
                clients[i].update(str(j), clients[j].coordinate, m[i][j] * (10 if rng.random() < 0.02 else 1))
        return errors(m, clients)[0]

    assert avg_error(DEFAULT) < 0.1 < 0.2 < avg_error(Config(latency_filter=1))  # measured 0.018 and 0.40


def test_distance_applies_adjustments_only_while_positive():
    a = Coordinate((0.0, 0.0), 0.1, -0.004, 0.001)
    b = Coordinate((0.003, 0.004), 0.1, 0.001, 0.001)
    assert a.raw_distance_to(b) == pytest.approx(0.007)
    assert a.distance_to(b) == pytest.approx(0.004)
    very_negative = dataclasses.replace(a, adjustment=-1.0)
    assert very_negative.distance_to(b) == pytest.approx(0.007)


def test_estimate_bound():
    a = Coordinate((0.0, 0.0), 0.1, 0.0, 0.0)
    b = Coordinate((0.03, 0.04), 0.2, 0.0, 0.0)
    assert estimate(a, b) == pytest.approx((0.05, 0.05 * 0.3))
    assert estimate(dataclasses.replace(a, error=1.5), b)[1] == pytest.approx(0.05)  # capped at the estimate


# -- properties of the update rule ------------------------------------------------------------------------

finite = st.floats(allow_nan=False, allow_infinity=False)
nonneg = st.floats(min_value=0, allow_nan=False, allow_infinity=False)
rtts = st.floats(min_value=0, max_value=10, exclude_min=True)


def coordinates(dim: int = 8, comp=finite, err=nonneg, adj=finite, height=nonneg):
    return st.builds(Coordinate, st.tuples(*[comp] * dim), err, adj, height)


@given(st.lists(st.tuples(st.sampled_from("abc"), coordinates(), rtts), min_size=1, max_size=20))
def test_coordinate_stays_valid_and_error_in_range_for_any_valid_input(samples):
    client = Client(rng=random.Random(0))
    for node, other, rtt in samples:
        c = client.update(node, other, rtt)
        assert c.is_valid() and all(math.isfinite(x) for x in (*c.vec, c.error, c.adjustment, c.height))
        assert 0 < c.error <= client.config.error_max


realistic = coordinates(comp=st.floats(-0.5, 0.5), err=st.floats(0.01, 1.5), adj=st.floats(-0.05, 0.05),
                        height=st.floats(1e-5, 0.5))


@given(realistic, realistic)
def test_sample_equal_to_the_estimate_barely_moves_the_node(mine, other):
    client = Client()
    client.set_coordinate(mine)
    rtt = client.distance_to(other)
    if not 0 < rtt <= 10:
        return
    after = client.update("peer", other, rtt)
    # the spring is at rest: only gravity, (|x| / 150 s)^2 < 0.2 ms here, moves the node
    assert math.dist(mine.vec, after.vec) < 2e-4
    assert abs(after.height - mine.height) < 2e-4


@given(coordinates(dim=3))
def test_wire_round_trip(c):
    assert Coordinate.from_wire(c.to_wire()) == c
    assert Coordinate.from_wire(msgpack.unpackb(msgpack.packb(c.to_wire())), dimensionality=3) == c
    assert Coordinate.from_wire(c.to_wire(), dimensionality=4) is None


wire_junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=3) | st.binary(max_size=3),
    lambda inner: st.lists(inner, max_size=5) | st.tuples(st.lists(inner, max_size=3), inner, inner, inner)
    | st.dictionaries(st.text(max_size=2), inner, max_size=3),
    max_leaves=12,
)


@settings(max_examples=300)
@given(wire_junk, st.none() | st.integers(0, 9))
def test_from_wire_never_raises(data, dim):
    c = Coordinate.from_wire(data, dim)
    assert c is None or (c.is_valid() and (dim is None or len(c.vec) == dim))


# -- the campaign's own helpers ---------------------------------------------------------------------------


def test_vectorized_estimates_match_distance_to():
    clients = simulate(grid(), 50)
    coords = [c.coordinate for c in clients]
    est = sim_vivaldi.estimates(coords)
    for i, j in itertools.combinations(range(len(coords)), 2):
        assert est[i, j] == pytest.approx(coords[i].distance_to(coords[j]), rel=1e-9, abs=1e-12)


def test_load_matrix_units_and_missing_values(tmp_path):
    ms = np.array([[0, 100, 0], [100, 0, 50], [0, 50, 0]], dtype=float)
    plain = tmp_path / "planetlab_3.tsv"
    np.savetxt(plain, ms, delimiter="\t")
    with gzip.open(tmp_path / "seattle_3.tsv.gz", "wt") as f:
        np.savetxt(f, ms / 1000)
    np.savetxt(tmp_path / "other.tsv", ms)
    for name in ("planetlab_3.tsv", "seattle_3.tsv.gz", "other.tsv"):
        m = sim_vivaldi.load_matrix(tmp_path / name)
        assert m[0, 1] == pytest.approx(0.1) and m[1, 2] == pytest.approx(0.05)
        assert np.isnan(m[0, 2]) and np.isnan(np.diag(m)).all()


IN_MS = np.array([[0, 100, 0, 80], [100, 0, 50, 90], [0, 50, 0, 120], [80, 90, 120, 0]], dtype=float)


def test_load_matrix_reads_the_unit_it_is_given_and_warns_in_one_line_when_the_values_disagree(tmp_path, capsys):
    misnamed = tmp_path / "seattle_ms.tsv"  # milliseconds, in a file the README's rule reads as seconds
    np.savetxt(misnamed, IN_MS)
    m = sim_vivaldi.load_matrix(misnamed, "ms")
    assert m[0, 1] == pytest.approx(0.1) and capsys.readouterr().err == ""
    m = sim_vivaldi.load_matrix(misnamed)  # the default follows the rule, and says why it looks wrong
    assert m[0, 1] == pytest.approx(100.0)
    assert capsys.readouterr().err == ("warning: seattle_ms.tsv: median RTT 90 s is above 10 s; is the file in "
                                       "ms? (--unit ms)\n")
    seconds = tmp_path / "planetlab_s.tsv"
    np.savetxt(seconds, IN_MS / 1e6)  # 0.1 ms medians: plausible in seconds, not in milliseconds
    assert sim_vivaldi.load_matrix(seconds, "s")[0, 1] == pytest.approx(1e-4) and capsys.readouterr().err == ""
    assert sim_vivaldi.load_matrix(seconds)[0, 1] == pytest.approx(1e-7)
    err = capsys.readouterr().err
    assert err.startswith("warning: planetlab_s.tsv: median RTT 9e-05 ms is below 0.01 ms; is the file in s?")
    assert err.count("\n") == 1
    with pytest.raises(ValueError, match="unit must be one of ms, s, not 'us'"):
        sim_vivaldi.load_matrix(seconds, "us")


@pytest.mark.parametrize(("name", "scale", "unit"), [
    ("planetlab_4.tsv", 1.0, "ms"), ("PlanetLab_4.tsv.gz", 1.0, "ms"), ("seattle_4.tsv", 1e-3, "s"),
    ("other_ms.tsv", 1.0, "ms"), ("other_s.tsv.gz", 1e-3, "s")])
def test_the_default_unit_is_the_data_readme_rule(tmp_path, capsys, name, scale, unit):
    path = tmp_path / name
    with gzip.open(path, "wt") if name.endswith(".gz") else open(path, "w") as f:
        np.savetxt(f, IN_MS * scale)
    assert sim_vivaldi.default_unit(path, IN_MS * scale) == unit
    assert np.nanmedian(sim_vivaldi.load_matrix(path)) == pytest.approx(0.09)
    assert capsys.readouterr().err == ""


def test_triangle_violations_of_a_metric_and_of_a_shortcut():
    metric = np.array(line(6))
    assert sim_vivaldi.triangle_violations(metric)["violating_share"] == 0
    bent = metric.copy()
    bent[0, 5] = bent[5, 0] = 0.2  # 200 ms where 10 ms hops make 50 ms
    tv = sim_vivaldi.triangle_violations(bent)
    assert tv["violating_share"] > 0 and tv["median_rtt_over_detour"] == pytest.approx(4.0)
