"""The transport's TLS stream (overlay.wire.tls_socket) over loopback: what it must keep of trio.SSLStream."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from overlay.wire import tls
from overlay.wire.ca import init_ca, issue
from overlay.wire.tls_socket import TlsSocket

NETWORK_TIMEOUT = 10.0


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = tmp_path_factory.mktemp("pki") / "ca"
    init_ca(ca)
    return tls.server_context(issue(ca, "a", role="node")), tls.client_context(issue(ca, "b", role="node"))


@asynccontextmanager
async def pair(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> AsyncIterator[tuple[TlsSocket, TlsSocket]]:
    """A server and a client end of one handshaken connection on 127.0.0.1."""
    server_ctx, client_ctx = contexts
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]
    ends: dict[str, TlsSocket] = {}

    async def accept() -> None:
        ends["server"] = TlsSocket(await listener.accept(), server_ctx, server_side=True)
        await ends["server"].do_handshake()

    async def dial() -> None:
        ends["client"] = TlsSocket(await trio.open_tcp_stream("127.0.0.1", port), client_ctx, server_side=False)
        await ends["client"].do_handshake()

    with trio.fail_after(NETWORK_TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept)
            nursery.start_soon(dial)
    await listener.aclose()
    try:
        yield ends["server"], ends["client"]
    finally:
        for end in ends.values():
            await end.aclose()


async def receive_exactly(stream: TlsSocket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some()
        assert chunk, "closed early"
        data += chunk
    return bytes(data)


async def test_a_write_larger_than_the_socket_buffers_arrives_whole(contexts) -> None:
    """A frame of megabytes: OpenSSL asks to wait for room (want-write) and then takes the same bytes again."""
    payload = os.urandom(8 * 1024 * 1024)
    async with pair(contexts) as (server, client):
        received = b""

        async def read() -> None:
            nonlocal received
            received = await receive_exactly(server, len(payload))

        with trio.fail_after(NETWORK_TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                await client.send_all(payload)
        assert received == payload


async def test_a_clean_close_reads_as_the_end(contexts) -> None:
    async with pair(contexts) as (server, client):
        await client.send_all(b"last words")
        with contextlib.suppress(ssl.SSLWantReadError):  # sent; it would wait for the server's in return
            client.ssl.unwrap()  # close_notify, as a polite peer ends
        with trio.fail_after(NETWORK_TIMEOUT):
            assert await receive_exactly(server, 10) == b"last words"
            assert await server.receive_some() == b""


async def test_a_stream_cut_without_close_notify_is_broken_not_ended(contexts) -> None:
    """A truncation must not pass for the peer's end of the stream."""
    async with pair(contexts) as (server, client):
        client.ssl.shutdown(socket.SHUT_RDWR)  # TCP FIN, no TLS close_notify
        with trio.fail_after(NETWORK_TIMEOUT), pytest.raises(trio.BrokenResourceError):
            await server.receive_some()


async def test_closing_wakes_the_task_waiting_to_read(contexts) -> None:
    async with pair(contexts) as (server, _client):
        async def read() -> None:
            with pytest.raises(trio.ClosedResourceError):
                await server.receive_some()

        with trio.fail_after(NETWORK_TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                await trio.testing.wait_all_tasks_blocked()
                await server.aclose()


def test_the_tcp_stream_is_taken_over(contexts) -> None:
    """The TlsSocket owns the descriptor: the trio stream it came from no longer holds one."""
    async def main() -> None:
        (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
        tcp = await trio.open_tcp_stream("127.0.0.1", listener.socket.getsockname()[1])
        stream = TlsSocket(tcp, contexts[1], server_side=False)
        assert tcp.socket.fileno() == -1 and stream.ssl.fileno() != -1
        await stream.aclose()
        assert stream.ssl.fileno() == -1
        await listener.aclose()

    trio.run(main)


async def test_a_peer_refused_for_garbage_reads_the_end_not_a_reset(contexts) -> None:
    """Its bytes beyond the first record were never read; closing must not answer them with a reset."""
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    garbage = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 100

    async def serve() -> None:
        stream = TlsSocket(await listener.accept(), contexts[0], server_side=True)
        with pytest.raises(trio.BrokenResourceError):
            await stream.do_handshake()
        await stream.aclose()

    with trio.fail_after(NETWORK_TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            tcp = await trio.open_tcp_stream("127.0.0.1", listener.socket.getsockname()[1])
            await tcp.send_all(garbage)
            while await tcp.receive_some(1024):  # the alert, then the end: ECONNRESET would raise here
                pass
            await tcp.aclose()
    await listener.aclose()
