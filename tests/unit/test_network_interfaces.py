"""A VM's interfaces in its domain XML (`agents.network.interfaces`), the host's check of a new VM's NICs
(`agents.host.args.nics_arg`), what the VE layer tells a host of them (`VERecord.nic_args`), and the forwarding
entries it derives from the records (`discovery.ve.forwarding.remotes`)."""

import re
import xml.etree.ElementTree as ET
from dataclasses import replace

import pytest

from agents.host.args import nics_arg
from agents.hypervisor.actor import domain_xml
from agents.network.interfaces import Interface, Port, interfaces_of, segments_of, with_nics
from agents.network.uplink import Forward
from discovery.ve.forwarding import remotes
from discovery.ve.records import MoveIntent, NetState, Nic, Slot, VERecord
from discovery.ve.spec import ExposeSpec, NetworkSpec, NicSpec, VESpec, VMSpec
from overlay.wire.rpc import RequestError


def test_interfaces_are_written_on_their_segments_bridges_and_read_back():
    web = Interface(5000, "02:00:00:00:00:01", "10.0.0.2/24", nat=True,
                    exposed=(Port("tcp", 8080, 80), Port("udp", 5353, 53)))
    back = Interface(70000, "02:00:00:00:00:02", "10.1.0.9/29")
    xml = with_nics(domain_xml("shop:web", 1, 64), [web, back], 1450)
    interfaces = ET.fromstring(xml).findall("./devices/interface")
    assert [(i.get("type"), i.find("mac").get("address"), i.find("source").get("bridge"), i.find("mtu").get("size"),
             i.find("model").get("type")) for i in interfaces] == [
        ("bridge", "02:00:00:00:00:01", "dvb001388", "1450", "virtio"),
        ("bridge", "02:00:00:00:00:02", "dvb011170", "1450", "virtio")]
    assert segments_of(xml) == {5000, 70000}
    assert interfaces_of(xml) == [web, back]
    assert web.forwards == {Forward("tcp", 8080, "10.0.0.2", 80), Forward("udp", 5353, "10.0.0.2", 53)}
    assert interfaces_of(domain_xml("a", 1, 64)) == [] and interfaces_of("not xml") == []
    assert with_nics(xml, [], 1450) == xml and segments_of(domain_xml("a", 1, 64)) == set()
    assert segments_of("<domain><devices><interface type='bridge'><source bridge='virbr0'/></interface></devices>"
                       "</domain>") == set() and segments_of("not xml") == set()


@pytest.mark.parametrize("rows, message", [
    ([5000], "each NIC must be [vni, mac, address/prefix]"),
    ([[0, "02:00:00:00:00:01", "10.0.0.2/24"]], "a NIC's vni must be an integer from 1 to 16777215, got 0"),
    ([[True, "02:00:00:00:00:01", "10.0.0.2/24"]], "a NIC's vni must be an integer from 1 to 16777215, got True"),
    ([[5000, "01:00:5e:00:00:01", "10.0.0.2/24"]],
     "a NIC's mac must be a unicast MAC such as 02:00:5e:10:00:01, got '01:00:5e"),
    ([[5000, "02:00:00:00:00:0G", "10.0.0.2/24"]], "a NIC's mac must be a unicast MAC"),
    ([[5000, "02:00:00:00:00:01", "10.0.0.2"]], "a NIC's address must be an IPv4 host address with its prefix"),
    ([[5000, "02:00:00:00:00:01", "10.0.0.255/24"]], "a NIC's address must be an IPv4 host address"),
    ([[5000, "02:00:00:00:00:01", 7]], "a NIC's address must be an IPv4 host address"),
    ([[5000, "02:00:00:00:00:01", "10.0.0.2/24", []]], "a NIC's options must be a map of nat and expose"),
    ([[5000, "02:00:00:00:00:01", "10.0.0.2/24", {"snat": True}]], "a NIC's options must be a map of nat"),
    ([[5000, "02:00:00:00:00:01", "10.0.0.2/24", {"nat": 1}]], "a NIC's nat must be true or false, got 1"),
    ([[5000, "02:00:00:00:00:01", "10.0.0.2/24", {"expose": [["sctp", 80, 80]]}]],
     "each exposed port must be [tcp|udp, host port, port] with ports from 1 to 65535, got ['sctp', 80, 80]"),
    ([[5000, "02:00:00:00:00:01", "10.0.0.2/24", {"expose": [["tcp", 0, 80]]}]], "each exposed port must be"),
    ([[5000, "02:00:00:00:00:01", "10.0.0.2/24", {"expose": "tcp/80"}]], "a NIC's expose must list at most 64"),
])
def test_a_host_refuses_nics_it_cannot_make_in_one_line(rows, message):
    with pytest.raises(RequestError, match="^" + re.escape(message)):
        nics_arg(rows)
    assert nics_arg([[5000, "02:00:00:00:00:01", "10.0.0.2/24"]]) == [Interface(5000, "02:00:00:00:00:01",
                                                                                 "10.0.0.2/24")]
    assert nics_arg([[5000, "02:00:00:00:00:01", "10.0.0.2/24", {"nat": True, "expose": [["udp", 53, 5353]]}]]) == [
        Interface(5000, "02:00:00:00:00:01", "10.0.0.2/24", True, (Port("udp", 53, 5353),))]
    assert nics_arg(None) == []


