"""The task dump an agent logs on SIGUSR1 (`agents.tasks`): each task, where in its own code it waits."""

from __future__ import annotations

import trio

from agents import tasks


async def parked(ready: trio.Event) -> None:
    ready.set()
    await trio.sleep_forever()


async def test_the_dump_names_each_task_and_the_line_it_waits_at() -> None:
    async with trio.open_nursery() as nursery:
        ready = trio.Event()
        nursery.start_soon(parked, ready, name="parked-task")
        await ready.wait()
        dump = tasks.dump()
        nursery.cancel_scope.cancel()
    line = next(x for x in dump.splitlines() if "parked-task" in x)
    assert "test_tasks.py:" in line and "parked" in line.split(":", 1)[1] and "/trio/" not in line
