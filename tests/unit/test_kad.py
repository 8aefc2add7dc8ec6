"""Tests for overlay.kad (Kademlia under trio-asyncio, signed envelopes, chunks) and overlay.interface.

The network tests run real kademlia Servers over UDP on 127.0.0.1, several in this process under one
trio-asyncio loop, every network step bounded by trio.fail_after.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest
import trio
import trio.testing
import trio_asyncio
import umsgpack
from kademlia.network import Server
from kademlia.utils import digest

from overlay.dht import DHT, Record
from overlay.interface import Binding, Overlay
from overlay.kad import (
    DATAGRAM_LIMIT,
    MAX_KEY_BYTES,
    MAX_STORED,
    MAX_VALUE_BYTES,
    Forged,
    KademliaError,
    KademliaOverlay,
    Keyring,
    ValueTooLarge,
)
from overlay.wire import tls
from overlay.wire.ca import init_ca, issue
from overlay.wire.rpc import RequestError

STEP = 10.0  # seconds any one network step may take; on loopback each takes milliseconds


@dataclass(frozen=True)
class Pki:
    nodes: list[tls.Identity]
    foreign: tls.Identity
    """"n1" issued by another CA that bears our CA's name, trusting ours: only the CA signature differs."""
    stolen_cert: tls.Identity
    """Our n1's genuine certificate with the foreign key: the signature cannot match the certificate."""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca_dir = tmp_path_factory.mktemp("kad-pki") / "ca"
    other_dir = tmp_path_factory.mktemp("kad-other") / "ca"
    init_ca(ca_dir)
    init_ca(other_dir)
    nodes = [issue(ca_dir, f"n{i}") for i in range(4)]
    stranger = issue(other_dir, "n1")
    return Pki(nodes=nodes,
               foreign=tls.Identity(cert=stranger.cert, key=stranger.key, ca=ca_dir / "ca.pem"),
               stolen_cert=tls.Identity(cert=nodes[1].cert, key=stranger.key, ca=ca_dir / "ca.pem"))


@pytest.fixture
async def aio_loop() -> AsyncIterator[None]:
    """The one trio-asyncio loop of the test, as an agent opens it; pytest-trio shares its context."""
    async with trio_asyncio.open_loop():
        yield


@asynccontextmanager
async def network(identities: list[tls.Identity]) -> AsyncIterator[list[KademliaOverlay]]:
    nodes: list[KademliaOverlay] = []
    try:
        for identity in identities:
            node = KademliaOverlay(identity)
            seeds = [("127.0.0.1", nodes[0].port)] if nodes else []
            nodes.append(node)
            with trio.fail_after(STEP):
                await node.start("127.0.0.1", 0, seeds)
        yield nodes
    finally:
        for node in nodes:
            with trio.fail_after(STEP):
                await node.close()


@pytest.fixture
async def nodes(aio_loop: None, pki: Pki) -> AsyncIterator[list[KademliaOverlay]]:
    async with network(pki.nodes) as nodes:
        yield nodes


@asynccontextmanager
async def raw_server(bootstrap_port: int) -> AsyncIterator[Server]:
    """A plain kademlia Server in the same network: no keys, it stores and serves whatever it is given."""
    server = Server()
    try:
        with trio.fail_after(STEP):
            await trio_asyncio.aio_as_trio(server.listen)(0, "127.0.0.1")
            await trio_asyncio.aio_as_trio(server.bootstrap)([("127.0.0.1", bootstrap_port)])
        yield server
    finally:
        server.stop()


async def values(overlay: Overlay, key: str) -> Any:
    with trio.fail_after(STEP):
        record = await overlay.get(key)
    return None if record is None else record.value


class MemoryOverlay:
    """A dict-backed stand-in for the Chord DHT: the same record rules, no network."""

    def __init__(self, name: str = "memory") -> None:
        self.name = name
        self.records: dict[str, Record] = {}

    async def get(self, key: str) -> Record | None:
        record = await self.get_record(key)
        return None if record is None or record.deleted else record

    async def get_record(self, key: str) -> Record | None:
        await trio.lowlevel.checkpoint()
        return self.records.get(key)

    async def put(self, key: str, value: Any, after: int | None = None) -> Record:
        await trio.lowlevel.checkpoint()
        held = self.records.get(key)
        if after is None:
            after = held.version if held is not None else 0
        record = Record(key, value, after + 1, self.name)
        if record.newer_than(held):
            self.records[key] = record
        return record

    async def delete(self, key: str, after: int | None = None) -> Record:
        return await self.put(key, None, after)


