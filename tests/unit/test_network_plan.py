"""The data plane's reconciler (`agents.network.plan`) against a model of the kernel: whatever the kernel holds,
the plan's commands leave it holding exactly the segments wanted, and a second plan is empty."""

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from agents.network.plan import FLOOD, OVERHEAD, Seen, Segment, bridge_name, plan, seen_from, vxlan_name

LOCAL, MTU = "10.1.0.1", 1500


@dataclass
class Kernel:
    """What `ip link add|del|set` and `bridge fdb append|replace|del` do to the devices this module names;
    a command the kernel would refuse (a device added twice, deleted while missing) fails the test."""

    bridges: set[str] = field(default_factory=set)
    vxlans: dict[str, tuple[str, int, int, str | None]] = field(default_factory=dict)  # local, mtu, vni, master
    fdb: dict[str, set[tuple[str, str]]] = field(default_factory=dict)

    def run(self, argv):
        match argv:
            case ["ip", "link", "add", name, "mtu", mtu, "type", "bridge"]:
                assert name not in self.bridges
                self.bridges.add(name)
            case ["ip", "link", "add", name, "mtu", mtu, "type", "vxlan", "id", vni, "local", local, "dstport", "4789",
                  "nolearning"]:
                assert name not in self.vxlans
                self.vxlans[name] = (local, int(mtu), int(vni), None)
                self.fdb[name] = set()
            case ["ip", "link", "set", name, "master", bridge, "up"]:
                assert bridge in self.bridges
                self.vxlans[name] = (*self.vxlans[name][:3], bridge)
            case ["bridge", "link", "set", "dev", name, "learning", "off"]:
                assert self.vxlans[name][3] is not None  # a bridge port by then
            case ["ip", "link", "set", name, "up"]:
                assert name in self.bridges
            case ["ip", "link", "del", name]:  # the executor tolerates a device already gone
                self.bridges.discard(name)
                self.vxlans.pop(name, None)
                self.fdb.pop(name, None)
            case ["bridge", "fdb", "append" | "replace", mac, "dev", name, "dst", host]:
                entries = self.fdb[name]
                if argv[2] == "replace":
                    entries -= {e for e in entries if e[0] == mac}
                entries.add((mac, host))
            case ["bridge", "fdb", "del", mac, "dev", name, "dst", host]:
                self.fdb[name].remove((mac, host))
            case _:
                raise AssertionError(f"not a command the plan makes: {argv}")

    def links(self):
        return [{"ifname": b, "mtu": 0, "linkinfo": {"info_kind": "bridge"}} for b in self.bridges] + [
            {"ifname": v, "mtu": mtu, "linkinfo": {"info_kind": "vxlan", "info_data": {"id": vni, "local": local}}}
            for v, (local, mtu, vni, _) in self.vxlans.items()]

    def seen(self):
        fdb = {int(v[3:], 16): [{"mac": m, "dst": d} for m, d in entries] + [{"mac": "aa:aa:aa:aa:aa:aa"}]
               for v, entries in self.fdb.items()}
        return seen_from(self.links(), fdb)


hosts = st.sampled_from(["10.1.0.2", "10.1.0.3", "10.2.0.9"])
macs = st.sampled_from([f"02:00:00:00:00:0{i}" for i in range(6)])


@st.composite
def segment(draw):
    """A segment whose VMs (each MAC on one host: a VM runs at one place) are on 0-3 other hosts."""
    where = draw(st.dictionaries(macs, hosts, max_size=4))
    every = draw(st.sets(hosts)) | set(where.values())
    remotes = {h: frozenset(m for m, at in where.items() if at == h) for h in every}
    return Segment(draw(st.sampled_from([4096, 4097, 70000])), remotes)


segments = st.lists(segment(), max_size=3, unique_by=lambda s: s.vni)


@st.composite
def kernels(draw):
    """A kernel after any earlier plan (and some damage: a device deleted, an entry added by hand)."""
    kernel = Kernel()
    local, mtu = draw(st.sampled_from([LOCAL, "10.9.9.9"])), draw(st.sampled_from([1500, 9000]))
    for cmd in plan(draw(segments), Seen(), local, mtu):
        kernel.run(cmd)
    if kernel.bridges and draw(st.booleans()):
        kernel.bridges.discard(draw(st.sampled_from(sorted(kernel.bridges))))
    return kernel


@settings(max_examples=400, deadline=None)
@given(kernels(), segments)
def test_the_plan_leaves_the_kernel_holding_exactly_what_is_wanted(kernel, wanted):
    for cmd in plan(wanted, kernel.seen(), LOCAL, MTU):
        kernel.run(cmd)
    by_vni = {s.vni: s for s in wanted}
    assert kernel.bridges == {bridge_name(v) for v in by_vni}
    assert {v: (local, mtu, master) for v, (local, mtu, _, master) in kernel.vxlans.items()} == {
        vxlan_name(v): (LOCAL, MTU - OVERHEAD, bridge_name(v)) for v in by_vni}
    for vni, segment in by_vni.items():
        assert kernel.fdb[vxlan_name(vni)] == {(FLOOD, h) for h in segment.remotes} | {
            (m, h) for h, ms in segment.remotes.items() for m in ms}
    assert plan(wanted, kernel.seen(), LOCAL, MTU) == []


def test_a_vm_moving_between_two_remote_hosts_is_one_entry_replaced():
    before = Segment(5000, {"10.1.0.2": frozenset({"02:00:00:00:00:01"}), "10.1.0.3": frozenset()})
    after = Segment(5000, {"10.1.0.2": frozenset(), "10.1.0.3": frozenset({"02:00:00:00:00:01"})})
    kernel = Kernel()
    for cmd in plan([before], Seen(), LOCAL, MTU):
        kernel.run(cmd)
    assert plan([after], kernel.seen(), LOCAL, MTU) == [
        ["bridge", "fdb", "del", "02:00:00:00:00:01", "dev", "dvx001388", "dst", "10.1.0.2"],
        ["bridge", "fdb", "replace", "02:00:00:00:00:01", "dev", "dvx001388", "dst", "10.1.0.3"]]