def test_a_host_is_told_the_nat_of_a_vm_s_networks_and_its_exposed_ports_on_its_first_nic():
    spec = VESpec("shop", (VMSpec("web", 1, 64, nics=(NicSpec("front"), NicSpec("back"))),
                           VMSpec("db", 1, 64, nics=(NicSpec("back"),))),
                  networks=(NetworkSpec("front", nat=True), NetworkSpec("back")),
                  expose=(ExposeSpec("web", 80, 8080), ExposeSpec("web", 53, 5353, "udp")))
    ve = VERecord("shop", spec, "alice", "running", {}, "n1", 0.0, "u",
                  networks={"front": NetState(5000, "10.0.0.0/24"), "back": NetState(5001, "10.0.1.0/29")},
                  nics={"web": (Nic("front", "02:00:00:00:00:0a", "10.0.0.2"), Nic("back", "02:00:00:00:01:0a",
                                                                                  "10.0.1.2")),
                        "db": (Nic("back", "02:00:00:00:01:0b", "10.0.1.3"),)})
    assert ve.nic_args("web") == {"nics": [
        [5000, "02:00:00:00:00:0a", "10.0.0.2/24", {"nat": True, "expose": [["tcp", 8080, 80], ["udp", 5353, 53]]}],
        [5001, "02:00:00:00:01:0a", "10.0.1.2/29"]]}
    assert ve.nic_args("db") == {"nics": [[5001, "02:00:00:00:01:0b", "10.0.1.3/29"]]}
    assert [nic.forwards for nic in nics_arg(ve.nic_args("web")["nics"])] == [
        {Forward("tcp", 8080, "10.0.0.2", 80), Forward("udp", 5353, "10.0.0.2", 53)}, frozenset()]


def test_remotes_are_the_other_hosts_of_this_host_s_networks_with_their_vms_macs():
    def slot(node):
        return Slot(node, f"10.0.0.{node[-1]}:7000", "s", None, "")

    ve = VERecord("shop", VESpec("shop", (VMSpec("a", 1, 64), VMSpec("b", 1, 64), VMSpec("c", 1, 64))), "alice",
                  "running", {"a": slot("n1"), "b": slot("n2"), "c": slot("n3")}, "n1", 0.0, "u",
                  networks={"front": NetState(5000, "10.0.0.0/24"), "back": NetState(5001, "10.0.1.0/24")},
                  nics={"a": (Nic("front", "02:00:00:00:00:0a", "10.0.0.2"),),
                        "b": (Nic("front", "02:00:00:00:00:0b", "10.0.0.3"), Nic("back", "02:00:00:00:01:0b", "")),
                        "c": (Nic("back", "02:00:00:00:01:0c", "10.0.1.3"),)})
    assert remotes([ve], "n1") == {5000: {"10.0.0.2": frozenset({"02:00:00:00:00:0b"})}}  # n1 is on front only
    assert remotes([ve], "n2") == {5000: {"10.0.0.1": frozenset({"02:00:00:00:00:0a"})},
                                   5001: {"10.0.0.3": frozenset({"02:00:00:00:01:0c"})}}
    assert remotes([ve], "n9") == {}
    # b moving from n2 to n4: flooded to both places, pinned to neither; n4 (arriving) already carries front
    moving = ve.with_slot("b", replace(ve.placement["b"], moving_to=MoveIntent(
        "n4", "10.0.0.4:7000", "s", None, "", "prepare", "running", "n4", 0.0)))
    assert remotes([moving], "n1") == {5000: {"10.0.0.2": frozenset(), "10.0.0.4": frozenset()}}
    assert remotes([moving], "n4")[5000] == {"10.0.0.1": frozenset({"02:00:00:00:00:0a"}), "10.0.0.2": frozenset()}