# -- the interface ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [DHT, KademliaOverlay, MemoryOverlay, Binding])
def test_overlays_offer_the_same_interface(cls: type) -> None:
    for name in ("get", "get_record", "put", "delete"):
        method, expected = getattr(cls, name), getattr(Overlay, name)
        assert inspect.iscoroutinefunction(method)
        assert ([(p.name, p.default) for p in inspect.signature(method).parameters.values()]
                == [(p.name, p.default) for p in inspect.signature(expected).parameters.values()])


async def test_writes_during_a_rebind_land_on_the_new_overlay() -> None:
    class Slow(MemoryOverlay):
        """Its reads wait for the gate, holding the rebind in the middle of its copy."""

        def __init__(self) -> None:
            super().__init__("old")
            self.gate = trio.Event()

        async def get(self, key: str) -> Record | None:
            await self.gate.wait()
            return await super().get(key)

    old, new = Slow(), MemoryOverlay("new")
    binding = Binding(old)
    await binding.put("k", "before")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(binding.rebind, new, ["k"])
        await trio.testing.wait_all_tasks_blocked()  # the rebind is copying "k"
        nursery.start_soon(binding.put, "k", "during")
        await trio.testing.wait_all_tasks_blocked()
        assert old.records["k"].value == "before" and "k" not in new.records  # the write waits
        old.gate.set()
    assert binding.overlay is new
    assert await values(new, "k") == "during"


async def test_freeze_waits_for_writes_in_flight_and_holds_new_ones_until_thawed() -> None:
    class Gated(MemoryOverlay):
        def __init__(self) -> None:
            super().__init__("gated")
            self.gate = trio.Event()

        async def put(self, key: str, value: Any, after: int | None = None) -> Record:
            await self.gate.wait()
            return await super().put(key, value, after)

    overlay = Gated()
    binding = Binding(overlay, "gated")
    frozen = trio.Event()

    async def freeze() -> None:
        await binding.freeze()
        frozen.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(binding.put, "in-flight", 1)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(freeze)
        await trio.testing.wait_all_tasks_blocked()
        assert binding.frozen and not frozen.is_set()  # the write in flight is not finished
        overlay.gate.set()
        await frozen.wait()
        nursery.start_soon(binding.put, "held", 2)
        await trio.testing.wait_all_tasks_blocked()
        assert "held" not in overlay.records and "in-flight" in overlay.records
        binding.thaw()
    assert await values(overlay, "held") == 2


async def test_a_failed_rebind_stays_on_the_old_overlay() -> None:
    class Broken(MemoryOverlay):
        async def put(self, key: str, value: Any, after: int | None = None) -> Record:
            raise OSError("unreachable")

    old = MemoryOverlay()
    binding = Binding(old)
    await binding.put("k", "v")
    with pytest.raises(OSError):
        await binding.rebind(Broken(), ["k"])
    assert binding.overlay is old


# -- envelopes and limits (no network) -------------------------------------------------------------


def test_a_full_store_request_fits_in_one_datagram() -> None:
    request = umsgpack.packb(["store", [b"\0" * 20, b"\0" * 20, b"\0" * MAX_STORED]])
    assert len(request) <= DATAGRAM_LIMIT


@pytest.mark.parametrize("size", [0, 1000, MAX_STORED - 700, MAX_STORED - 1, MAX_STORED, 3 * MAX_STORED + 5,
                                  MAX_VALUE_BYTES - 16])
def test_sealed_values_never_exceed_a_datagram_and_open_back(pki: Pki, size: int) -> None:
    keyring = Keyring(pki.nodes[0])
    record = Record("k" * MAX_KEY_BYTES, os.urandom(size), 7, "n0")
    blob, chunks = keyring.seal(record)
    assert len(blob) <= MAX_STORED and all(len(c) <= MAX_STORED for c in chunks)
    envelope = keyring.open(blob)
    assert (envelope.key, envelope.version, envelope.writer) == (record.key, 7, "n0")
    if chunks:
        assert envelope.chunks is not None and len(envelope.chunks) == len(chunks)
        assert msgpack.unpackb(b"".join(chunks)) == record.value
    else:
        assert envelope.value == record.value


