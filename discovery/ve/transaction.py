"""What the VE transactions' sans-IO cores (`discovery.ve.moves`, `discovery.ve.failovers`,
`discovery.ve.snapshotting`) and their one driver (`discovery.ve.driver`) say to each other.

A VE operation that must survive a crash halfway (a relocation, a failover, a snapshot) is a small
transaction whose log is the VE record. Its logic is a state machine that never touches a socket, a
clock or trio: `start(now)` returns its first action; the driver performs it (an RPC to a host, a read or
a write of the record, a test pause) and feeds back what it saw with `on(observation, now)`, which returns
the next action, until `Done` or `Refuse`. One action at a time: every step of these transactions
depends on the answer to the one before. Time (`now`, wall-clock seconds, as the record's `since`
fields) is passed in; a limit reaches the driver as the seconds an action may take (`within`), and its
expiry comes back as `TimedOut`.

So the whole table of a transaction (phase × who holds what × who answers) and random interleavings of
crashes, recoverers and flapping reachability are tested on the cores alone (`discovery.ve.world` performs
actions in memory); a process-kill test then proves only the wrapping.

This module must never import trio, the agent or the transport: cores that use it stay pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from discovery.ve.records import Place, VERecord

# -- actions: what a core asks its driver to do ---------------------------------------------------------


@dataclass(frozen=True)
class CallHost:
    """`method` with `args` on the agent of `node` at `addr`. Answered by `HostAnswered`, or `HostFailed`
    (refused, or not reached). `timeout`: None for the driver's default for host calls. `best_effort`: a
    failure is expected and only noted (the core goes on either way). `within`: the seconds left of the
    limit this step runs under (None: none); the driver answers `TimedOut` once they pass."""

    node: str
    addr: str
    method: str
    args: Mapping[str, Any]
    timeout: float | None = None
    best_effort: bool = False
    within: float | None = None


@dataclass(frozen=True)
class Probe:
    """Whether `node` holds `domain` (defined and persisted there; a reservation or a standby does not
    count). Answered by `Probed`."""

    node: str
    addr: str
    domain: str
    timeout: float = 10.0


@dataclass(frozen=True)
class ReadRecord:
    """Read the VE record afresh. Answered by `RecordRead` or `DirectoryFailed`."""


@dataclass(frozen=True)
class WriteRecord:
    """Write `value` as the VE record's next version, after the version last read or written. Answered by
    `RecordWritten` or `DirectoryFailed`."""

    value: VERecord


@dataclass(frozen=True)
class PauseForTest:
    """A point where a process-kill test may stop the coordinator (`discovery.ve.base.pause_for_test`);
    answered by `Continued`, or `TimedOut` if it outlasts `within`."""

    point: str
    within: float | None = None


@dataclass(frozen=True)
class Done:
    """The transaction is over; `result` says how (each core documents it)."""

    result: Any = None


@dataclass(frozen=True)
class Refuse:
    """The transaction stops here; the caller gets `reason`, as a request error of `kind` (bad_request,
    not_found, conflict). Whatever the intent left in the record is for the next attempt to settle."""

    reason: str
    kind: str = "bad_request"


Action = CallHost | Probe | ReadRecord | WriteRecord | PauseForTest | Done | Refuse


# -- observations: what the driver saw ------------------------------------------------------------------


@dataclass(frozen=True)
class HostAnswered:
    node: str
    answer: Any


@dataclass(frozen=True)
class HostFailed:
    """The host refused, or could not be reached; `reason` is one line naming the node. Whether the call
    took effect is unknown: recovery asks the hosts, it never assumes."""

    node: str
    reason: str


@dataclass(frozen=True)
class Probed:
    """`holds`: True (with the host's `info` answer), False (the host answered that it does not hold the
    domain), None (unknown: not reached, or another error; `reason` says which)."""

    node: str
    holds: bool | None
    answer: Mapping[str, Any] | None = None
    reason: str = ""


@dataclass(frozen=True)
class RecordRead:
    """The record's value; None if the VE is gone (destroyed)."""

    value: VERecord | None


@dataclass(frozen=True)
class RecordWritten:
    pass


@dataclass(frozen=True)
class DirectoryFailed:
    """A read or write of the record failed (no replica answered, a write not acknowledged, a conflict)."""

    reason: str
    kind: str = "bad_request"


@dataclass(frozen=True)
class TimedOut:
    """The action ran past its `within`."""


@dataclass(frozen=True)
class Continued:
    """A test pause is over."""


Observation = HostAnswered | HostFailed | Probed | RecordRead | RecordWritten | DirectoryFailed | TimedOut | Continued


class Core(Protocol):
    """A transaction's state machine: `start` once, then `on` with what each action led to."""

    def start(self, now: float) -> Action: ...

    def on(self, observation: Observation, now: float) -> Action: ...


class UnexpectedObservation(Exception):
    """A driver fed a core an observation that does not answer the action it asked for: a bug."""

    def __init__(self, core: object, step: object, observation: Observation) -> None:
        super().__init__(f"{type(core).__name__} in step {step} cannot take {observation}")


def vm_action(where: Place, domain: str, method: str, **extra: Any) -> CallHost:
    """`method` (a `host.vm.*` verb) on `domain` at the host a slot or an intent names."""
    return CallHost(where.node, where.addr, method, {"name": domain, **extra})


def probe(where: Place, domain: str) -> Probe:
    return Probe(where.node, where.addr, domain)
