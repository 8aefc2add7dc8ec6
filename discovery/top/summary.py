"""The cluster's view merged from its members' answers (sans-IO: no clock, no network).

`summarize` is all `top.cluster` decides: one row per member, by site then name, whether or not the member
answered (a silent one says why, and never holds the view back); the events of every answer, newest first,
with the copies that several nodes noted of one thing (a death, which every member hears of) kept once; the
DVMS migrations under way first, then the newest that finished. Each list is cut to what the query asked.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from discovery.scheduler.messages import MigrationView
from discovery.top.messages import ClusterEvent, ClusterTop, NodeRow, NodeTop, TopQuery
from overlay.membership import ALIVE, SUSPECT, Member

SAME_EVENT_WINDOW = 30.0
"""Seconds within which events of one kind, subject and detail, noted on several nodes, are one event: gossip
spreads news across a cluster in a few probe rounds."""


def summarize(by: str, members: Iterable[Member], answers: Mapping[str, NodeTop | str], now: float,
              seconds: float, query: TopQuery) -> ClusterTop:
    """The view `by` gathered: `members` as its gossip sees them, `answers` by member name (the member's
    `NodeTop`, or why it gave none: `timeout`, `unreachable`...), at `now`, after `seconds` of gathering."""
    rows = [_row(m, answers.get(m.name)) for m in sorted(members, key=lambda m: (m.site, m.name))]
    told = [a for a in answers.values() if isinstance(a, NodeTop)]
    return ClusterTop(by, now, round(seconds, 3), rows, merge_events(told, query.events),
                      merge_migrations(told, query.migrations))


def _row(member: Member, answer: NodeTop | str | None) -> NodeRow:
    if isinstance(answer, NodeTop):
        return NodeRow(member.name, member.site, member.status, answer.usage, answer.partition)
    asked = member.status in (ALIVE, SUSPECT)
    return NodeRow(member.name, member.site, member.status, silent=(answer or "not asked") if asked else member.status)


def merge_events(answers: Iterable[NodeTop], count: int) -> list[ClusterEvent]:
    """The newest `count` events of all `answers`, newest first, each thing once (`SAME_EVENT_WINDOW`): its
    first note is kept, with the node that made it."""
    noted = sorted((ClusterEvent(e.time, e.kind, e.subject, e.detail, a.name) for a in answers for e in a.events),
                   key=lambda e: (e.time, e.node))
    kept: list[ClusterEvent] = []
    first: dict[tuple[str, str, str], float] = {}  # an event's key -> when its kept note was made
    for event in noted:
        key = (event.kind, event.subject, event.detail)
        if key in first and event.time - first[key] <= SAME_EVENT_WINDOW:
            continue
        first[key] = event.time
        kept.append(event)
    return kept[::-1][:count]


def merge_migrations(answers: Iterable[NodeTop], count: int) -> list[MigrationView]:
    """At most `count` migrations of all `answers`: those under way (oldest first), then the newest finished."""
    every = [m for a in answers for m in a.migrations]
    moving = sorted((m for m in every if m.state == "moving"), key=lambda m: m.time)
    finished = sorted((m for m in every if m.state != "moving"), key=lambda m: m.time, reverse=True)
    return [*moving, *finished][:count]