def test_values_above_the_limit_are_refused(pki: Pki) -> None:
    with pytest.raises(ValueTooLarge, match="limit"):
        Keyring(pki.nodes[0]).seal(Record("k", b"x" * MAX_VALUE_BYTES, 1, "n0"))


def tampered(blob: bytes) -> bytes:
    """The same envelope and signature around a body that says something else."""
    magic, body, cert, signature = msgpack.unpackb(blob)
    key, _, writer, kind, _ = msgpack.unpackb(body)
    body = msgpack.packb([key, 99, writer, kind, msgpack.packb("tampered")])
    return msgpack.packb([magic, body, cert, signature])


def test_only_envelopes_from_cluster_nodes_open(pki: Pki) -> None:
    keyring = Keyring(pki.nodes[0])
    genuine, _ = keyring.seal(Record("k", "v", 1, "n0"))
    assert keyring.open(genuine).value == "v"
    forged, _ = Keyring(pki.foreign).seal(Record("k", "v", 1, "n1"))
    stolen, _ = Keyring(pki.stolen_cert).seal(Record("k", "v", 1, "n1"))
    impersonating, _ = keyring.seal(Record("k", "v", 1, "n3"))  # n0 writing under n3's name
    for bad in (forged, stolen, impersonating, tampered(genuine), genuine[:-3], b"garbage", "unsigned", 7, None):
        with pytest.raises(Forged):
            keyring.open(bad)


def test_an_identity_from_another_ca_cannot_start_an_overlay(pki: Pki) -> None:
    with pytest.raises(tls.TLSError, match="cannot sign"):
        KademliaOverlay(pki.foreign)


async def test_start_needs_the_trio_asyncio_loop(pki: Pki) -> None:
    with pytest.raises(RuntimeError, match="open_loop"):
        await KademliaOverlay(pki.nodes[0]).start("127.0.0.1", 0, [])


async def test_start_fails_cleanly_when_no_bootstrap_contact_answers(aio_loop: None, pki: Pki) -> None:
    with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as silent:
        await silent.bind(("127.0.0.1", 0))  # bound, so the port is ours, but nobody answers on it
        overlay = KademliaOverlay(pki.nodes[0])
        with trio.fail_after(STEP), pytest.raises(KademliaError, match="no bootstrap contact"):
            await overlay.start("127.0.0.1", 0, [silent.getsockname()])  # after rpcudp's 5 s timeout


# -- the overlay on a network ----------------------------------------------------------------------


async def test_put_on_one_node_get_on_every_node(nodes: list[KademliaOverlay]) -> None:
    value = {"vms": ["web-1", "web-2"], "owner": "alice", "blob": b"\x00\xff", "slots": {0: "web-1"}}
    with trio.fail_after(STEP):
        written = await nodes[0].put("ve/web", value)
    assert written == Record("ve/web", value, 1, "n0")
    for node in nodes:
        with trio.fail_after(STEP):
            assert await node.get("ve/web") == written
    assert await values(nodes[1], "ve/absent") is None


async def test_the_higher_version_then_the_higher_writer_wins(nodes: list[KademliaOverlay]) -> None:
    n0, n1, n2, n3 = nodes
    with trio.fail_after(STEP):
        assert (await n0.put("k", "one")).version == 1
        newest = await n1.put("k", "two")  # reads version 1 first
        assert newest.version == 2
        await n2.put("k", "stale", after=0)  # version 1: loses everywhere
    for node in nodes:
        with trio.fail_after(STEP):
            assert await node.get("k") == newest
    with trio.fail_after(STEP):
        await n2.put("k", "by n2", after=4)
        await n1.put("k", "by n1", after=4)  # same version, lower writer: loses although written last
        assert await n3.get("k") == Record("k", "by n2", 5, "n2")
        assert (await n0.put("k", "next")).version == 6


