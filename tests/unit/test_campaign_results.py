"""A campaign's timeline and the figures drawn from its raw record (`discovery.campaign.plan`, `.results`)."""

from hypothesis import given
from hypothesis import strategies as st

from discovery.campaign.plan import Action, Campaign, CreateSpec, timeline, ve_spec
from discovery.campaign.results import figures, latencies, percentile, pulled_bytes, recoveries
from discovery.ve.spec import VESpec


def test_the_timeline_creates_at_the_rate_destroys_after_the_lifetime_and_stops_at_the_end():
    campaign = Campaign("c", 10.0, create=CreateSpec(rate=0.5, count=9, lifetime=4.0),
                        actions=(Action(4.0, "kill", "node2"), Action(11.0, "heal")))
    steps = [(s.at, s.kind, s.index) for s in timeline(campaign)]
    assert steps == [(0.0, "create", 0), (2.0, "create", 1), (4.0, "create", 2), (4.0, "action", 0),
                     (4.0, "destroy", 0), (6.0, "create", 3), (6.0, "destroy", 1), (8.0, "create", 4),
                     (8.0, "destroy", 2), (10.0, "create", 5), (10.0, "destroy", 3)]


def test_a_workload_ve_is_a_valid_spec():
    campaign = Campaign("ci", 10.0, create=CreateSpec(rate=1, count=1, vms=3, memory_mb=128, ha="restart"))
    spec = VESpec.from_dict(ve_spec(campaign, 7))
    assert spec.name == "ci-007" and [vm.name for vm in spec.vms] == ["vm1", "vm2", "vm3"]
    assert spec.ha.mode == "restart" and spec.vms[0].memory_mb == 128


@given(st.lists(st.floats(0, 100), max_size=50), st.floats(0, 1))
def test_a_percentile_is_one_of_the_values_and_ordered(values, q):
    got = percentile(values, q)
    assert (got is None) == (not values)
    if values:
        assert got in values and percentile(values, 0.0) <= got <= percentile(values, 1.0) == max(values)


def test_latencies_count_failures_and_unfinished_apart():
    ops = [{"op": "create", "at": 0, "seconds": 1.0, "ok": True, "error": None},
           {"op": "create", "at": 1, "seconds": 3.0, "ok": True, "error": None},
           {"op": "create", "at": 2, "seconds": 2.0, "ok": False, "error": "no room"},
           {"op": "create", "at": 3, "seconds": None, "ok": False, "error": "unfinished"}]
    assert latencies(ops) == {"create": {"count": 4, "ok": 2, "failed": 1, "unfinished": 1, "p50_s": 1.0,
                                         "p90_s": 3.0, "max_s": 3.0}}


def _sample(at, *ves):
    return {"at": at, "error": None, "metrics": {"n1": {'discovery_dvms_load_state{state="overload"}': 1.0}},
            "ves": [{"name": name, "state": state, "vms": {"vm1": {"node": node, "busy": busy}}}
                    for name, state, node, busy in ves]}


def test_a_ve_is_recovered_once_off_the_failed_node_idle_and_running():
    raw = {"nodes": [{"name": "n1", "site": "a"}, {"name": "n2", "site": "b"}, {"name": "n3", "site": "b"}],
           "operations": [{"op": "destroy", "ve": "z", "at": 13.0, "seconds": 0.2, "ok": True, "error": None}],
           "actions": [{"kind": "kill", "target": "n2", "started": 10.0, "ended": 10.2, "ok": True, "error": None},
                       {"kind": "partition", "target": "a", "started": 30.0, "ended": 30.1, "ok": True,
                        "error": None}],
           "samples": [_sample(9.0, ("x", "running", "n2", False), ("y", "running", "n1", False),
                               ("z", "running", "n2", False)),
                       _sample(12.0, ("x", "running", "n2", True), ("y", "running", "n1", False),
                               ("z", "running", "n2", True)),
                       _sample(13.5, ("y", "running", "n1", False)),  # a listing that lacks x: not gone
                       _sample(14.0, ("x", "running", "n3", False), ("y", "running", "n1", False)),
                       _sample(31.0, ("x", "running", "n3", False), ("y", "running", "n1", False))]}
    assert recoveries(raw) == [
        {"action": "kill", "target": "n2", "at": 10.0, "ve": "x", "seconds": 4.0, "gone": False, "serving_s": None},
        {"action": "kill", "target": "n2", "at": 10.0, "ve": "z", "seconds": None, "gone": True, "serving_s": None},
        {"action": "partition", "target": "a", "at": 30.0, "ve": "y", "seconds": None, "gone": False,
         "serving_s": None}]
    found = figures(raw)
    assert found["recovery"] == {"count": 1, "p50_s": 4.0, "max_s": 4.0, "not_recovered": 1, "serving_count": 0,
                                 "serving_p50_s": None, "serving_max_s": None}
    assert found["max_overloaded"] == 1 and found["ves"][0] == {"at": 9.0, "running": 3}
    assert found["serving"] == [] and found["cpu"] == {}


def test_a_ve_serves_again_once_every_vm_answers_after_the_fault_ended():
    """Probes from before the kill ended do not count (a guest may answer until its host is down), nor a sample
    where one VM of two answers."""
    def sample(at, web, cpu):
        return {"at": at, "error": None, "web": web,
                "metrics": {"n1": {"discovery_dvms_cpu_demand_ratio": cpu}, "n2": None},
                "ves": [{"name": "x", "state": "running", "vms": {"vm1": {"node": "n2", "busy": False},
                                                                  "vm2": {"node": "n1", "busy": False}}}]}

    raw = {"nodes": [{"name": "n1", "site": "a"}, {"name": "n2", "site": "b"}], "operations": [],
           "actions": [{"kind": "kill", "target": "n2", "started": 10.0, "ended": 10.5, "ok": True, "error": None}],
           "samples": [sample(9.0, {"x/vm1": "up", "x/vm2": "up"}, 0.1),
                       sample(10.2, {"x/vm1": "up", "x/vm2": "up"}, 0.2),
                       sample(12.0, {"x/vm1": None, "x/vm2": ""}, 1.3),  # an empty page is an answer
                       sample(17.0, {"x/vm1": "up", "x/vm2": "up"}, 0.6)]}
    raw["samples"][1]["metrics"]["n1"] = None  # did not answer: a gap, not a point
    found = figures(raw)
    assert [r["serving_s"] for r in found["recoveries"]] == [7.0]
    assert found["recovery"]["serving_p50_s"] == 7.0 and found["recovery"]["serving_max_s"] == 7.0
    assert found["serving"][2] == {"at": 12.0, "probed": 2, "answering": 1}
    assert found["cpu"] == {"n1": [(9.0, 0.1), (10.2, None), (12.0, 1.3), (17.0, 0.6)]}


def test_image_bytes_pulled_count_a_restarted_agent_s_counter_from_zero():
    def sample(at, n1, n2):
        return {"at": at, "metrics": {"n1": n1 if n1 is None else {"discovery_image_pulled_bytes_total": n1},
                                      "n2": {"discovery_image_pulled_bytes_total": n2}}}

    samples = [sample(0, 100.0, 0.0), sample(1, 300.0, 0.0), sample(2, None, 50.0), sample(3, 40.0, 50.0),
               sample(4, 90.0, 50.0)]
    assert pulled_bytes(samples) == {"n1": 200.0 + 40.0 + 50.0, "n2": 50.0}  # n1 restarted between 1 and 3
    assert pulled_bytes([sample(0, 5.0, 0.0)]) == {"n1": 0.0, "n2": 0.0}  # pulled before the campaign: not counted
