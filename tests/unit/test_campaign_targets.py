"""Inventory hosts as a campaign's target (`discovery.campaign.targets`): hosts and their variables read from an
Ansible YAML inventory (groups' vars inherited, a host's own winning), and the partition's nftables table."""

from discovery.campaign.targets import _drop_table, _inventory_hosts


def test_inventory_hosts_inherit_their_groups_vars_and_keep_their_own():
    rennes = {"vars": {"discovery_agent_site": "rennes"},
              "hosts": {"n1": {"ansible_host": "10.0.0.1"},
                        "n2": {"ansible_host": "10.0.0.2", "discovery_agent_port": 7100}}}
    lyon = {"vars": {"discovery_agent_site": "lyon"}, "hosts": {"n3": None}}
    inventory = {"all": {"vars": {"ansible_user": "root", "discovery_agent_port": 7000},
                         "children": {"rennes": rennes, "lyon": lyon}}}
    hosts = _inventory_hosts(inventory)
    assert hosts == {"n1": {"ansible_user": "root", "discovery_agent_port": 7000, "discovery_agent_site": "rennes",
                            "ansible_host": "10.0.0.1"},
                     "n2": {"ansible_user": "root", "discovery_agent_port": 7100, "discovery_agent_site": "rennes",
                            "ansible_host": "10.0.0.2"},
                     "n3": {"ansible_user": "root", "discovery_agent_port": 7000, "discovery_agent_site": "lyon"}}
    assert _inventory_hosts(["not", "an", "inventory"]) == {} and _inventory_hosts({"all": None}) == {}


def test_a_partition_drops_the_other_side_both_ways():
    table = _drop_table("10.0.0.3, 10.0.0.4")
    assert "hook input priority 0;\n    ip saddr { 10.0.0.3, 10.0.0.4 } drop" in table
    assert "hook output priority 0;\n    ip daddr { 10.0.0.3, 10.0.0.4 } drop" in table
    assert table.startswith("table inet discovery_campaign {")
