"""The VE service's RPCs (`ve.*`): what users call through any agent, and `ve.busy` between agents.

Anyone with a certificate may call the user-facing methods; each handler then checks that the caller
owns the VE or is an operator (`discovery.ve.base.may_act`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from overlay.wire.codec import limit
from overlay.wire.rpc import ANYONE, NODE, OPERATOR, Method

NAME = 200


@dataclass(frozen=True)
class Create:
    spec: Any


@dataclass(frozen=True)
class Named:
    name: Any


@dataclass(frozen=True)
class ListPage:
    limit: Any = None
    cursor: Any = None


@dataclass(frozen=True)
class Stop:
    name: Any
    timeout: Any = None
    force: bool = False


@dataclass(frozen=True)
class Relocate:
    name: Any
    vm: Any = None
    to: Any = None
    site: Any = None
    method: Any = None


@dataclass(frozen=True)
class Tagged:
    name: Any
    tag: Any = field(default=None, metadata=limit(NAME))


@dataclass(frozen=True)
class Replicate:
    name: Any
    copies: Any = None


@dataclass(frozen=True)
class Failover:
    name: Any
    vm: Any = None
    force: bool = False


VE_CREATE = Method("ve.create", Create, ANYONE)
VE_LIST = Method("ve.list", ListPage, ANYONE)
VE_SHOW = Method("ve.show", Named, ANYONE)
VE_LOCATE = Method("ve.locate", Named, ANYONE)
VE_START = Method("ve.start", Named, ANYONE)
VE_STOP = Method("ve.stop", Stop, ANYONE)
VE_SUSPEND = Method("ve.suspend", Named, ANYONE)
VE_RESUME = Method("ve.resume", Named, ANYONE)
VE_DESTROY = Method("ve.destroy", Named, ANYONE)
VE_RELOCATE = Method("ve.relocate", Relocate, ANYONE)
VE_SNAPSHOT = Method("ve.snapshot", Tagged, ANYONE)
VE_SNAPSHOTS = Method("ve.snapshots", Named, ANYONE)
VE_RESTORE = Method("ve.restore", Tagged, ANYONE)
VE_SNAPSHOT_DELETE = Method("ve.snapshot_delete", Tagged, ANYONE)
VE_REPLICATE = Method("ve.replicate", Replicate, ANYONE)
VE_FAILOVER = Method("ve.failover", Failover, ANYONE)
VE_BUSY = Method("ve.busy", Named, frozenset({NODE, OPERATOR}))
