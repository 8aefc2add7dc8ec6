"""The in-memory network that simulations run the production services on."""

import pytest
import trio

from overlay.memnet import MemNetwork
from overlay.rpc import NotFound, RemoteError, RpcTimeout


def net_of_two(latency=0.010):
    net = MemNetwork(lambda a, b: latency)
    return net, net.endpoint("a", "node-a", "s1"), net.endpoint("b", "node-b", "s2")


async def test_calls_take_two_one_way_delays_and_report_the_rtt_and_stamp(autojump_clock):
    net, a, b = net_of_two()
    seen = []
    a.on_rtt = lambda peer, rtt, stamp: seen.append((peer, round(rtt, 6), stamp))
    b.stamp = lambda: {"c": [1.0]}

    async def echo(caller, args):
        return {"from": caller.node, **args}

    b.route("echo", echo)
    start = trio.current_time()
    assert await a.call("b", "echo", {"x": 1}) == {"from": "node-a", "x": 1}
    assert trio.current_time() - start == pytest.approx(0.020)
    assert seen == [("node-b", 0.02, {"c": [1.0]})]
    assert net.messages == 1


async def test_values_are_copied_as_the_wire_would(autojump_clock):
    _, a, b = net_of_two()
    kept = {}

    async def keep(caller, args):
        kept.update(args)
        return kept

    b.route("keep", keep)
    reply = await a.call("b", "keep", {"v": [1, 2]})
    reply["v"].append(3)
    assert kept == {"v": [1, 2]}
    with pytest.raises(TypeError):
        await a.call("b", "keep", {"v": object()})  # not serializable: fails like the real wire


async def test_errors_and_crashes(autojump_clock):
    net, a, b = net_of_two()

    async def missing(caller, args):
        raise NotFound("nothing here")

    b.route("missing", missing)
    with pytest.raises(RemoteError) as err:
        await a.call("b", "missing")
    assert err.value.kind == "not_found"
    with pytest.raises(RemoteError, match="no method"):
        await a.call("b", "nope")
    net.crash("b")
    start = trio.current_time()
    with pytest.raises(RpcTimeout):
        await a.call("b", "missing", timeout=3)
    assert trio.current_time() - start == pytest.approx(3)
    answers = await a.call_many(["b"], "missing", timeout=1)
    assert isinstance(answers["b"], RpcTimeout)
