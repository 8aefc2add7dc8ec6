"""The ring's I/O shell on the in-memory network: joins through the protocol, routing around dead hops,
and a churn run of the overlay simulation."""

import random
from pathlib import Path

import pytest
import trio

from overlay.chord import hash_id
from overlay.ring import Ring
from overlay.sim.ring import Simulation, plot, plot_learning, simulate
from overlay.wire.memnet import MemNetwork


def ring_is_exact(rings):
    ordered = sorted(rings, key=lambda r: r.me.id)
    for k, ring in enumerate(ordered):
        if ring.state.successor != ordered[(k + 1) % len(ordered)].me:
            return False
        if ring.state.predecessor != ordered[k - 1].me:
            return False
    return True


async def test_nodes_joining_through_the_protocol_form_one_exact_ring(autojump_clock):
    rng = random.Random(3)
    net = MemNetwork(lambda a, b: 0.005)
    rings = []
    for i in range(30):
        ring = Ring(net.endpoint(f"sim:{i}", f"n{i}", "s"), f"n{i}", f"sim:{i}", "s", r=4)
        if rings:
            assert await ring.join([rng.choice(rings).me.addr])
        rings.append(ring)
    async with trio.open_nursery() as nursery:
        async def maintain_forever(ring):
            while True:
                await ring.maintain()
                await trio.sleep(0.5)

        for ring in rings:
            nursery.start_soon(maintain_forever, ring)
        with trio.fail_after(120):
            while not ring_is_exact(rings):
                await trio.sleep(1)
        nursery.cancel_scope.cancel()


async def test_lookups_route_around_crashed_hops_before_any_repair(autojump_clock):
    sim = Simulation(80, seed=5)
    rng = random.Random(5)
    for _ in range(12):
        sim.crash_one()
    live = list(sim.rings.values())
    for _ in range(100):
        ring = rng.choice(live)
        key = rng.getrandbits(64)
        owners, hops = await ring.lookup_with_hops(key)
        assert owners, "every lookup must produce an answer"
    # after one maintenance round everywhere, answers are exact again
    for ring in live:
        await ring.stabilize()
    for _ in range(100):
        ring, key = rng.choice(live), rng.getrandbits(64)
        owners, _ = await ring.lookup_with_hops(key)
        assert owners[0].id == sim.true_owner(key)


def test_churn_run_meets_the_chord_bounds():
    result = simulate(120, duration=150, churn=0.10, seed=2, lookups_per_second=10)
    assert result["success_rate"] >= 0.99
    assert result["correct_rate"] >= 0.95
    assert result["hops_mean"] <= result["half_log2_n_plus_1"]
    assert result["crashes"] > 10 and result["joins_failed"] == 0
    # every crashed node was replaced, or its replacement was still joining when the run ended, or crashed
    assert result["joins"] + result["joins_in_flight"] + result["joins_crashed"] == result["crashes"]
    assert result["joins_in_flight"] <= 2


async def test_a_node_that_crashes_while_joining_is_counted_once(autojump_clock):
    sim = Simulation(20, seed=7)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sim.join_one, nursery)
        await trio.sleep(0.0001)  # the join's first call is on its way
        (joiner,) = sim.joining
        sim.crash_one(joiner)
    s = sim.stats
    assert (s.crashes, s.joins_crashed, s.joins, s.joins_failed) == (1, 1, 0, 0)
    assert len(sim.ids) == 20 and joiner not in sim.rings and not sim.joining
    assert all(sim.live_addr() in sim.rings for _ in range(50))


async def test_a_hop_found_dead_is_unlearned_by_the_asker_and_by_who_named_it(autojump_clock):
    sim = Simulation(30, seed=8, fingers=False)  # r = 8 successors, no fingers
    asker, named_by, dead = (sim.by_id[sim.ids[k]] for k in (0, 10, 20))
    key = dead.me.id + 1
    asker.state.learn(named_by.me)  # asker -> named_by -> dead: both routes are learned links
    named_by.state.learn(dead.me)
    sim.crash_one(dead.transport.addr)
    owners, _ = await asker.lookup_with_hops(key)
    assert owners[0].id == sim.true_owner(key)
    assert dead.me.id not in named_by.state.learned  # the asker's avoid list told it
    assert named_by.me.id in asker.state.learned


