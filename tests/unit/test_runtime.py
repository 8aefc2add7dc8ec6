"""Supervisor restarts, escalation, actor mailboxes, and notification fan-out."""

import pytest
import trio

from agents.runtime import Actor, EscalatedFailure, Notifier, Supervisor


async def test_crashed_service_is_restarted_then_finishes():
    runs = []

    async def flaky():
        runs.append(1)
        if len(runs) < 3:
            raise RuntimeError("boom")

    sup = Supervisor(max_restarts=5, window=60, backoff=0)
    await sup.supervise("flaky", flaky)
    assert len(runs) == 3 and sup.restarts == {"flaky": 2}


async def test_restart_budget_escalates():
    async def always_fails():
        raise RuntimeError("boom")

    with pytest.raises(EscalatedFailure, match="crashed 3 times"):
        await Supervisor(max_restarts=2, window=60, backoff=0).supervise("bad", always_fails)


class Counter(Actor):
    name = "counter"
    expected_errors = (ValueError,)

    def __init__(self):
        super().__init__()
        self.starts = 0
        self.count = 0

    async def start(self):
        self.starts += 1

    async def handle(self, message):
        if message == "bad":
            raise ValueError("bad message")
        if message == "crash":
            raise RuntimeError("bug")
        self.count += message
        await trio.sleep(0)  # messages are handled one at a time even across checkpoints
        return self.count


async def test_actor_serializes_messages_and_survives_expected_errors():
    actor = Counter()
    async with trio.open_nursery() as nursery:
        Supervisor(backoff=0).start_actor(nursery, actor)
        results = []

        async def add_one():
            results.append(await actor.ask(1))

        async with trio.open_nursery() as askers:
            for _ in range(20):
                askers.start_soon(add_one)
        assert sorted(results) == list(range(1, 21))  # no two handlers interleaved on the count
        with pytest.raises(ValueError):
            await actor.ask("bad")
        assert actor.starts == 1  # expected errors do not restart
        with pytest.raises(RuntimeError):
            await actor.ask("crash")
        await actor.ask(5)
        assert actor.starts == 2  # an unexpected error restarted it
        nursery.cancel_scope.cancel()


async def test_notifier_filters_kinds_and_a_full_mailbox_drops_instead_of_blocking():
    notifier = Notifier()
    dead_only, everything = [], Counter()
    everything._send, everything._receive = trio.open_memory_channel(1)
    notifier.subscribe(dead_only.append, {"member_dead"})
    notifier.subscribe(everything.tell_nowait)
    notifier.publish("member_joined", name="a")
    notifier.publish("member_dead", name="b")  # everything's mailbox is full: dropped, publish returns
    assert [e.data for e in dead_only] == [{"name": "b"}]
    message, reply = everything._receive.receive_nowait()
    assert message.kind == "member_joined" and reply is None
    with pytest.raises(trio.WouldBlock):
        everything._receive.receive_nowait()


class SlowTicker(Actor):
    name = "slow"
    tick_interval = 0.01

    def __init__(self):
        super().__init__()
        self.ticks = 0

    async def handle(self, message):
        await trio.sleep(0.1)  # ten tick periods: the tick must wait, not cancel the handler
        return message

    async def tick(self):
        self.ticks += 1


async def test_ticks_never_cut_a_handler_short(autojump_clock):
    actor = SlowTicker()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(actor.run)
        with trio.fail_after(5):  # a cancelled handler never replies: fail instead of hanging
            assert await actor.ask("done") == "done"
            assert await actor.ask("again") == "again"
        await trio.sleep(0.05)
        assert actor.ticks >= 2  # ticks still run between messages
        nursery.cancel_scope.cancel()
