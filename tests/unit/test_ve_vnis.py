"""VNI claims in the directory (`discovery.ve.vnis`), on the replicated DHT over the in-memory network."""

import trio

from discovery.ve import vnis as vnis_module
from discovery.ve.directory import Directory
from discovery.ve.records import NetState, VERecord
from discovery.ve.spec import VESpec, VMSpec
from discovery.ve.vnis import PREFIX, STALE, Claim, Vnis
from overlay.wire import codec

from .test_dht import Cluster


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def same_draws(monkeypatch):
    """Every network of every VE draws the same VNIs, in the same order: every claim contends."""
    monkeypatch.setattr(vnis_module, "vni_candidates", lambda uid, network: iter(range(5000, 5100)))


async def holder(directory, vni):
    record = await directory.records.get(f"{PREFIX}{vni}")
    return None if record is None else codec.decode(Claim, record.value)


async def test_concurrent_claims_of_the_same_vnis_each_get_their_own(tmp_path, autojump_clock, monkeypatch):
    same_draws(monkeypatch)
    cluster = await Cluster.of(tmp_path, 5)
    clock = Clock()
    agents = [Vnis(Directory(dht), clock) for dht in cluster.nodes.values()]
    got: dict[int, dict[str, int]] = {}

    async def claim(i):
        got[i] = await agents[i].claim(f"ve{i}", f"u{i}", ["back", "front"])

    async with trio.open_nursery() as nursery:
        for i in range(len(agents)):
            nursery.start_soon(claim, i)
    held = [vni for claimed in got.values() for vni in claimed.values()]
    assert len(set(held)) == len(held) == 10
    for i, claimed in got.items():
        for network, vni in claimed.items():
            claim = await holder(agents[0].directory, vni)
            assert (claim.ve, claim.uid, claim.network) == (f"ve{i}", f"u{i}", network)
    assert await agents[1].claim("ve0", "u0", ["back", "front"]) == got[0]  # a retried create: the same VNIs


async def test_a_stale_claim_is_taken_over_only_if_its_ve_does_not_use_it_and_release_frees_only_ours(
        tmp_path, autojump_clock, monkeypatch):
    same_draws(monkeypatch)
    cluster = await Cluster.of(tmp_path, 3)
    clock = Clock()
    vnis = Vnis(Directory(cluster.nodes["n0"]), clock)
    used = await vnis.claim("live", "u-live", ["net"])  # 5000, its VE's record lists it
    await vnis.directory.put_if(ve("live", "u-live", {"net": NetState(used["net"], "10.0.0.0/24")}), None)
    left = await vnis.claim("gone", "u-gone", ["net"])  # 5001, a create that died: no record
    assert (used, left) == ({"net": 5000}, {"net": 5001})
    assert await vnis.claim("new", "u-new", ["net"]) == {"net": 5002}  # both still fresh
    clock.now += STALE + 1
    assert await vnis.claim("newer", "u-newer", ["net"]) == {"net": 5001}  # the dead create's, now stale
    assert (await holder(vnis.directory, 5000)).ve == "live"

    await vnis.release("newer", "u-other", {"net": 5001})  # not its claim: kept
    assert (await holder(vnis.directory, 5001)).ve == "newer"
    await vnis.release("newer", "u-newer", {"net": 5001})
    assert await holder(vnis.directory, 5001) is None


def ve(name, uid, networks):
    return VERecord(name, VESpec(name, (VMSpec("a", 1, 64),)), "alice", "running", {}, "n0", 0.0, uid,
                    networks=networks)