def test_hash_ids_are_what_the_simulation_uses():
    assert Simulation(3, seed=1).by_id.keys() == {hash_id(f"n{i}") for i in range(3)}


PLANETLAB = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "rtt" / "planetlab_490_slice1.tsv.gz"


@pytest.mark.skipif(not PLANETLAB.exists(), reason=f"measured RTT data not found at {PLANETLAB}")
def test_proximity_fingers_cut_latency_not_correctness():
    def run(pns):
        return simulate(150, duration=90, matrix_path=str(PLANETLAB), seed=4, lookups_per_second=10, pns=pns,
                        learning=False)

    plain, oracle, vivaldi = run(False), run("oracle"), run(True)
    # a few PlanetLab pairs take up to 3 s, past the 2 s hop timeout: those hops count as failed
    for result in (plain, oracle, vivaldi):
        assert result["success_rate"] == 1.0 and result["correct_rate"] >= 0.97
        assert result["hops_mean"] <= result["half_log2_n_plus_1"]
    assert oracle["proximity_fingers"].startswith("exact") and vivaldi["proximity_fingers"] == "Vivaldi estimates"
    assert oracle["lookup_latency_ms_p50"] < 0.8 * plain["lookup_latency_ms_p50"]
    # each node's own estimates, 90 s after every coordinate started at the origin, already help
    assert vivaldi["vivaldi_median_error"] < 0.4
    assert oracle["lookup_latency_ms_p50"] < vivaldi["lookup_latency_ms_p50"] < 0.95 * plain["lookup_latency_ms_p50"]


def test_simulations_are_repeatable_and_coordinates_come_from_the_rpcs():
    first, again = (simulate(60, duration=40, seed=3, lookups_per_second=5) for _ in range(2))
    for volatile in ("wall_s", "max_rss_mib"):
        first.pop(volatile), again.pop(volatile)
    assert first == again
    assert len(first["vivaldi_error_by_minute"]) == 0 and first["vivaldi_median_error"] < 1.5
    off = simulate(60, duration=40, seed=3, lookups_per_second=5, coordinates=False)
    assert off["vivaldi_median_error"] is None and off["hops_mean"] == first["hops_mean"]
    with pytest.raises(ValueError, match="needs coordinates"):
        Simulation(3, seed=1, pns="vivaldi", coordinates=False)


def test_learned_links_take_successor_only_routing_from_linear_toward_logarithmic():
    plain = simulate(200, duration=120, seed=6, fingers=False, learning=False, warmup=0, lookups_per_second=10)
    learned = simulate(200, duration=120, seed=6, fingers=False, learning=True, warmup=0, lookups_per_second=10)
    assert plain["hops_mean"] > 10  # ~N / (2r) without fingers
    assert learned["correct_rate"] == plain["correct_rate"] == 1.0
    assert learned["hops_over_time"][-1] < learned["hops_over_time"][0]
    by_count = list(learned["hops_by_lookups"].values())
    assert list(learned["hops_by_lookups"])[:3] == ["1-100", "101-200", "201-500"]
    assert by_count[-1] < by_count[0] and sum(learned["failed_by_lookups"].values()) == 0
    assert learned["hops_mean"] < learned["half_log2_n_plus_1"]


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    result = simulate(30, duration=20, seed=1, lookups_per_second=5, warmup=0)
    plot(result, str(tmp_path / "hops.png"))
    plot_learning({"30 nodes": result}, str(tmp_path / "learning.png"))
    assert (tmp_path / "hops.png").stat().st_size > 0 and (tmp_path / "learning.png").stat().st_size > 0
