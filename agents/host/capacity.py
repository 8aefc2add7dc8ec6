"""What a node has, what it has promised, and what is in use: the target side of placement.

The embedded libvirt driver accounts nothing, so the agent does. Placement is a two-phase
handshake: the target `reserve`s a slot (held until `expires`), the requester `confirm`s it, and an
unconfirmed reservation lapses by itself, so a requester that dies mid-placement leaks nothing.
No clocks inside: `now` is a parameter.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Resources:
    vcpus: int = 0
    memory_mb: int = 0
    disk_gb: int = 0

    def __add__(self, other: Resources) -> Resources:
        return Resources(self.vcpus + other.vcpus, self.memory_mb + other.memory_mb, self.disk_gb + other.disk_gb)

    def __sub__(self, other: Resources) -> Resources:
        return Resources(self.vcpus - other.vcpus, self.memory_mb - other.memory_mb, self.disk_gb - other.disk_gb)

    def shortfall(self, need: Resources) -> str | None:
        """Why `need` does not fit in self (None if it fits), in words a user can act on."""
        missing = [f"{n} {unit} (has {h})" for n, h, unit in (
            (need.vcpus, self.vcpus, "vCPUs"), (need.memory_mb, self.memory_mb, "MiB memory"),
            (need.disk_gb, self.disk_gb, "GiB disk")) if n > h]
        return "needs " + ", ".join(missing) if missing else None

    def to_wire(self) -> dict[str, int]:
        return {"vcpus": self.vcpus, "memory_mb": self.memory_mb, "disk_gb": self.disk_gb}


class Insufficient(Exception):
    """The node cannot take the request; the message says what is missing."""


class UnknownReservation(Exception):
    """The token is unknown: never issued, already confirmed or released, or expired."""


@dataclass(frozen=True)
class Reservation:
    token: str
    key: str
    need: Resources
    expires: float


class Ledger:
    def __init__(self, total: Resources) -> None:
        self.total = total
        self.allocated: dict[str, Resources] = {}
        self.reserved: dict[str, Reservation] = {}
        self._tokens = itertools.count(1)

    def free(self, now: float) -> Resources:
        self.expire(now)
        used = sum(self.allocated.values(), Resources())
        held = sum((r.need for r in self.reserved.values()), Resources())
        return self.total - used - held

    def reserve(self, key: str, need: Resources, now: float, ttl: float) -> Reservation:
        if key in self.allocated or any(r.key == key for r in self.reserved.values()):
            raise Insufficient(f"{key} is already placed or reserved here")
        why = self.free(now).shortfall(need)
        if why:
            raise Insufficient(why)
        reservation = Reservation(f"{key}#{next(self._tokens)}", key, need, now + ttl)
        self.reserved[reservation.token] = reservation
        return reservation

    def confirm(self, token: str, now: float) -> Reservation:
        self.expire(now)
        reservation = self.reserved.pop(token, None)
        if reservation is None:
            raise UnknownReservation(f"reservation {token} is unknown or expired")
        self.allocated[reservation.key] = reservation.need
        return reservation

    def renew(self, token: str, now: float, ttl: float) -> Reservation:
        """Hold a reservation `ttl` seconds more (its host is still preparing for the VM: an image prefetch)."""
        self.expire(now)
        held = self.reserved.get(token)
        if held is None:
            raise UnknownReservation(f"reservation {token} is unknown or expired")
        self.reserved[token] = replace(held, expires=now + ttl)
        return self.reserved[token]

    def release(self, token: str) -> None:
        self.reserved.pop(token, None)

    def expire(self, now: float) -> list[Reservation]:
        lapsed = [r for r in self.reserved.values() if r.expires <= now]
        for r in lapsed:
            del self.reserved[r.token]
        return lapsed

    def allocate(self, key: str, need: Resources) -> None:
        """Account a VM that is already here (recovery after a restart)."""
        self.allocated[key] = need

    def deallocate(self, key: str) -> None:
        self.allocated.pop(key, None)
