"""`discovery top`'s view: the merge of the members' answers (sans-IO, with its invariants under hypothesis), the
event log, and `top.cluster` on the in-memory network, where a hung or vanished member costs the view the
deadline and shows as silent, and a dead one is not asked."""

from __future__ import annotations

import math
from collections.abc import Sequence

import msgpack
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from agents.eventlog import EventLog, LoggedEvent
from agents.host.capacity import Ledger, Resources
from agents.hypervisor.actor import DomainInfo
from agents.runtime import Event
from discovery.scheduler.messages import MigrationView, NodeLoad, PartitionView
from discovery.top.messages import TOP_CLUSTER, ClusterTop, NodeTop, TopQuery, Usage
from discovery.top.service import TopService
from discovery.top.summary import SAME_EVENT_WINDOW, merge_events, merge_migrations, summarize
from overlay.membership import ALIVE, DEAD, LEFT, SUSPECT, Member, Membership
from overlay.wire import codec
from overlay.wire.memnet import MemNetwork

USAGE = Usage(2, 16, 2048, 32768, 150, 1600, "normal", 1, 1)


def answer(name: str, events: Sequence[LoggedEvent] = (), migrations: Sequence[MigrationView] = ()) -> NodeTop:
    return NodeTop(name, "s", USAGE, None, list(events), list(migrations))


def test_a_row_per_member_by_site_then_name_silent_ones_saying_why() -> None:
    members = [Member("n3", "a3", "lyon"), Member("n1", "a1", "rennes"), Member("n2", "a2", "lyon", SUSPECT),
               Member("n4", "a4", "lyon", DEAD)]
    view = summarize("n1", members, {"n1": answer("n1"), "n3": answer("n3"), "n2": "timeout"}, 10.0, 0.5,
                     TopQuery())
    assert [(r.site, r.name, r.state) for r in view.nodes] == [
        ("lyon", "n2", SUSPECT), ("lyon", "n3", ALIVE), ("lyon", "n4", DEAD), ("rennes", "n1", ALIVE)]
    rows = {r.name: r for r in view.nodes}
    assert rows["n3"].usage == USAGE and rows["n3"].silent is None
    assert rows["n2"].usage is None and rows["n2"].silent == "timeout"
    assert rows["n4"].silent == DEAD  # not asked: gossip says why


def test_an_event_several_nodes_noted_is_kept_once_with_its_first_note() -> None:
    dead = [LoggedEvent(100.0 + i, "member_dead", "n9", "lyon") for i in range(3)]
    later = LoggedEvent(100.0 + SAME_EVENT_WINDOW + 5, "member_dead", "n9", "lyon")  # died again, after a restart
    merged = merge_events([answer("n1", [dead[1]]), answer("n2", [dead[0], later]), answer("n3", [dead[2]])], 10)
    assert [(e.time, e.node) for e in merged] == [(later.time, "n2"), (100.0, "n2")]


def test_migrations_under_way_come_first_then_the_newest_finished() -> None:
    def mig(vm: str, state: str, t: float) -> MigrationView:
        return MigrationView(vm, "a", "b", state, t, "p")

    merged = merge_migrations([answer("n1", migrations=[mig("x", "migrated", 5), mig("y", "moving", 9)]),
                               answer("n2", migrations=[mig("z", "failed", 7), mig("w", "moving", 3)])], 3)
    assert [m.vm for m in merged] == ["w", "y", "z"]


names = st.sampled_from([f"n{i}" for i in range(8)])
events = st.builds(LoggedEvent, st.floats(0, 200), st.sampled_from(["member_dead", "ve_created"]), names,
                   st.sampled_from(["", "lyon"]))


@given(st.dictionaries(names, st.tuples(st.sampled_from(["s1", "s2", "s3"]),
                                        st.sampled_from([ALIVE, SUSPECT, DEAD, LEFT]),
                                        st.one_of(st.just("timeout"), st.lists(events, max_size=6)))),
       st.integers(0, 20))
