"""Conditional writes on the replicated DHT (`DHT.put_if`): a majority of a key's replicas decides, so of
concurrent writers expecting the same version exactly one wins, and the losers leave nothing behind."""

import random

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.dht import CLAIM_LEASE, COMMIT_WINDOW, ClaimSlots, Record, WriteConflict, ballot
from overlay.messages import DHT_PREPARE, Claim
from overlay.wire.rpc import RequestError

from .test_dht import Cluster


def test_a_replica_grants_one_claimer_at_a_time_and_nothing_over_a_newer_version():
    slots = ClaimSlots(lease=8.0)
    nothing = (0, "")
    assert slots.prepare("k", "a", nothing, None, now=0.0) == Claim(True)
    assert slots.prepare("k", "a", nothing, None, now=1.0) == Claim(True)  # the same claimer again
    assert slots.prepare("k", "b", nothing, None, now=1.0) == Claim(False, "claimed")
    assert slots.prepare("other", "b", nothing, None, now=1.0) == Claim(True)  # slots are per key
    slots.release("k", "b")  # not b's slot: nothing happens
    assert slots.prepare("k", "b", nothing, None, now=2.0).why == "claimed"
    slots.release("k", "a")
    assert slots.prepare("k", "b", nothing, None, now=2.0) == Claim(True)
    assert slots.prepare("k", "c", nothing, None, now=9.9).why == "claimed"
    assert slots.prepare("k", "c", nothing, None, now=10.1) == Claim(True)  # b's lease ran out

    live = Record("k", "v", 3, "n1")
    assert slots.prepare("j", "a", (2, "n1"), live, now=0.0) == Claim(False, "newer", (3, "n1"))
    assert slots.prepare("j", "a", (3, "n1"), live, now=0.0).granted  # expects what is held
    assert slots.prepare("i", "a", (5, "n2"), live, now=0.0).granted  # this replica is behind: fine

    restarted = ClaimSlots(lease=8.0, refuse_until=4.0)
    assert restarted.prepare("k", "a", nothing, None, now=3.9) == Claim(False, "restarting")
    assert restarted.prepare("k", "a", nothing, None, now=4.0).granted
    restarted.expire(now=100.0)
    assert restarted.slots == {}


events = st.lists(st.tuples(st.sampled_from(["prepare"] * 3 + ["release", "restart"]), st.integers(0, 2),
                             st.integers(0, 1), st.sampled_from([0.0, 0.0, 0.0, 1.0, 3.0])), max_size=25)


@settings(max_examples=1000, deadline=None)
@given(events)
def test_no_two_claimers_ever_hold_a_majority_they_may_still_commit_on(steps):
    """Three replicas, two claimers, any interleaving of prepares, releases, time passing and replica
    restarts (slots lost, COMMIT_WINDOW of refusals): a claimer commits only on grants younger than
    COMMIT_WINDOW, and at no moment do two claimers hold two such grants each."""
    replicas = [ClaimSlots(CLAIM_LEASE) for _ in range(3)]
    grants: dict[int, dict[int, float]] = {c: {} for c in range(2)}  # what each claimer was told, and when
    now = 0.0
    for action, replica, claimer, dt in steps:
        now += dt
        if action == "prepare":
            if replicas[replica].prepare("k", f"c{claimer}", (0, ""), None, now).granted:
                grants[claimer][replica] = now
        elif action == "release":
            replicas[replica].release("k", f"c{claimer}")
            grants[claimer].pop(replica, None)
        else:
            replicas[replica] = ClaimSlots(CLAIM_LEASE, refuse_until=now + COMMIT_WINDOW)
        usable = [c for c, held in grants.items() if sum(now - t < COMMIT_WINDOW for t in held.values()) >= 2]
        assert len(usable) <= 1, (now, grants)


async def race(cluster, key, writers, expect=None):
    """Every writer calls put_if at the same moment; each gets its Record or the exception it raised."""
    results = {}

    async def one(name):
        try:
            results[name] = await cluster.nodes[name].put_if(key, {"by": name}, expect)
        except RequestError as err:
            results[name] = err

    async with trio.open_nursery() as nursery:
        for name in writers:
            nursery.start_soon(one, name)
    return results


async def test_of_eight_concurrent_creates_exactly_one_wins_every_time(tmp_path, autojump_clock):
    cluster = await Cluster.of(tmp_path, 8)
    rng = random.Random(7)
    cluster.net.latency = lambda a, b: rng.uniform(0.0002, 0.02)  # every message its own delay: reorderings
    writers = list(cluster.nodes)
    for round_ in range(20):
        key = f"ve/contested-{round_}"
        results = await race(cluster, key, writers)
        winners = [name for name, got in results.items() if isinstance(got, Record)]
        assert len(winners) == 1, results
        [winner] = winners
        assert all(isinstance(got, WriteConflict) for name, got in results.items() if name != winner), results
        assert all(not dht.claims.slots for dht in cluster.nodes.values())  # losers released, the commit freed
        held = [dht.shard.records[key] for dht in cluster.nodes.values() if key in dht.shard.records]
        assert held and all(record == results[winner] for record in held)
        assert results[winner].value == {"by": winner}
        await cluster.maintain()  # anti-entropy and read repair carry the winner's record only
        assert cluster.holders(key) == cluster.replicas(key)
        for dht in cluster.nodes.values():
            assert (await dht.get(key)).value == {"by": winner}


