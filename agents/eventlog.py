"""The last notable things that happened on or around this node, kept for `discovery top`.

An operator's live view wants "what just happened" without scraping logs: members that joined, became
suspect, died or left (as this node's gossip saw them), VEs created and destroyed, VMs relocated, failed
over or rebuilt (by the agent that coordinated it). Each layer notes its own events where they happen;
this is only the bounded ring they land in, so it costs the same whatever the cluster does. It must never
grow with time nor block: `note` is synchronous and O(1).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from agents.runtime import Event
from overlay.wire.codec import limit

MAX_EVENTS = 64
"""Events one node keeps: the oldest falls off."""
MEMBER_EVENTS = {"member_joined", "member_suspect", "member_alive", "member_dead", "member_left"}
"""The membership news (`overlay.membership`) worth an operator's eye; `member_alive` is a refuted suspicion."""
DETAIL = 200


@dataclass(frozen=True)
class LoggedEvent:
    """One event: when (seconds since the epoch), what (`member_dead`, `ve_created`, `vm_relocated`...), about
    what (a node, a VE, `ve/vm`) and a short detail (e.g. `node2 -> node5`)."""

    time: float
    kind: str = field(metadata=limit(DETAIL))
    subject: str = field(metadata=limit(DETAIL))
    detail: str = field(default="", metadata=limit(DETAIL))


class EventLog:
    """A ring of the last MAX_EVENTS events, oldest first."""

    def __init__(self, size: int = MAX_EVENTS) -> None:
        self._ring: deque[LoggedEvent] = deque(maxlen=size)

    def note(self, kind: str, subject: str, detail: str = "") -> None:
        self._ring.append(LoggedEvent(time.time(), kind, subject[:DETAIL], detail[:DETAIL]))

    def on_member(self, event: Event) -> None:
        """A `Notifier` subscriber: the membership news, the node's site as detail."""
        self.note(event.kind, event.data["name"], event.data.get("site", ""))

    def recent(self, count: int) -> list[LoggedEvent]:
        """The last `count` events, oldest first."""
        return list(self._ring)[-count:] if count > 0 else []
