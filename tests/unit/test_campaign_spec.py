"""Campaign files (`discovery.campaign.spec`): the example CI campaign reads, and a mistake is one line naming
the file, the line and the field."""

from pathlib import Path

import pytest

from discovery.campaign.plan import Action, CreateSpec, TestbedSpec, ve_spec
from discovery.campaign.spec import check_targets, load_campaign, parse_campaign
from discovery.yamlfields import FieldError

CI = Path(__file__).parents[2] / "examples" / "campaigns" / "ci.yaml"
GUESTS = CI.with_name("guests.yaml")


def test_the_ci_campaign_reads():
    campaign = load_campaign(CI)
    assert campaign.name == "ci" and campaign.duration == 45 and campaign.sample_every == 1
    assert campaign.testbed == TestbedSpec(3, 3, 20, 100, "test")
    assert campaign.create == CreateSpec(0.5, 22, vms=1, vcpus=1, memory_mb=256, ha="restart", lifetime=25)
    assert campaign.actions[2] == Action(10, "kill", "node2") and campaign.actions[5] == Action(38, "heal")
    assert campaign.actions[1] == Action(6, "load", cpu=100, vms=3)
    check_targets(campaign, [(f"node{i}", site) for i, site in enumerate(["rennes", "lyon", "nancy"], 1)])


def test_the_guests_campaign_reads_and_exposes_one_port_per_vm():
    campaign = load_campaign(GUESTS)
    assert campaign.testbed.hypervisor == "qemu" and campaign.create is not None
    assert (campaign.create.image, campaign.create.via, campaign.create.web_port) == ("tiny", "node1", 20000)
    assert [ve_spec(campaign, i)["expose"] for i in range(2)] == [[{"vm": "vm1", "port": 80, "host_port": 20000}],
                                                                  [{"vm": "vm1", "port": 80, "host_port": 20001}]]
    with pytest.raises(FieldError, match=r"^create.via: no node 'node1' here \(nodes: n1, n2\)$"):
        check_targets(campaign, [("n1", "a"), ("n2", "b")])


@pytest.mark.parametrize("text, message", [
    ("name: x\n", "c.yaml:1: missing required key 'duration'"),
    ("name: X!\nduration: 60s\n", "c.yaml:1: name: must be 1-40 characters"),
    ("name: x\nduration: 5s\n", "c.yaml:2: duration: must be a duration from 10s to 24h"),
    ("name: x\nduration: 60s\nactions:\n  - {at: 90s, kill: node1}\n",
     "c.yaml:4: actions[0].at: must be a duration from 0s to 1m"),
    ("name: x\nduration: 60s\nactions:\n  - {at: 9s, kill: node1, start: node1}\n",
     "c.yaml:4: actions[0]: must say one action of kill, poweroff, start, partition, heal, capacity, load, got "
     "kill, start"),
    ("name: x\nduration: 60s\nactions:\n  - {at: 9s, load: 200}\n", "c.yaml:4: actions[0]: a load needs vms"),
    ("name: x\nduration: 60s\nactions:\n  - {at: 9s, heal: false}\n", "c.yaml:4: actions[0].heal: must be true"),
    ("name: x\nduration: 60s\nactions:\n  - {at: 9s, kill: node1, vms: 2}\n",
     "c.yaml:4: actions[0].vms: only a load is given to VMs, not a kill"),
    ("name: x\nduration: 60s\ncreate: {rate: yes, count: 3}\n", "c.yaml:3: create.rate: must be a number"),
    ("name: x\nduration: 60s\ncreate: {rate: 1, count: 3, ha: always}\n",
     "c.yaml:3: create.ha: must be one of none, restart, standby, got 'always'"),
    ("name: x\nduration: 60s\ntestbed: {nodes: 3, sites: 4}\n",
     "c.yaml:3: testbed.sites: must be an integer between 1 and 3"),
    ("name: x\nduration: 60s\nfaults: []\n", "c.yaml:3: unknown key 'faults'"),
    ("name: x\nduration: 60s\ncreate: {rate: 1, count: 3, web_port: 8080}\n",
     "c.yaml:3: create.web_port: needs an image whose guests serve port 80"),
    ("name: x\nduration: 60s\ncreate: {rate: 1, count: 100, vms: 2, image: tiny, web_port: 65400}\n",
     "c.yaml:3: create.web_port: 200 VMs need ports 65400 to 65599, past 65535"),
    ("name: x\nduration: 60s\ncreate: {rate: 1, count: 3, image: tiny, web_port: 20000}\nactions:\n"
     "  - {at: 9s, load: 150, vms: 2}\n", "c.yaml:5: actions[0].load: must be an integer between 0 and 100, got 150"),
    ("- just a list\n", "c.yaml:1: expected a mapping"),
    ("", "c.yaml: empty document"),
    ("name: [unclosed\n", "c.yaml:2: invalid YAML"),
])
def test_a_mistake_is_one_line_naming_where_it_is(text, message):
    with pytest.raises(FieldError) as caught:
        parse_campaign(text, "c.yaml")
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_an_action_on_a_node_the_deployment_lacks_is_refused_before_the_run():
    campaign = parse_campaign("name: x\nduration: 60s\nactions:\n  - {at: 9s, partition: paris}\n", "c.yaml")
    with pytest.raises(FieldError, match=r"^actions\[0\].partition: no node or site 'paris' here \(nodes: n1; "
                                         r"sites: lyon\)$"):
        check_targets(campaign, [("n1", "lyon")])
