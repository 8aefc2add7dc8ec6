"""The VE service's RPCs (`ve.*`): what users call through any agent, and `ve.busy` between agents.

Anyone with a certificate may call the user-facing methods; each handler then checks that the caller
owns the VE or is an operator (`discovery.ve.base.may_act`). Handlers receive these requests decoded;
the rules the codec cannot say (a timeout in bounds, a target node or site but not both, a tag's
characters) each type checks in `__post_init__`. A spec is no type of the codec's: `ve.create` checks it
with its own validator (`discovery.ve.spec.VESpec.from_dict`), which names the field and what is wrong.

Answers. Most `ve.*` methods answer with the VE's record as users see it (`discovery.ve.records.view`: the
stored shape, without the format version; `ve show --json` prints it), plus what the verb adds (`moved`,
`added`/`dropped`, `failed_over`, `rebuilt`; `ve show` the hosts' word on each VM and its protection). That
map is the contract, so it is declared as one (`RecordView`): a dataclass beside `VERecord` would be a second
definition of the record's shape, to be kept in step field by field, for a caller (the CLI) that only prints
it. The views that are not the record (`ve.list`'s page, `ve.locate`, the snapshots) are dataclasses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from agents.host.args import check_timeout
from discovery.ve.index import DEFAULT_LIMIT, MAX_LIMIT
from discovery.ve.records import SnapshotEntry, VEState
from discovery.ve.spec import MAX_COPIES
from overlay.wire import codec
from overlay.wire.codec import limit, sparse, wire
from overlay.wire.rpc import ANYONE, NODE, OPERATOR, Method, RequestError

NAME = 200
METHODS = ("auto", "live", "ship")
"""How a relocation moves a real guest: live where it can, else shipped (auto), or only one way."""
EITHER = "relocate needs either a target node (to) or a target site (site)"
TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
TAG_RULE = "1-63 characters of A-Z, a-z, 0-9, '.', '_' or '-', starting with a letter or digit"

RecordView = dict[str, Any]
"""A VE as the `ve.*` answers show it (`discovery.ve.records.view`, and what the verb adds)."""


def non_empty(value: str | None, field: str) -> None:
    if value is not None and not value:
        raise RequestError(f"{field} must be a non-empty string")


@dataclass(frozen=True)
class Create:
    spec: Any
    """The spec as `VESpec.to_dict` writes it; the handler checks it (`VESpec.from_dict`)."""


@dataclass(frozen=True)
class Named:
    name: str = field(metadata=limit(NAME))

    def __post_init__(self) -> None:
        if not self.name:
            raise RequestError("a VE name is required")


@dataclass(frozen=True)
class ListPage:
    limit: int = DEFAULT_LIMIT
    cursor: str | None = field(default=None, metadata=codec.limit(NAME))  # `limit` is the field's name here
    """A previous page's `next_cursor` (`discovery.ve.index.Cursor`); None: the first page."""

    def __post_init__(self) -> None:
        if not 1 <= self.limit <= MAX_LIMIT:
            raise RequestError(f"limit must be an integer from 1 to {MAX_LIMIT}")


@dataclass(frozen=True)
class Stop(Named):
    timeout: float | None = None
    """Seconds each guest has to power off (default and bounds: `agents.host.args`)."""
    force: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.force and self.timeout is not None:
            raise RequestError("stop takes a timeout or force, not both")
        if self.timeout is not None:
            check_timeout(self.timeout)


@dataclass(frozen=True)
class Relocate(Named):
    vm: str | None = field(default=None, metadata=limit(NAME))
    """One VM of the VE; None: all of them."""
    to: str | None = field(default=None, metadata=limit(NAME))
    site: str | None = field(default=None, metadata=limit(NAME))
    method: str | None = field(default=None, metadata=limit(NAME))
    """One of METHODS; None: auto."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.to is None) == (self.site is None):
            raise RequestError(EITHER)
        if self.method is not None and self.method not in METHODS:
            raise RequestError(f"method must be one of {', '.join(METHODS)}")
        for name in ("vm", "to", "site"):
            non_empty(getattr(self, name), name)


@dataclass(frozen=True)
class TakeSnapshot(Named):
    tag: str | None = field(default=None, metadata=limit(NAME))
    """TAG_RULE; None (or empty): named after the time."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tag and not TAG_RE.fullmatch(self.tag):
            raise RequestError(f"a snapshot tag is {TAG_RULE}")


@dataclass(frozen=True)
class Tagged(Named):
    tag: str = field(metadata=limit(NAME))

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.tag:
            raise RequestError("a snapshot tag is required")


@dataclass(frozen=True)
class ShippedOf(Named):
    """`ve.restore_point`: VM `vm`'s shipped snapshot `tag` (None: the newest)."""

    vm: str = field(metadata=limit(NAME))
    tag: str | None = field(default=None, metadata=limit(NAME))

    def __post_init__(self) -> None:
        super().__post_init__()
        non_empty(self.vm, "vm")
        non_empty(self.tag, "tag")


@dataclass(frozen=True)
class Replicate(Named):
    copies: int

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.copies <= MAX_COPIES:
            raise RequestError(f"copies must be a whole number from 0 to {MAX_COPIES}")


@dataclass(frozen=True)
class SetHa(Named):
    ha: Any
    """The HA policy as a spec writes it (`ha: {mode: ..., ...}`); the handler checks it (`HaPolicy.from_dict`),
    so that its refusals read as a spec's do."""


