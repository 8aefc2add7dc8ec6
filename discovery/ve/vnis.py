"""VXLAN identifiers (VNIs) claimed in the directory: one per VE network, never two networks with one VNI.

A claim is the record `vni/<n>` naming the VE incarnation and network that hold `n`, written by compare-and-set
(`put_if`) on the key's fixed replicas (the agent pins `vni/` as it pins `ve/`, `overlay.quorum`), so of two
creates that draw the same VNI at once exactly one wins and the other draws its next one
(`discovery.ve.addressing.vni_candidates`). Claims are made before the VE's record is claimed, and a create that
fails releases them; one left by a coordinator that died is taken over once it is STALE seconds old and the
directory holds no VE that uses it (a create takes seconds, so a claim that old whose VE record does not list it
belongs to no create still at work). `ve destroy` releases the VE's claims after its record is gone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from itertools import islice

from discovery.ve.addressing import vni_candidates
from discovery.ve.directory import Directory
from overlay.dht import Record, WriteConflict
from overlay.wire import codec
from overlay.wire.codec import CodecError
from overlay.wire.rpc import RequestError, RpcError

log = logging.getLogger(__name__)
PREFIX = "vni/"
STALE = 3600.0
"""Seconds after which a claim its VE does not use may be taken over (module docstring)."""
ATTEMPTS = 64
"""VNIs a network tries before its create is refused: with 16 million, only a nearly full range runs out."""


@dataclass(frozen=True)
class Claim:
    """Who holds a VNI: the VE, its incarnation and network, since when (wall clock)."""

    ve: str
    uid: str
    network: str
    since: float


class Vnis:
    """Claims and releases VNIs in `directory`'s records; `wall` is the wall clock (tests pass their own)."""

    def __init__(self, directory: Directory, wall: Callable[[], float] = time.time) -> None:
        self.directory = directory
        self.wall = wall

    async def claim(self, ve: str, uid: str, networks: Iterable[str]) -> dict[str, int]:
        """A VNI for each network of the VE incarnation `uid`; on a failure, those claimed are released first."""
        claimed: dict[str, int] = {}
        try:
            for network in networks:
                claimed[network] = await self._claim_one(Claim(ve, uid, network, self.wall()))
        except Exception:  # cancelled instead: those claimed are taken over once stale
            await self.release(ve, uid, claimed)
            raise
        return claimed

    async def release(self, ve: str, uid: str, vnis: Mapping[str, int]) -> None:
        """Delete the claims of these VNIs that the VE incarnation `uid` still holds; best effort: one left is
        taken over once stale."""
        for network, vni in vnis.items():
            key = f"{PREFIX}{vni}"
            try:
                held = await self.directory.records.get_record(key)
                claim = _claim_of(held)
                if held is not None and claim is not None and (claim.uid, claim.network) == (uid, network):
                    await self.directory.records.update(key, None, held)
            except (RequestError, RpcError) as err:
                log.info("VE %s: VNI %d not released yet (%s); it is taken over once stale", ve, vni, err)

    async def _claim_one(self, wanted: Claim) -> int:
        for vni in islice(vni_candidates(wanted.uid, wanted.network), ATTEMPTS):
            key = f"{PREFIX}{vni}"
            held = await self.directory.records.get_record(key)
            claim = _claim_of(held)
            if claim is not None and (claim.uid, claim.network) == (wanted.uid, wanted.network):
                return vni  # ours already (a retried create)
            if claim is not None and not await self._stale(claim, vni):
                continue
            try:
                await self.directory.records.put_if(key, codec.encode(wanted), held)
            except WriteConflict:
                continue  # another create took it first
            return vni
        raise RequestError(f"no free VXLAN identifier for network {wanted.network!r} of VE {wanted.ve} after "
                           f"{ATTEMPTS} tries")

    async def _stale(self, claim: Claim, vni: int) -> bool:
        """Whether a claim may be taken over: old, and its VE gone, of another incarnation, or not using it."""
        if self.wall() - claim.since < STALE:
            return False
        stored = await self.directory.get(claim.ve)
        if stored is None or stored.ve.uid != claim.uid:
            return True
        net = stored.ve.networks.get(claim.network)
        return net is None or net.vni != vni


def _claim_of(record: Record | None) -> Claim | None:
    """The live claim a record holds; None for none, a tombstone, or a value that is no claim (taken over)."""
    if record is None or record.deleted:
        return None
    try:
        claim: Claim = codec.decode(Claim, record.value)
    except CodecError:
        return None
    return claim
