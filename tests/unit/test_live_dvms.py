"""The DVMS shell of the agents (`discovery.scheduler.service`): a plan whose end keeps the VEs' rules but whose
order does not is refused before it is applied (`ve.relocate` checks each move)."""

from __future__ import annotations

from discovery.scheduler.service import blocked_step
from discovery.ve.spec import parse_spec
from dvms.model import VM, Migration, Plan

STORE = parse_spec("""
name: store
vms:
  - {name: r1, vcpus: 2, memory_mb: 4096}
  - {name: r2, vcpus: 2, memory_mb: 4096}
  - {name: r3, vcpus: 2, memory_mb: 4096}
constraints:
  anti_affinity: [[r1, r2, r3]]
  spread_sites: 2
""")
SITES = {"n1": "rennes", "n2": "lyon", "n6": "lyon", "n10": "lyon"}
VMS = [VM("store:r1", "store", "n10", 2, 4096, 200), VM("store:r2", "store", "n6", 2, 4096, 0),
       VM("store:r3", "store", "n1", 2, 4096, 0)]


def move(vm: str, source: str, target: str) -> Migration:
    return Migration(vm, source, target, 4096)


def test_a_swap_of_anti_affine_vms_is_refused_whatever_its_order() -> None:
    for order in ([move("store:r1", "n10", "n6"), move("store:r2", "n6", "n10")],
                  [move("store:r2", "n6", "n10"), move("store:r1", "n10", "n6")]):
        why = blocked_step(Plan(order), VMS, {"store": STORE}, SITES)
        assert why is not None and "anti-affinity" in why and "would share" in why


def test_a_plan_that_keeps_the_rules_at_every_step_passes() -> None:
    assert blocked_step(Plan([move("store:r1", "n10", "n2")]), VMS, {"store": STORE}, SITES) is None
    assert blocked_step(Plan(), VMS, {"store": STORE}, SITES) is None
    # r3 moved into lyon: the three would cover one site only
    why = blocked_step(Plan([move("store:r3", "n1", "n2")]), VMS, {"store": STORE}, SITES)
    assert why is not None and "spread over 2 sites" in why
    # a VE whose VMs the partition does not all see is left to ve.relocate
    assert blocked_step(Plan([move("store:r1", "n10", "n6")]), VMS[:2], {"store": STORE}, SITES) is None