@dataclass(frozen=True)
class FailoverRequest(Named):
    vm: str | None = field(default=None, metadata=limit(NAME))
    """One VM of the VE; None: every VM whose host is down."""
    force: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        non_empty(self.vm, "vm")


@dataclass(frozen=True)
class RebuildRequest(FailoverRequest):
    """`ve.rebuild` chooses its VMs as `ve.failover` does."""


# -- answers that are not the record ----------------------------------------------------------------------


@dataclass(frozen=True)
class Page:
    """`ve.list`: a page of VEs (each as `RecordView`), and where the next starts (None: this was the last)."""

    ves: list[RecordView]
    next_cursor: str | None


@dataclass(frozen=True)
class MovingTo:
    node: str
    site: str
    phase: str


@dataclass(frozen=True)
class FailingOverTo:
    node: str
    site: str
    source: str = field(metadata=wire("from"))


@dataclass(frozen=True)
class RebuildingOn(FailingOverTo):
    """Where a VM is being rebuilt, from which host: as a failover under way."""


@dataclass(frozen=True)
class CopyAt:
    node: str
    site: str
    taken: float


@dataclass(frozen=True)
class Location:
    """Where one VM runs, by the record; and where it is going (a move, a failover, a rebuild under way), and
    its standby copies, if any."""

    node: str
    site: str
    addr: str
    moving_to: MovingTo | None = field(default=None, metadata=sparse())
    failing_over: FailingOverTo | None = field(default=None, metadata=sparse())
    rebuilding: RebuildingOn | None = field(default=None, metadata=sparse())
    replicas: list[CopyAt] | None = field(default=None, metadata=sparse())


@dataclass(frozen=True)
class Located:
    """`ve.locate`: where each VM runs, from the directory alone (no host is asked)."""

    name: str
    state: VEState
    vms: dict[str, Location]


@dataclass(frozen=True)
class VESnapshot(SnapshotEntry):
    """`ve.snapshot`: the snapshot as the record lists it, and the VE's name."""

    name: str


@dataclass(frozen=True)
class ShippedImage:
    """A shipped snapshot (`discovery.ve.shipped`): its image, the image's digest, when it was taken, and the
    nodes that hold it (node -> site, as the catalogue lists them)."""

    image: str
    digest: str
    time: float
    holders: dict[str, str]


@dataclass(frozen=True)
class ShippedVM:
    """`ve.ship`, per VM: the shipped snapshot, the host that took it, the bytes each new holder fetched (the
    chunks it lacked and the manifest), how long the VM was paused, the seconds it all took, the snapshots
    pruned beyond the policy's `keep`."""

    shipped: ShippedImage
    host: str
    sent: dict[str, int]
    paused: float
    seconds: float
    pruned: list[str]


@dataclass(frozen=True)
class Shipment:
    """`ve.ship`: a shipped snapshot of every VM of VE `name`."""

    name: str
    vms: dict[str, ShippedVM]


@dataclass(frozen=True)
class SnapshotList:
    """`ve.snapshots`, and `ve.snapshot_delete` (with the `tag` it deleted): the snapshots the record lists, and
    each VM's shipped snapshots, oldest first (`ve.snapshots`)."""

    name: str
    snapshots: list[SnapshotEntry]
    tag: str | None = field(default=None, metadata=sparse())
    shipped: dict[str, list[ShippedImage]] | None = field(default=None, metadata=sparse())


VE_CREATE = Method("ve.create", Create, ANYONE, RecordView)
VE_LIST = Method("ve.list", ListPage, ANYONE, Page)
VE_SHOW = Method("ve.show", Named, ANYONE, RecordView)
VE_LOCATE = Method("ve.locate", Named, ANYONE, Located)
VE_START = Method("ve.start", Named, ANYONE, RecordView)
VE_STOP = Method("ve.stop", Stop, ANYONE, RecordView)
VE_SUSPEND = Method("ve.suspend", Named, ANYONE, RecordView)
VE_RESUME = Method("ve.resume", Named, ANYONE, RecordView)
VE_DESTROY = Method("ve.destroy", Named, ANYONE, RecordView)
VE_RELOCATE = Method("ve.relocate", Relocate, ANYONE, RecordView)
VE_SNAPSHOT = Method("ve.snapshot", TakeSnapshot, ANYONE, VESnapshot)
VE_SNAPSHOTS = Method("ve.snapshots", Named, ANYONE, SnapshotList)
VE_RESTORE = Method("ve.restore", Tagged, ANYONE, RecordView)
VE_SNAPSHOT_DELETE = Method("ve.snapshot_delete", Tagged, ANYONE, SnapshotList)
VE_SHIP = Method("ve.ship", Named, ANYONE, Shipment)
VE_RESTORE_POINT = Method("ve.restore_point", ShippedOf, ANYONE, ShippedImage)
VE_REPLICATE = Method("ve.replicate", Replicate, ANYONE, RecordView)
VE_HA = Method("ve.ha", SetHa, ANYONE, RecordView)
VE_FAILOVER = Method("ve.failover", FailoverRequest, ANYONE, RecordView)
VE_REBUILD = Method("ve.rebuild", RebuildRequest, ANYONE, RecordView)
VE_BUSY = Method("ve.busy", Named, frozenset({NODE, OPERATOR}), bool)
VE_FORWARD = Method("ve.forward", Named, frozenset({NODE, OPERATOR}), bool)
