"""The in-memory network that simulations run the production services on."""

import contextlib
from dataclasses import dataclass
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from overlay.wire.memnet import MemNetwork, SimClock, _never_suspends
from overlay.wire.memnet import sleep as memnet_sleep
from overlay.wire.rpc import ANYONE, BadAnswer, Method, NotFound, RemoteError, RpcTimeout


@dataclass(frozen=True)
class Args:
    x: Any = None
    v: Any = None


def method_named(name):
    return Method(name, Args, ANYONE)


def net_of_two(latency=0.010):
    net = MemNetwork(lambda a, b: latency)
    return net, net.endpoint("a", "node-a", "s1"), net.endpoint("b", "node-b", "s2")


async def test_calls_take_two_one_way_delays_and_report_the_rtt_and_stamp(autojump_clock):
    net, a, b = net_of_two()
    seen = []
    a.on_rtt = lambda peer, rtt, stamp: seen.append((peer, round(rtt, 6), stamp))
    b.stamp = lambda: {"c": [1.0]}

    async def echo(caller, request):
        return {"from": caller.node, "x": request.x}

    b.route(method_named("echo"), echo)
    start = trio.current_time()
    assert await a.call("b", "echo", {"x": 1}) == {"from": "node-a", "x": 1}
    assert trio.current_time() - start == pytest.approx(0.020)
    assert seen == [("node-b", 0.02, {"c": [1.0]})]
    assert net.messages == 1


async def test_values_are_copied_as_the_wire_would(autojump_clock):
    _, a, b = net_of_two()
    kept = {}

    async def keep(caller, request):
        kept.update(v=request.v)
        return kept

    b.route(method_named("keep"), keep)
    reply = await a.call("b", "keep", {"v": [1, 2]})
    reply["v"].append(3)
    assert kept == {"v": [1, 2]}
    with pytest.raises(TypeError):
        await a.call("b", "keep", {"v": object()})  # not serializable: fails like the real wire


async def test_errors_and_crashes(autojump_clock):
    net, a, b = net_of_two()

    async def missing(caller, request):
        raise NotFound("nothing here")

    b.route(method_named("missing"), missing)
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


# -- the simulation clock: the same exchanges, to the tick, on cheaper timers -------------------------

CLOCKS = {"mock": lambda: MockClock(autojump_threshold=0), "sim": SimClock}


def run_on(clock_name, scenario):
    """Run `scenario()` under the named virtual clock and return what it returns."""
    return trio.run(scenario, clock=CLOCKS[clock_name]())


@pytest.mark.parametrize("clock", CLOCKS)
def test_both_clocks_time_calls_timeouts_and_slow_handlers_alike(clock):
    async def scenario():
        net, a, b = net_of_two(latency=0.010)
        ran = []

        async def quick(caller, request):
            ran.append("quick")
            return {"x": request.x}

        async def slow(caller, request):
            ran.append("slow")
            await trio.sleep(5)
            ran.append("slow finished")
            return 1

        b.route(method_named("quick"), quick)
        b.route(method_named("slow"), slow)
        times = []
        start = trio.current_time()
        assert await a.call("b", "quick", {"x": [1]}) == {"x": [1]}
        times.append(trio.current_time() - start)
        for method, timeout in (("slow", 1.0), ("quick", 0.015), ("quick", 0.005)):
            start = trio.current_time()
            with pytest.raises(RpcTimeout):
                await a.call("b", method, timeout=timeout)
            times.append(trio.current_time() - start)
        net.crash("b")
        start = trio.current_time()
        with pytest.raises(RpcTimeout):
            await a.call("b", "quick", timeout=2)
        times.append(trio.current_time() - start)
        return [round(t, 9) for t in times], ran

    times, ran = run_on(clock, scenario)
    assert times == [0.02, 1.0, 0.015, 0.005, 2.0]
    # the slow handler was cancelled with its caller; a late answer still means the handler ran;
    # a request that cannot even arrive in time never runs
    assert ran == ["quick", "slow", "quick"]


def test_sim_clock_jumps_to_the_next_timer_and_sleeps_are_cancellable():
    async def scenario():
        woke = []

        async def sleeper(seconds):
            await memnet_sleep(seconds)
            woke.append((seconds, trio.current_time()))

        async with trio.open_nursery() as nursery:
            for seconds in (3.0, 1.0, 2.0, 1.0):
                nursery.start_soon(sleeper, seconds)
            with trio.move_on_after(1.5):  # a trio deadline among the clock's own timers
                await memnet_sleep(10)
            woke.append(("cancelled", trio.current_time()))
        await memnet_sleep(0)  # no wait: a checkpoint
        return woke, trio.current_time()

    woke, end = trio.run(scenario, clock=SimClock())
    assert woke == [(1.0, 1.0), (1.0, 1.0), ("cancelled", 1.5), (2.0, 2.0), (3.0, 3.0)]
    assert end == 3.0


def test_only_handlers_that_cannot_await_skip_the_deadline():
    async def plain(caller, request):
        return request

    async def awaiting(caller, request):
        await trio.sleep(0)

    async def with_nursery(caller, request):
        async with trio.open_nursery():
            pass

    def returns_a_coroutine(caller, request):
        return awaiting(caller, request)

    assert _never_suspends(plain)
    assert not any(map(_never_suspends, (awaiting, with_nursery, returns_a_coroutine, None)))


@dataclass(frozen=True)
class Sum:
    total: int
    of: list[int]