def test_the_view_keeps_its_invariants(cluster: dict, count: int) -> None:
    members = [Member(name, name, site, state) for name, (site, state, _) in cluster.items()]
    answers = {name: (told if isinstance(told, str) else answer(name, told))
               for name, (_, state, told) in cluster.items() if state in (ALIVE, SUSPECT)}
    view = summarize("n0", members, answers, 0.0, 0.0, TopQuery(events=count))
    # every member once, by site then name; usage exactly for those that answered
    assert [(r.site, r.name) for r in view.nodes] == sorted((m.site, m.name) for m in members)
    assert all((r.usage is not None) == isinstance(answers.get(r.name), NodeTop) for r in view.nodes)
    assert all((r.silent is None) == (r.usage is not None) for r in view.nodes)
    # events: at most `count`, newest first, no thing twice within the window, each one a member's note
    assert len(view.events) <= count
    assert [e.time for e in view.events] == sorted((e.time for e in view.events), reverse=True)
    for i, e in enumerate(view.events):
        assert LoggedEvent(e.time, e.kind, e.subject, e.detail) in answers[e.node].events  # type: ignore[union-attr]
        assert not any((f.kind, f.subject, f.detail) == (e.kind, e.subject, e.detail)
                       and 0 < e.time - f.time <= SAME_EVENT_WINDOW for f in view.events[i + 1:])
    # and what travels is what arrives
    assert TOP_CLUSTER.read_answer(msgpack.unpackb(msgpack.packb(TOP_CLUSTER.write_answer(view)))) == view


def test_the_event_log_keeps_the_last_ones_only() -> None:
    log = EventLog(size=3)
    for i in range(5):
        log.on_member(Event("member_joined", {"name": f"n{i}", "site": "lyon"}))
    assert [e.subject for e in log.recent(10)] == ["n2", "n3", "n4"]
    assert [e.subject for e in log.recent(1)] == ["n4"] and log.recent(0) == []


class Host:
    def __init__(self, hangs: bool = False) -> None:
        self.ledger = Ledger(Resources(16, 32768, 500))
        self.ledger.allocate("shop:db", Resources(4, 8192, 20))
        self.hangs = hangs

    async def listing(self) -> list[DomainInfo]:
        if self.hangs:  # libvirt stuck
            await trio.sleep_forever()
        return [DomainInfo("shop:db", "u", "running", 4, 8192)]


class Scheduler:
    load = NodeLoad(400, 8192, "normal", 1600)
    cpu_capacity = 1600

    def partition(self) -> PartitionView | None:
        return PartitionView("n1#0.1", "n1", "member", None, None, None)

    def migrations(self, count: int) -> list[MigrationView]:
        return [MigrationView("shop:db", "n2", "n1", "moving", 5.0, "n1#0.1")][:count]


def test_top_cluster_answers_within_its_deadline_whoever_is_silent() -> None:
    """n1 asks: n2 answers, n3's libvirt hangs, n4 vanished, n5 is dead (not asked); one call, one view."""
    net = MemNetwork(lambda a, b: 0.010)
    names = ["n1", "n2", "n3", "n4", "n5"]
    memberships = {n: Membership(n, f"mem:{n}", "lyon" if n in ("n1", "n2") else "rennes") for n in names}
    for n, membership in memberships.items():
        log = EventLog()
        log.note("ve_created", f"ve-of-{n}")
        TopService(name=n, site=membership.me.site, transport=net.endpoint(f"mem:{n}", n, membership.me.site),
                   membership=membership, host=Host(hangs=n == "n3"), scheduler=Scheduler(), events=log,
                   ).serve(net.endpoints[f"mem:{n}"])
    for other in memberships.values():
        memberships["n1"].members[other.me.name] = Member(other.me.name, other.me.addr, other.me.site)
    memberships["n1"].members["n5"].status = DEAD
    net.crash("mem:n4")
    client = net.endpoint("mem:cli", "cli")
    got: list[ClusterTop] = []

    async def main() -> None:
        started = trio.current_time()
        got.append(await client.ask("mem:n1", TOP_CLUSTER, TopQuery(deadline=1.0), timeout=5.0))
        assert trio.current_time() - started < 1.0 + 0.1  # the deadline and one round trip

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    view = got[0]
    assert {r.name: r.silent for r in view.nodes} == {"n1": None, "n2": None, "n3": "timeout", "n4": "timeout",
                                                      "n5": DEAD}
    n2 = next(r for r in view.nodes if r.name == "n2")
    assert n2.usage == Usage(4, 16, 8192, 32768, 400, 1600, "normal", 1, 1) and n2.partition is not None
    assert sorted(e.subject for e in view.events) == ["ve-of-n1", "ve-of-n2"]
    assert [m.vm for m in view.migrations] == ["shop:db", "shop:db"]
    assert math.isclose(view.seconds, 1.0, abs_tol=0.1)
    assert codec.decode(ClusterTop, codec.encode(view)) == view