async def test_a_conditional_write_is_refused_and_writes_nothing(nodes: list[KademliaOverlay]) -> None:
    """No majority of holders can decide a compare-and-set here (`KademliaOverlay.put_if`): refused."""
    with trio.fail_after(STEP):
        with pytest.raises(RequestError, match="chord"):
            await nodes[0].put_if("ve/new", "mine", None)
        assert await nodes[1].get_record("ve/new") is None


async def test_delete_leaves_a_tombstone_that_versions_continue_from(nodes: list[KademliaOverlay]) -> None:
    with trio.fail_after(STEP):
        await nodes[0].put("ve/gone", "v")
        tombstone = await nodes[1].delete("ve/gone")
    assert tombstone.version == 2 and tombstone.deleted
    for node in nodes:
        assert await values(node, "ve/gone") is None
        with trio.fail_after(STEP):
            assert await node.get_record("ve/gone") == tombstone
    with trio.fail_after(STEP):
        assert (await nodes[2].put("ve/gone", "back")).version == 3
    assert await values(nodes[3], "ve/gone") == "back"


async def test_a_value_larger_than_a_datagram_round_trips_in_chunks(nodes: list[KademliaOverlay]) -> None:
    value = {"image": os.urandom(5 * MAX_STORED), "name": "big"}
    with trio.fail_after(STEP):
        record = await nodes[0].put("ve/big", value)
    _, chunks = nodes[0].keyring.seal(record)
    assert len(chunks) == 6
    for node in nodes:
        assert await values(node, "ve/big") == value
    with trio.fail_after(STEP), pytest.raises(ValueTooLarge):
        await nodes[1].put("ve/huge", b"x" * (MAX_VALUE_BYTES + 1))
    assert await values(nodes[2], "ve/huge") is None


async def test_forged_and_corrupt_values_are_ignored(nodes: list[KademliaOverlay], pki: Pki,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    n0, n1, *_ = nodes
    with trio.fail_after(STEP):
        genuine = await n0.put("ve/db", "genuine")
    forger = Keyring(pki.foreign)
    forged, _ = forger.seal(Record("ve/db", "forged", 99, "n1"))
    stolen, _ = Keyring(pki.stolen_cert).seal(Record("ve/db", "forged", 99, "n1"))
    sealed_genuine, _ = n0.keyring.seal(genuine)
    caplog.set_level(logging.WARNING, logger="overlay.kad")
    async with raw_server(n0.port) as raw:
        for bad in (forged, stolen, tampered(sealed_genuine), b"garbage", "unsigned"):
            caplog.clear()
            with trio.fail_after(STEP):
                await trio_asyncio.aio_as_trio(raw.set)("ve/db", bad)  # sent to every node, which refuse it
            raw.storage[digest("ve/db")] = bad  # and served by the raw node itself
            for node in nodes:
                with trio.fail_after(STEP):
                    assert await node.get("ve/db") == genuine
            assert any("refusing to store" in r.message for r in caplog.records)
            assert any("ignoring a value of 've/db'" in r.message for r in caplog.records)
        ghost, _ = forger.seal(Record("ve/ghost", "forged", 1, "n1"))
        raw.storage[digest("ve/ghost")] = ghost  # a key only forgeries exist for reads as absent
        assert await values(n1, "ve/ghost") is None


async def test_a_rebind_from_a_chord_like_overlay_to_kademlia_loses_nothing(
        nodes: list[KademliaOverlay]) -> None:
    n0, n1, *_ = nodes
    chord = MemoryOverlay()
    binding = Binding(chord)
    keys = [f"ve/{i}" for i in range(4)]
    for i, key in enumerate(keys):
        await binding.put(key, {"i": i})
    await binding.put(keys[0], {"i": 0, "resized": True})
    await binding.delete(keys[1])
    with trio.fail_after(STEP):  # leftovers of an earlier binding to Kademlia
        await n0.put(keys[0], "leftover", after=41)
        await n0.put(keys[1], "deleted since")
        await binding.rebind(n0, [*keys, "ve/never"])
    assert binding.overlay is n0
    for key in [*keys, "ve/never"]:
        expected = await values(chord, key)
        for overlay in (binding, n0, n1):
            assert await values(overlay, key) == expected
    with trio.fail_after(STEP):
        await binding.put(keys[2], "after the rebind")
    assert await values(n1, keys[2]) == "after the rebind"
    assert await values(chord, keys[2]) == {"i": 2}