async def test_a_conditional_write_follows_a_tombstone_and_refuses_a_stale_expectation(tmp_path, autojump_clock):
    cluster = await Cluster.of(tmp_path, 5)
    a, b = cluster.nodes["n0"], cluster.nodes["n3"]
    first = await a.put_if("ve/x", 1, None)
    assert first.version == 1
    with pytest.raises(WriteConflict) as lost:
        await b.put_if("ve/x", 2, None)  # b did not see the first write
    assert lost.value.held == first.stamp
    assert (await b.get("ve/x")).value == 1

    deleted = await b.delete("ve/x", after=first.version)
    assert (await a.get_record("ve/x")) == deleted
    again = await a.put_if("ve/x", 3, deleted)  # creating again after a delete
    assert again.version == deleted.version + 1 and (await b.get("ve/x")).value == 3
    with pytest.raises(WriteConflict):
        await b.put_if("ve/x", 4, deleted)


async def test_a_majority_suffices_and_a_minority_writes_nothing(tmp_path, autojump_clock):
    cluster = await Cluster.of(tmp_path, 6)

    async def unavailable(caller, request):
        raise RequestError("disk full")

    key = "ve/quorum"
    replicas = sorted(cluster.replicas(key))
    cluster.nodes[replicas[0]].transport.routes[DHT_PREPARE.name] = (DHT_PREPARE, unavailable)
    writer = next(name for name in cluster.nodes if name not in replicas)
    assert (await cluster.nodes[writer].put_if(key, "ok", None)).value == "ok"
    assert cluster.holders(key) == set(replicas)  # the commit reaches every replica

    other = "ve/minority"
    replicas = sorted(cluster.replicas(other))
    for name in replicas[:2]:
        cluster.nodes[name].transport.routes[DHT_PREPARE.name] = (DHT_PREPARE, unavailable)
    writer = next(name for name in cluster.nodes if name not in replicas)
    with pytest.raises(RequestError, match="1 of 3 replicas granted"):
        await cluster.nodes[writer].put_if(other, "no", None)
    assert not cluster.holders(other)
    assert not cluster.nodes[replicas[2]].claims.slots  # released


async def test_the_slot_of_a_claimer_that_died_lapses_and_the_next_claimer_wins(tmp_path, autojump_clock):
    cluster = await Cluster.of(tmp_path, 5)
    key = "ve/orphaned"
    replicas = [cluster.nodes[name] for name in sorted(cluster.replicas(key))]
    prober = cluster.nodes["n0"].transport
    for dht in replicas:  # a claimer prepared everywhere, then died before committing
        assert (await prober.call(dht.ring.me.addr, "dht.prepare",
                                  {"key": key, "expect": [0, ""], "token": "dead/1"}))["granted"]
    start = trio.current_time()
    written = await cluster.nodes["n1"].put_if(key, "mine", None)
    assert written.value == "mine" and trio.current_time() - start >= CLAIM_LEASE - 1


async def test_a_restarted_replica_grants_no_slot_for_a_slot_lease(tmp_path, autojump_clock):
    cluster = await Cluster.of(tmp_path, 4)
    cluster.crash("n2")
    restarted = await cluster.start("n2", seed="n0")
    probe = {"key": "ve/r", "expect": [0, ""], "token": "t/1"}
    answer = await cluster.nodes["n0"].transport.call(restarted.ring.me.addr, "dht.prepare", probe)
    assert answer == {"granted": False, "why": "restarting"}  # on the wire as it always was
    await trio.sleep(COMMIT_WINDOW)  # no lost slot can be committed now; the hold lasts a whole slot lease, so a
    # later commit's ballot is at least 2 s after any commit of a slot lost (`ballot`)
    assert (await cluster.nodes["n0"].transport.call(restarted.ring.me.addr, "dht.prepare", probe)) == answer
    await trio.sleep(CLAIM_LEASE - COMMIT_WINDOW)
    assert (await cluster.nodes["n0"].transport.call(restarted.ring.me.addr, "dht.prepare", probe))["granted"]


async def test_a_commit_left_on_a_minority_loses_to_the_later_majority_commit_of_its_version(tmp_path, autojump_clock):
    """A writer's commit reached one replica only (its other stores were lost); a second writer, once the first
    one's slots lapsed, committed the same version to the others. Wherever the two meet, the later commit,
    which won the majority, is kept: the committed writer is a ballot (commit time, node), not the name."""
    assert ballot(1_700_000_009.5, "zz") < ballot(1_700_000_010.0, "aa")
    cluster = await Cluster.of(tmp_path, 4)
    key = "ve/tie"
    first, second = cluster.nodes["n0"], cluster.nodes["n1"]
    early = Record(key, "minority", 1, ballot(cluster.now() - 3, "zz"), cluster.now() - 3)
    lone = sorted(cluster.replicas(key))[0]
    await cluster.nodes[lone].shard.merge_many([early])  # what the lost commit left behind
    others = sorted(cluster.replicas(key) - {lone})
    for name in others:  # the majority, where the first writer's slots lapsed: the second writer commits
        answer = await second.transport.call(cluster.nodes[name].ring.me.addr, "dht.prepare",
                                             {"key": key, "expect": [0, ""], "token": "t/2"})
        assert answer["granted"]
    won = await second._commit([cluster.nodes[n].ring.me.addr for n in others],
                               Record(key, "majority", 1, "n1", 0.0), "t/2")
    assert won.writer.endswith("|n1") and won.writer > early.writer
    assert (await first.get(key)).value == "majority"  # the read meets both and repairs the lone replica
    assert cluster.nodes[lone].shard.records[key].value == "majority"
