"""The agents' spiral service on the in-memory network, wired as the node wires it (transport, membership,
coordinate lookup, free capacity; no agent): a fresh node answers a search at once with what membership
already knows, without waiting for its periodic refresh, and learns a joining member when it is announced."""

from __future__ import annotations

from agents.runtime import Event
from agents.spiral import SpiralService
from overlay.membership import DEAD, Member, Membership
from overlay.wire.memnet import MemNetwork
from overlay.wire.rpc import Caller
from vivaldi.coordinate import Config, Coordinate

DIMENSIONS = Config().dimensionality
OPERATOR = Caller("cli", "operator", "cli", "")


def at(x: float) -> Coordinate:
    """A position on a line, x in seconds of RTT from the origin."""
    return Coordinate((x,) + (0.0,) * (DIMENSIONS - 1), 0.1, 0.0, 0.0)


class Cluster:
    """Nodes n0..n(k-1) on a line, 10 ms apart; every membership knows every node (gossip has run), and no
    service has ticked."""

    def __init__(self, size: int) -> None:
        self.net = MemNetwork(lambda a, b: 0.001)
        self.where = {f"n{i}": at(0.010 * i) for i in range(size)}
        self.services: dict[str, SpiralService] = {}
        for name in self.where:
            self.add(name)
        for service in self.services.values():
            for other in self.services.values():
                self.know(service, other)

    def add(self, name: str) -> SpiralService:
        addr = f"mem:{name}"
        membership = Membership(name, addr, "s1")
        coordinate_of = lambda member: self.where.get(member.name)  # noqa: E731 - the node's CoordinateService
        service = SpiralService(self.net.endpoint(addr, name, "s1"), membership, coordinate_of,
                                lambda: {"vcpus": 4, "memory_mb": 4096, "disk_gb": 10})
        self.services[name] = service
        return service

    @staticmethod
    def know(service: SpiralService, other: SpiralService) -> None:
        me = other.membership.me
        if me.name != service.membership.me.name:
            service.membership.members[me.name] = Member(me.name, me.addr, me.site)


async def test_a_fresh_node_answers_a_search_at_once_from_membership(autojump_clock: object) -> None:
    cluster = Cluster(6)
    origin = cluster.services["n0"]
    assert origin.view.entries() == []  # no tick has run
    result = await origin.search(4)
    assert [e.name for e in result.nodes] == ["n1", "n2", "n3", "n4"]
    answer = await cluster.services["n5"].transport.dispatch(OPERATOR, "spiral.search", {"count": 2})
    assert [n["name"] for n in answer["nodes"]] == ["n4", "n3"]
    assert answer["nodes"][0]["free"] == {"vcpus": 4, "memory_mb": 4096, "disk_gb": 10}


async def test_the_view_is_filled_at_start_and_learns_a_joining_member_when_it_is_announced(
        autojump_clock: object) -> None:
    cluster = Cluster(4)
    service = cluster.services["n2"]
    await service.start()
    assert {e.name for e in service.view.entries()} == {"n0", "n1", "n3"}
    cluster.where["n9"] = at(0.021)
    newcomer = cluster.add("n9")
    cluster.know(service, newcomer)
    await service.handle(Event("member_joined", {"name": "n9", "addr": "mem:n9", "site": "s1"}))
    assert service.view.near[0].name == "n9"  # the nearest, learned before any tick
    service.membership.members["n9"].status = DEAD
    service.refresh()
    assert "n9" not in {e.name for e in service.view.entries()}

