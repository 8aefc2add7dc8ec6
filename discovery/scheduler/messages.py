"""The DVMS service's RPCs (`dvms.*`): the partitions' messages and reports between agents, the status
that operators read, and the test hooks that pin load (operators only: they change what the whole
cluster's scheduler does)."""

from __future__ import annotations

from dataclasses import dataclass

from dvms.partition import Wire
from overlay.messages import NoArgs
from overlay.wire.rpc import AGENTS, NODE, OPERATOR, OPERATORS, Method


@dataclass(frozen=True)
class Load:
    vm: str | None = None
    cpu: int | None = None
    cpu_capacity: int | None = None


DVMS_MSG = Method("dvms.msg", Wire, AGENTS)
DVMS_REPORT = Method("dvms.report", NoArgs, AGENTS)
DVMS_LOAD = Method("dvms.load", Load, OPERATORS)
DVMS_STATUS = Method("dvms.status", NoArgs, frozenset({NODE, OPERATOR}))