async def test_a_handler_receives_its_request_decoded_into_the_method_s_dataclass(autojump_clock):
    """The map on the wire becomes the request type (defaults filled in), checked before the handler runs."""
    _, a, b = net_of_two()
    received = []

    async def look(caller, request):
        received.append(request)
        return True

    b.route(method_named("look"), look)
    assert await a.call("b", "look", {"x": [1, 2]}) is True
    assert received == [Args(x=[1, 2], v=None)]
    with pytest.raises(RemoteError, match=r"^look: y: unknown field") as caught:
        await a.call("b", "look", {"y": 1})
    assert caught.value.kind == "bad_request" and len(received) == 1


async def test_a_typed_call_sends_its_request_encoded_and_decodes_the_declared_answer(autojump_clock):
    _, a, b = net_of_two()
    adds = Method("sum.add", Args, ANYONE, Sum)

    async def add(caller, request: Args) -> Sum:
        return Sum(request.x + request.v, [request.x, request.v])  # a dataclass: dispatch encodes it

    async def garbled(caller, request):
        return {"total": "three"}

    b.route(adds, add)
    b.route(Method("sum.undeclared", Args, ANYONE), garbled)  # served as an older agent would: unchecked
    assert await a.ask("b", adds, Args(x=1, v=2)) == Sum(3, [1, 2])
    assert await a.call("b", "sum.add", {"x": 1, "v": 2}) == {"total": 3, "of": [1, 2]}  # the wire: plain maps
    with pytest.raises(RemoteError, match=r"^b: sum.undeclared answer.total: expected int, got str$") as caught:
        await a.ask("b", Method("sum.undeclared", Args, ANYONE, Sum), Args())  # the caller checks too
    assert caught.value.kind == "bad_answer"


async def test_a_handler_answering_what_its_method_does_not_declare_is_a_bad_answer_not_a_crash(autojump_clock):
    """A handler's bug is answered in one line (kind bad_answer), whether its answer would have crossed the wire
    (a map of the wrong shape) or not (an object msgpack cannot carry), and the node goes on serving."""
    _, a, b = net_of_two()

    async def garbled(caller, request):
        return {"total": "three"}

    async def unsendable(caller, request):
        return object()

    async def add(caller, request):
        return Sum(1, [1])

    for name, handler in (("sum.garbled", garbled), ("sum.unsendable", unsendable), ("sum.add", add)):
        b.route(Method(name, Args, ANYONE, Sum), handler)
    for name, why in (("sum.garbled", r"^sum.garbled answer.total: expected int, got str$"),
                      ("sum.unsendable", r"^sum.unsendable answer: expected a map, got object$")):
        with pytest.raises(RemoteError, match=why) as caught:
            await a.call("b", name, {})
        assert caught.value.kind == "bad_answer"
        assert isinstance((await b.call_many(["b"], name))["b"], BadAnswer)  # served locally: the same check
    assert await a.call("b", "sum.add", {}) == {"total": 1, "of": [1]}


async def test_a_simulation_whose_callers_all_ask_may_leave_the_check_to_them(autojump_clock):
    """Without the answering side's check (`MemNetwork(check_answers=False)`), a slip is still a bad_answer
    for a caller that asks: it is found on arrival instead, and named with the address it came from."""
    net = MemNetwork(check_answers=False)
    a, b = net.endpoint("a", "node-a"), net.endpoint("b", "node-b")
    garbled = Method("sum.garbled", Args, ANYONE, Sum)

    async def answer(caller, request):
        return {"total": "three"}

    b.route(garbled, answer)
    with pytest.raises(RemoteError, match=r"^b: sum.garbled answer.total: expected int, got str$") as caught:
        await a.ask("b", garbled, Args())
    assert caught.value.kind == "bad_answer"
    assert await a.call("b", "sum.garbled", {}) == {"total": "three"}  # unchecked: what the caller asked for


@pytest.mark.parametrize("clock", ["mock", "sim"])
def test_a_cut_loses_requests_one_way_and_answers_the_other(clock):
    """Cut a → b: a's request never arrives (the handler does not run); cut b → a: the handler runs, its answer
    is lost. Either way the caller times out, on both clocks."""
    net, a, b = net_of_two()
    ran = []

    async def note(caller, request):
        ran.append(request.x)
        return True

    b.route(method_named("note"), note)

    async def main():
        for pair, x in (((("a", "b")), 1), ((("b", "a")), 2)):
            net.cut = {pair}
            with pytest.raises(RpcTimeout):
                await a.call("b", "note", {"x": x}, timeout=1.0)
        net.cut = set()
        assert await a.call("b", "note", {"x": 3}, timeout=1.0)

    trio.run(main, clock=MockClock(autojump_threshold=0) if clock == "mock" else SimClock())
    assert ran == [2, 3]


def test_random_loss_drops_about_its_share():
    net, a, b = net_of_two(latency=0.0)

    async def ok(caller, request):
        return True

    b.route(method_named("ok"), ok)
    net.loss = 0.25

    async def main():
        answered = 0
        for _ in range(400):
            with contextlib.suppress(RpcTimeout):
                answered += await a.call("b", "ok", {}, timeout=0.1)
        return answered

    answered = trio.run(main, clock=MockClock(autojump_threshold=0))
    assert 400 * 0.75 ** 2 * 0.85 < answered < 400 * 0.75 ** 2 * 1.15  # each way loses 1/4
