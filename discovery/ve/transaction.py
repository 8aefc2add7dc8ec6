"""What the VE transactions' sans-IO cores (`discovery.ve.creating`, `discovery.ve.moves`,
`discovery.ve.failovers`, `discovery.ve.rebuilding`, `discovery.ve.snapshotting`) and their one driver
(`discovery.ve.driver`) say to each other.

A VE operation that must survive a crash halfway (a create, a relocation, a failover, a snapshot) is a
small transaction whose log is the VE record. Its logic is a state machine that never touches a socket, a
clock or trio: `start(now)` returns its first action; the driver performs it (an RPC to a host, a read or
a write of the record, a search for candidate nodes, a test pause) and feeds back what it saw with
`on(observation, now)`, which returns the next action, until `Done` or `Refuse`. One action at a time:
every step of these transactions depends on the answer to the one before; where calls must not wait for
one another (a create confirming every VM), one action holds them all (`CallHosts`). One exception: an
index update that no later step reads (a create's index entry) may run `Beside` the steps that follow,
its outcome taken with `Join` before the transaction ends. Time (`now`,
wall-clock seconds, as the record's `since` fields) is passed in; a limit reaches the driver as the
seconds an action may take (`within`), and its expiry comes back as `TimedOut`.

So the whole table of a transaction (phase × who holds what × who answers) and random interleavings of
crashes, recoverers and flapping reachability are tested on the cores alone (`discovery.ve.world` performs
actions in memory); a process-kill test then proves only the wrapping.

This module must never import trio, the agent or the transport: cores that use it stay pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from discovery.ve import placement as planner
from discovery.ve.records import Place, VERecord
from discovery.ve.spec import VESpec

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
class CallHosts:
    """Every call of `calls` at once, answered by one `HostsAnswered` once each has answered: for calls that
    must not wait for one another (a create's confirms: a guest slow to start must not make another VM's
    reservation lapse)."""

    calls: tuple[CallHost, ...]


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
class ClaimRecord:
    """Write `value` as the first record of a new VE if no live record holds its name: a write after the newest
    record under the name (none, or a tombstone) that a majority of its replicas decides. Answered by
    `RecordWritten`; `RecordRead` with the live record if the name is taken; `ClaimLost` if another writer
    won (read and claim again); or `DirectoryFailed`."""

    value: VERecord


@dataclass(frozen=True)
class DeleteRecord:
    """Delete the VE record: a tombstone as the version after the one last read or written (so it loses to
    a newer incarnation's record). Answered by `RecordWritten` or `DirectoryFailed`."""


@dataclass(frozen=True)
class AddToIndex:
    """Add VE `name`'s entry (its `owner`, the `uid` of its incarnation) to the directory's index (`ve list`).
    Answered by `Indexed` or `DirectoryFailed`."""

    name: str
    owner: str
    uid: str


@dataclass(frozen=True)
class RemoveFromIndex:
    """Remove the entry of incarnation `uid` of VE `name` from the index. Answered by `Indexed` or
    `DirectoryFailed`."""

    name: str
    uid: str


@dataclass(frozen=True)
class Beside:
    """Start `action` and answer `Begun` at once; it runs beside the actions that follow until `Join`. At most
    one at a time, and only an index update: nothing it does changes the record the next steps follow."""

    action: AddToIndex


@dataclass(frozen=True)
class Join:
    """Wait for the action started `Beside`; answered by what it led to (`Indexed` or `DirectoryFailed`)."""


@dataclass(frozen=True)
class FindCandidates:
    """The nodes the VMs of `spec` may go to, nearest first: this node, then those the spiral search finds with
    room for its smallest VM; with `everyone`, then every other live member, asked for its free room.
    Answered by `CandidatesFound` or `SearchFailed`."""

    spec: VESpec
    everyone: bool = False


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


Action = (CallHost | CallHosts | Probe | ReadRecord | WriteRecord | ClaimRecord | DeleteRecord | AddToIndex
          | RemoveFromIndex | Beside | Join | FindCandidates | PauseForTest | Done | Refuse)


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
class HostsAnswered:
    """What each call of a `CallHosts` led to, in the order of its calls."""

    answers: tuple[HostAnswered | HostFailed, ...]


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
class ClaimLost:
    """Another writer claimed the name first, or changed its record meanwhile (`reason` says which version)."""

    reason: str


@dataclass(frozen=True)
class Indexed:
    pass


@dataclass(frozen=True)
class Begun:
    """The action asked `Beside` has started."""


@dataclass(frozen=True)
class Candidate:
    """A node a new VE's VMs may go to: how near (`rtt_ms`: None if unknown), how it was found, and its free
    room as the node reports it (`{vcpus, memory_mb, disk_gb}`; None: unknown, so not planned on)."""

    node: str
    addr: str
    site: str
    rtt_ms: float | None
    found_by: str = ""
    free: Mapping[str, int] | None = None
    holds_image: bool = False
    """Whether the node holds every image the VE boots (placement prefers such nodes)."""

    def offer(self, rank: int) -> planner.Candidate:
        free = self.free or {}
        return planner.Candidate(self.node, self.site, int(free.get("vcpus", 0)), int(free.get("memory_mb", 0)),
                                 int(free.get("disk_gb", 0)), rank)

    def describe(self, coordinator: str, image: bool = False) -> str:
        """Why this node, for a VM; `image`: the VM boots an image (whether the node holds it is then said)."""
        held = ", holds the image" if image and self.holds_image else ""
        if self.node == coordinator:
            return "this node" + held
        by = f", found by {self.found_by}" if self.found_by else ""
        return ("rtt unknown" if self.rtt_ms is None else f"{self.rtt_ms:.1f} ms") + by + held


@dataclass(frozen=True)
class CandidatesFound:
    candidates: tuple[Candidate, ...]


@dataclass(frozen=True)
class SearchFailed:
    """No candidates: none live in the VE's site, or the search failed (`kind` as a request error's)."""

    reason: str
    kind: str = "bad_request"


@dataclass(frozen=True)
class TimedOut:
    """The action ran past its `within`."""


@dataclass(frozen=True)
class Continued:
    """A test pause is over."""


Observation = (HostAnswered | HostFailed | HostsAnswered | Probed | RecordRead | RecordWritten | DirectoryFailed
               | ClaimLost | Indexed | Begun | CandidatesFound | SearchFailed | TimedOut | Continued)


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
