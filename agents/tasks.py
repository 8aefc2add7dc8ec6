"""What every trio task of the agent awaits, for an operator's SIGUSR1 (like a Go program's SIGQUIT): an agent
that seems stuck tells where, in its log, without stopping."""

from __future__ import annotations

from collections.abc import Iterator
from types import CoroutineType, FrameType
from typing import Any

import trio

SHOWN = 4
"""Frames shown per task: the innermost of its own code (trio's frames left out)."""


def awaiting(coro: Any) -> Iterator[FrameType]:
    """The frames of the chain of awaits from `coro` down to where it is blocked."""
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            yield frame
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)


def dump() -> str:
    """Every task under the root task, indented by nursery, with where it waits."""
    lines: list[str] = []

    def walk(task: trio.lowlevel.Task, depth: int) -> None:
        frames = [f for f in awaiting(task.coro) if "/trio/" not in f.f_code.co_filename] \
            if isinstance(task.coro, CoroutineType) else []
        where = " <- ".join(f"{f.f_code.co_filename.rsplit('/', 2)[-1]}:{f.f_lineno} {f.f_code.co_name}"
                            for f in reversed(frames[-SHOWN:]))
        lines.append("  " * depth + f"{task.name}: {where or '?'}")
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child, depth + 1)

    root = trio.lowlevel.current_root_task()
    if root is not None:
        walk(root, 0)
    return "\n".join(lines)
