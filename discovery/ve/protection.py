"""What protects each VM of a VE, and how well: the `protection` that `ve show` adds to the record.

Per VM: the VE's HA policy (`discovery.ve.spec.HaPolicy`), its standby copies with their age (`lag`: seconds
since the copy was taken, or for the copy its host mirrors the disk to, once the mirror is ready, how far
behind the mirror is, as the host measures it: `agents.host.replication`; `mirror`: that mirror's state),
its last snapshot (kept by its host), its last shipped snapshot (`discovery.ve.shipped`: image, digest, time),
and a status:

- `unprotected`: the policy is `none` (copies made by hand with `ve replicate` are listed all the same);
- `standby`: `protected` while at least `copies` of its copies are held by their nodes (the VM's own host
  excepted) and its mirror, if ready, is at most `max_lag` behind; else `degraded`, saying how many are held,
  what the others' nodes answered, why the last attempt to make them fell short if it did (the record's
  `shortfall`), or how far behind the mirror is;
- `restart`: `protected` without periodic snapshots (it restarts from its image), or while its last shipped
  snapshot (or, before the first, the VE's creation) is at most twice `snapshot_every` old, or while the VE
  does not run (nothing is written that its last snapshot lacks; none is shipped meanwhile); else `degraded`.
  Only a shipped snapshot counts: the others are kept by the VM's host, and die with it.

Pure: `assess` reads a record, what the copies' nodes answered and the time; `VEService._on_show` asks the
nodes. It must never import trio or the transport.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from discovery.ve.records import Standby, VERecord
from discovery.ve.shipped import ShippedSnapshot
from discovery.ve.spec import HaPolicy, format_duration
from overlay.wire.codec import sparse

Status = Literal["protected", "degraded", "unprotected"]
HELD = "held"
MISSING = "missing"
LATE_FACTOR = 2
"""A restart point older than this many `snapshot_every` is late: the VM counts as degraded."""


@dataclass(frozen=True)
class CopyAge:
    """A standby copy of the VM: where, when it was taken, how old it is, and what its node answered."""

    node: str
    site: str
    taken: float
    lag: float
    standby: str
    """`held`, `missing`, or `unknown (why)` (the node did not answer)."""
    mirror: str | None = field(default=None, metadata=sparse())
    """The state of the mirror of the VM's disk to this copy (`agents.messages.MirrorStatus`), if one runs."""


@dataclass(frozen=True)
class VMProtection:
    """One VM's protection (module docstring); `why` says what a degraded VM lacks."""

    status: Status
    policy: HaPolicy
    copies: tuple[CopyAge, ...] = field(default=(), metadata=sparse())
    last_snapshot: float | None = field(default=None, metadata=sparse())
    why: str | None = field(default=None, metadata=sparse())
    last_shipped: ShippedSnapshot | None = field(default=None, metadata=sparse())


def copy_state(answer: object, domain: str) -> str:
    """What a node's `host.standbys` answer (a list of copies, or the error of the call) says of `domain`'s."""
    if isinstance(answer, list):
        return HELD if any(isinstance(s, dict) and s.get("name") == domain for s in answer) else MISSING
    return f"unknown ({answer})"


def assess(ve: VERecord, states: Mapping[str, Sequence[str]], now: float,
           shipped: Mapping[str, ShippedSnapshot] | None = None,
           mirrors: Mapping[str, Mirror] | None = None) -> dict[str, VMProtection]:
    """Each VM's protection; `states[vm]`: what the nodes of its copies answered (`copy_state`), in the
    record's order (a VM without copies may be left out); `shipped[vm]`: its last shipped snapshot, if any;
    `mirrors[vm]`: the mirror of its disk as its host answered (`host.mirrors`), if one is kept."""
    policy = ve.spec.ha
    found = {}
    for vm, slot in sorted(ve.placement.items()):
        listed = ve.standbys_of(vm)
        answered = states.get(vm, ["unknown (not asked)"] * len(listed))
        mirror = (mirrors or {}).get(vm)
        copies = tuple(_copy(e, state, now, mirror if mirror is not None and mirror.node == e.node else None)
                       for e, state in zip(listed, answered, strict=True))
        last = max((s.time for s in ve.snapshots if vm in s.vms), default=None)
        ship = (shipped or {}).get(vm)
        if policy.mode == "standby":
            why = _standby_shortfall(ve, policy, slot.node, copies) or _behind(policy, mirror)
        elif policy.mode == "restart":  # a VE that does not run writes nothing its last snapshot lacks
            why = _late_snapshot(policy, ship.time if ship is not None else None, ve.created, now) \
                if ve.state == "running" else None
        else:
            found[vm] = VMProtection("unprotected", policy, copies, last, last_shipped=ship)
            continue
        found[vm] = VMProtection("degraded" if why else "protected", policy, copies, last, why, ship)
    return found


@dataclass(frozen=True)
class Mirror:
    """What `ve show` needs of a host's `host.mirrors` entry: the copy's node, the state, the lag."""

    node: str
    state: str
    lag: float
    held: int = 0
    """The cap on the guest's writes while the mirror catches up (bytes/s; 0: none)."""


def _copy(entry: Standby, state: str, now: float, mirror: Mirror | None) -> CopyAge:
    lag = mirror.lag if mirror is not None and mirror.state == "ready" else max(0.0, now - entry.taken)
    return CopyAge(entry.node, entry.site, entry.taken, lag, state, mirror.state if mirror is not None else None)


def _behind(policy: HaPolicy, mirror: Mirror | None) -> str | None:
    """Why the VM's mirror is too far behind (ready, lagging more than `max_lag`), or None."""
    if mirror is None or mirror.state != "ready" or mirror.lag <= policy.max_lag:
        return None
    held = f"; its writes are held to {mirror.held / (1 << 20):.1f} MiB/s until it catches up" if mirror.held else ""
    return (f"its mirror to {mirror.node} is {mirror.lag:.1f} s behind "
            f"(the policy allows {format_duration(policy.max_lag)}){held}")


def _standby_shortfall(ve: VERecord, policy: HaPolicy, host: str, copies: Sequence[CopyAge]) -> str | None:
    """Why the VM on `host` has fewer held copies than the policy asks, or None if it has enough."""
    held = [c for c in copies if c.standby == HELD and c.node != host]
    if len(held) >= policy.copies:
        return None
    own = "on the VM's own host"
    others = [f"{c.node}: {own if c.node == host else c.standby}" for c in copies if c not in held]
    why = f"{len(held)} of {policy.copies} standby copies held" + (f" ({', '.join(others)})" if others else "")
    return why + (f"; {ve.shortfall.why}" if ve.shortfall is not None else "")


def _late_snapshot(policy: HaPolicy, last: float | None, created: float, now: float) -> str | None:
    """Why the VM's restart point (`last`: its last shipped snapshot's time) is late, or None if it is not (or
    the policy takes no periodic snapshot)."""
    every = policy.snapshot_every
    if every is None:
        return None
    age = now - (last if last is not None else created)
    if age <= LATE_FACTOR * every:
        return None
    shown = format_duration(int(age))
    what = (f"last shipped snapshot {shown} old" if last is not None
            else f"no shipped snapshot in the {shown} since the VE was created")
    return f"{what}; the policy takes one every {format_duration(every)}"
