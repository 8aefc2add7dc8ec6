"""An agent's metrics: the HTTP core refuses what is not a scrape in one reply, the collectors read the services'
real state, every series follows Prometheus's naming (prefix, base units, `_total`, no per-VE label), and the
server answers scrapes while bad clients (garbage, silence, too many at once, a hung refresh) get nowhere."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import trio
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.process_collector import ProcessCollector

from agents.host.base import CRASHED
from agents.host.service import HostService
from agents.hypervisor.actor import DomainInfo
from agents.messages import HOST_CONFIRM, HOST_RESERVE, HOST_VM_SUSPEND, Confirm, MirrorStatus, Reserve, VmName
from agents.metrics import collectors, http
from agents.metrics import exporter as exporter_module
from agents.metrics.exporter import Exporter
from discovery.metrics import DvmsCollector, ImagesCollector
from discovery.scheduler.messages import NodeLoad
from overlay.chord import ChordState, Peer, hash_id
from overlay.dht import Record
from overlay.membership import DEAD, LEFT, SUSPECT, Membership
from tests.unit.conftest import ask
from vivaldi.coordinate import Client

DEADLINE = 10.0


def samples(metrics: Iterator[Metric] | list[Metric]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample by (name, sorted labels)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for m in metrics for s in m.samples}


def value(metrics: Any, name: str, **labels: str) -> float:
    return samples(metrics)[name, tuple(sorted(labels.items()))]


# -- the HTTP core -------------------------------------------------------------------------------------------


def test_a_scrape_is_a_get_or_head_of_the_metrics_path() -> None:
    scrape = http.parse(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text\r\n\r\n")
    assert scrape == http.Scrape("application/openmetrics-text", head_only=False)
    assert http.parse(b"HEAD /metrics?name[]=x HTTP/1.0\r\n\r\n") == http.Scrape("", head_only=True)


@pytest.mark.parametrize(("data", "status"), [
    (b"GET / HTTP/1.1\r\n\r\n", 404),
    (b"GET /metricsx HTTP/1.1\r\n\r\n", 404),
    (b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", 405),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),  # a TLS hello
    (b"GET /metrics\r\n\r\n", 400),
    (b"GET /metrics HTTP/2\r\n\r\n", 400),
    (b"GET /m\xe9trics HTTP/1.1\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\n", 400),  # the client stopped before the end of its head
    (b"GET /metrics HTTP/1.1\r\nX: " + b"a" * http.MAX_HEAD, 431),
    (b"", 400),
])
def test_anything_else_gets_one_error_reply(data: bytes, status: int) -> None:
    reply = http.parse(data)
    assert isinstance(reply, http.Reply) and reply.status == status
    head, _, body = reply.encode().partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()) and b"Connection: close" in head
    assert f"Content-Length: {len(body)}".encode() in head and body.endswith(b"\n")


def test_a_reply_to_head_has_no_body() -> None:
    reply = http.Reply(200, b"x 1\n", "text/plain", head_only=True).encode()
    assert reply.endswith(b"\r\n\r\n") and b"Content-Length: 4" in reply


# -- collectors on the services' state -----------------------------------------------------------------------


def test_rpc_times_count_each_method_in_cumulative_buckets() -> None:
    times = collectors.RpcTimes(buckets=(0.01, 0.1, 1.0))
    for seconds in (0.005, 0.01, 0.05, 0.5, 5.0):
        times.observe("ve.create", seconds, None)
    times.observe("ve.create", 0.2, "conflict")
    times.observe("member.ping", 0.001, None)
    got = list(times.collect())
    name = "discovery_rpc_server_duration_seconds"
    assert [value(got, f"{name}_bucket", method="ve.create", le=le) for le in ("0.01", "0.1", "1.0", "+Inf")] \
        == [2, 3, 5, 6]
    assert value(got, f"{name}_count", method="ve.create") == 6
    assert value(got, f"{name}_sum", method="ve.create") == pytest.approx(5.765)
    assert value(got, f"{name}_count", method="member.ping") == 1
    assert value(got, "discovery_rpc_server_errors_total", method="ve.create", kind="conflict") == 1


def test_members_by_state_count_every_member_and_every_state() -> None:
    membership = Membership("n1", "127.0.0.1:1", "rennes", 3.0)
    for i, status in enumerate(("alive", "alive", SUSPECT, DEAD, DEAD, LEFT)):
        membership.members[f"m{i}"] = SimpleNamespace(status=status)  # type: ignore[assignment]
    got = list(collectors.MembershipCollector(membership).collect())
    assert {s: value(got, "discovery_members", state=s) for s in ("alive", "suspect", "dead", "left")} \
        == {"alive": 3, "suspect": 1, "dead": 2, "left": 1}


def test_ring_and_dht_health_read_the_ring_and_the_shard() -> None:
    me = Peer(hash_id("n1"), "n1", "a:1", "s")
    state = ChordState(me, 8)
    empty = SimpleNamespace(shard=SimpleNamespace(records={}), stats={})
    assert value(collectors.RingCollector(state, empty).collect(), "discovery_ring_successors") == 0  # type: ignore[arg-type]
    state.successors = [Peer(hash_id(n), n, f"{n}:1", "s") for n in ("n2", "n3")]
    state.predecessor = state.successors[-1]
    records = {"a": Record("a", 1, 1, "n1"), "b": Record("b", 2, 1, "n1"), "c": Record("c", None, 2, "n1")}
    dht = SimpleNamespace(shard=SimpleNamespace(records=records), stats={"passes": 7, "records_pushed": 3})
    got = list(collectors.RingCollector(state, dht).collect())  # type: ignore[arg-type]
    assert value(got, "discovery_ring_successors") == 2 and value(got, "discovery_ring_predecessor_known") == 1
    assert value(got, "discovery_dht_records", kind="live") == 2 and value(got, "discovery_dht_records",
                                                                            kind="tombstone") == 1
    assert value(got, "discovery_dht_repair_passes_total") == 7
    assert value(got, "discovery_dht_repair_records_pushed_total") == 3


def test_vivaldi_error_is_the_clients() -> None:
    client = Client()
    got = collectors.VivaldiCollector(client).collect()
    assert value(got, "discovery_vivaldi_error_ratio") == client.coordinate.error


async def test_vms_by_state_are_libvirts_and_only_this_nodes(host: HostService) -> None:
    for name in ("ve:a", "ve:b", "ve:c"):
        token = (await ask(host, HOST_RESERVE, Reserve(name, 1, 512, 1))).token
        await ask(host, HOST_CONFIRM, Confirm(token))
    await ask(host, HOST_VM_SUSPEND, VmName("ve:c"))
    await host.hypervisor.destroy("ve:b")
    await host._set_desired("ve:b", CRASHED)  # left down after its guest crashed too often
    outsider = DomainInfo("not-ours", "u", "running", 1, 64)  # another tool's domain on a shared libvirtd

    async def listing() -> list[DomainInfo]:
        return [*await host.listing(), outsider]

    host.shipped.update({"sent": 10, "received": 5})
    host.guest_restarts = 3
    collector = collectors.HostCollector(host, listing)
    await collector.refresh()
    got = list(collector.collect())
    assert {s: value(got, "discovery_vms", state=s) for s in ("running", "paused", "shutoff", "crashed", "other")} \
        == {"running": 1, "paused": 1, "shutoff": 0, "crashed": 1, "other": 0}
    assert value(got, "discovery_guest_restarts_total") == 3
    assert value(got, "discovery_host_capacity_vcpus") == 8 and value(got, "discovery_host_free_vcpus") == 5
    assert value(got, "discovery_host_free_memory_bytes") == (8192 - 3 * 512) * 2**20
    assert value(got, "discovery_vm_ship_sent_bytes_total") == 10
    assert value(got, "discovery_vm_ship_received_bytes_total") == 5


def dvms_standin(**counts: int) -> Any:
    return SimpleNamespace(counts=Counter(counts), endings=Counter({"solved": 2, "starved": 1}),
                           isp=SimpleNamespace(membership=object(), lead=None), cpu_capacity=1600,
                           load=NodeLoad(800, 4096, "overload", 1600))


def test_dvms_counts_its_events_and_shows_its_state() -> None:
    got = list(DvmsCollector(dvms_standin(problem=4, created=3, plan=2, migrated=5,
                                          **{"migration-failed": 1})).collect())
    assert value(got, "discovery_dvms_problems_total") == 4
    assert value(got, "discovery_dvms_partitions_created_total") == 3
    assert value(got, "discovery_dvms_partitions_ended_total", reason="solved") == 2
    assert value(got, "discovery_dvms_plans_total", outcome="found") == 2
    assert value(got, "discovery_dvms_plans_total", outcome="none") == 0
    assert [value(got, "discovery_dvms_migrations_total", outcome=o) for o in ("done", "failed", "skipped")] \
        == [5, 1, 0]
    assert value(got, "discovery_dvms_partition", role="member") == 1
    assert value(got, "discovery_dvms_partition", role="leader") == 0
    assert value(got, "discovery_dvms_load_state", state="overload") == 1
    assert value(got, "discovery_dvms_load_state", state="normal") == 0
    assert value(got, "discovery_dvms_cpu_demand_ratio") == 0.5
    assert value(got, "discovery_dvms_memory_demand_bytes") == 4096 * 2**20


def full_exporter() -> Exporter:
    """An exporter with every collector an agent registers, on stand-ins with some of everything."""
    exporter = Exporter()
    times = collectors.RpcTimes()
    times.observe("ve.create", 0.02, "conflict")
    membership = Membership("n1", "127.0.0.1:1", "rennes", 3.0)
    me = Peer(hash_id("n1"), "n1", "a:1", "s")
    dht = SimpleNamespace(shard=SimpleNamespace(records={}), stats={"passes": 1})
    host = SimpleNamespace(ledger=SimpleNamespace(allocated={}, total=SimpleNamespace(vcpus=1, memory_mb=1, disk_gb=1),
                                                  free=lambda now: SimpleNamespace(vcpus=1, memory_mb=1, disk_gb=1)),
                           shipped=Counter(), guest_restarts=0,
                           mirror_status=lambda: [MirrorStatus("shop:db", "n2", "ready", 0.5, 4096, 1 << 20, False)])

    async def listing() -> list[DomainInfo]:
        return []

    info = {"name": "n1", "site": "s", "hypervisor": "test", "protocol": "1..2"}
    ring = collectors.RingCollector(ChordState(me, 8), dht)  # type: ignore[arg-type]
    for collector in (times, collectors.AgentCollector(info, {"host": 1}, lambda: 2), ring,
                      collectors.MembershipCollector(membership), collectors.VivaldiCollector(Client()),
                      collectors.HostCollector(host, listing),  # type: ignore[arg-type]
                      DvmsCollector(dvms_standin()),
                      ImagesCollector(SimpleNamespace(moved=Counter(pulled=3))),  # type: ignore[arg-type]
                      ProcessCollector(registry=None)):
        exporter.register(collector)
    return exporter


async def test_every_series_follows_prometheus_naming() -> None:
    body, content_type = await full_exporter().render()
    assert content_type.startswith("text/plain")
    families = list(text_string_to_metric_families(body.decode()))
    assert {"discovery_rpc_server_duration_seconds", "discovery_members", "discovery_ring_successors",
            "discovery_dht_records", "discovery_vivaldi_error_ratio", "discovery_vms", "discovery_dvms_partition",
            "discovery_dvms_migrations", "discovery_image_pulled_bytes", "discovery_vm_ship_sent_bytes",
            "discovery_replication_lag_seconds", "discovery_replication_behind_bytes",
            "discovery_replication_sent_bytes", "discovery_replication_mirrors",
            "discovery_guest_restarts", "process_resident_memory_bytes",
            "process_cpu_seconds"} <= {f.name for f in families}
    mirrors = {s.name + str(s.labels): s.value for f in families if f.name.startswith("discovery_replication")
               for s in f.samples}  # the stand-in host's one ready mirror, 0.5 s and 4096 bytes behind
    assert mirrors["discovery_replication_lag_seconds{}"] == 0.5
    assert mirrors["discovery_replication_behind_bytes{}"] == 4096
    assert mirrors["discovery_replication_mirrors{'state': 'ready'}"] == 1
    per_content = {"ve", "vm", "vms", "domain", "chunk", "image", "partition", "peer", "node", "key", "owner"}
    for family in families:
        assert family.name.startswith(("discovery_", "process_")), family.name
        assert not any(unit in family.name for unit in ("_ms", "_mb", "_kb", "_mib", "millis", "percent")), family.name
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples), family.name
        for sample in family.samples:
            assert not per_content & set(sample.labels), (family.name, sample.labels)
            assert math.isfinite(sample.value) or sample.labels.get("le") == "+Inf"


# -- the server ----------------------------------------------------------------------------------------------


async def exchange(address: str, data: bytes, read: bool = True) -> bytes:
    """Send `data` to the exporter at `address` and read its answer until it closes the connection."""
    host, _, port = address.rpartition(":")
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(data)
        answer = b""
        while read and (chunk := await stream.receive_some(65536)):
            answer += chunk
        return answer


async def scrape(address: str) -> dict[str, Any]:
    answer = await exchange(address, b"GET /metrics HTTP/1.1\r\nHost: agent\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK"), head
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


@pytest.fixture
async def served(nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch) -> Exporter:
    monkeypatch.setattr(exporter_module, "HEAD_TIMEOUT", 0.3)
    monkeypatch.setattr(exporter_module, "RENDER_INTERVAL", 0.0)
    exporter = full_exporter()
    listeners = await exporter.listen("127.0.0.1:0")
    nursery.start_soon(exporter.serve, listeners)
    return exporter


async def test_the_server_answers_scrapes_and_refuses_the_rest(served: Exporter) -> None:
    with trio.fail_after(DEADLINE):
        assert (await scrape(served.address))["discovery_members"].samples[0].value == 1
        assert (await exchange(served.address, b"GET /nope HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404")
        assert (await exchange(served.address, b"\x00\xffgarbage\r\n\r\n")).startswith(b"HTTP/1.1 400")
        assert (await exchange(served.address, b"X" * http.MAX_HEAD)).startswith(b"HTTP/1.1 431")
        assert await exchange(served.address, b"") == b""  # connected and closed: nothing to answer
        assert (await exchange(served.address, b"GET /metrics HTTP/1.1\r\n")).startswith(b"HTTP/1.1 400")  # timed out
        assert "discovery_members" in await scrape(served.address)


async def test_too_many_clients_at_once_get_503_and_the_server_recovers(served: Exporter,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exporter_module, "HEAD_TIMEOUT", DEADLINE)  # the silent ones hold their slots
    host, _, port = served.address.rpartition(":")
    with trio.fail_after(DEADLINE):
        silent = [await trio.open_tcp_stream(host, int(port)) for _ in range(exporter_module.MAX_CLIENTS)]
        while served._slots.value:  # until the server took them all
            await trio.sleep(0.01)
        assert (await exchange(served.address, b"GET /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 503")
        for stream in silent:
            await stream.aclose()
        while True:  # the slots come back as the server notices each close
            answer = await exchange(served.address, b"GET /metrics HTTP/1.1\r\n\r\n")
            if answer.startswith(b"HTTP/1.1 200"):
                break
            await trio.sleep(0.05)


async def test_a_hung_or_failing_refresh_does_not_hold_the_scrape(served: Exporter,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exporter_module, "REFRESH_PATIENCE", 0.2)

    async def hangs() -> None:
        await trio.sleep_forever()

    async def fails() -> None:
        raise RuntimeError("libvirt went away")

    served._refreshers += [hangs, fails]
    with trio.fail_after(DEADLINE):
        assert "discovery_vms" in await scrape(served.address)


async def test_a_rendering_serves_the_scrapes_of_the_next_interval() -> None:
    exporter = Exporter()
    times = collectors.RpcTimes()
    exporter.register(times)
    first, _ = await exporter.render()
    times.observe("member.ping", 0.001, None)
    assert (await exporter.render())[0] == first  # within RENDER_INTERVAL: the same bytes
    exporter._rendered.clear()
    assert b'method="member.ping"' in (await exporter.render())[0]
