"""An agent's Prometheus endpoint: its own registry of collectors, served over plain HTTP in the agent's trio world.

Each agent has a `CollectorRegistry` of its own, never prometheus_client's global one, so agents sharing a
process (tests) never mix their series. The collectors (`agents.metrics.collectors`, `discovery.metrics`)
read the services' state when a scrape comes; a few need an await first (libvirt's list of domains), given
as `refresh` functions, each bounded by REFRESH_PATIENCE: a slow libvirt makes a scrape answer the last
listing, never hang. The server is a trio task of the agent (not prometheus_client's threaded server), and
what reaches the port cannot hurt the agent: a head must arrive within HEAD_TIMEOUT and fit in
`agents.metrics.http.MAX_HEAD`, at most MAX_CLIENTS connections are served at once (more get 503), a reply
must leave within SEND_TIMEOUT, and one rendering serves every scrape of the next RENDER_INTERVAL seconds,
so a flood of scrapes costs the event loop one rendering per interval. Nothing a client does raises out of
the connection's task.

Unauthenticated, like every Prometheus exporter: it listens on loopback unless agent.toml's `metrics` says
otherwise, and its series carry no VE, VM or chunk names (`agents.metrics.collectors`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector, CollectorRegistry

from agents.metrics import http

log = logging.getLogger(__name__)
HEAD_TIMEOUT = 5.0
SEND_TIMEOUT = 10.0
MAX_CLIENTS = 8
REFRESH_PATIENCE = 2.0
RENDER_INTERVAL = 1.0
LINGER = 1.0
"""Seconds a reply's connection waits for the client to close it (`Exporter._send`)."""

Refresh = Callable[[], Awaitable[object]]


class Exporter:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)  # a clash of names fails at `register`
        self.address = ""
        """host:port once listening."""
        self._refreshers: list[Refresh] = []
        self._slots = trio.Semaphore(MAX_CLIENTS)
        self._rendered: dict[str, tuple[float, bytes]] = {}  # content type -> (when, body)

    def register(self, collector: Collector, refresh: Refresh | None = None) -> None:
        """Add `collector`; `refresh`, if given, is awaited before each rendering (REFRESH_PATIENCE at most)."""
        self.registry.register(collector)
        if refresh is not None:
            self._refreshers.append(refresh)

    async def render(self, accept: str = "") -> tuple[bytes, str]:
        """Every collector's series in the format `accept` asks for (Prometheus text by default) and its
        content type; the rendering of less than RENDER_INTERVAL ago if there is one."""
        encoder, content_type = choose_encoder(accept)
        now = trio.current_time()
        when, body = self._rendered.get(content_type, (-RENDER_INTERVAL, b""))
        if now - when < RENDER_INTERVAL:
            return body, content_type
        for refresh in self._refreshers:
            with trio.move_on_after(REFRESH_PATIENCE):
                try:
                    await refresh()
                except Exception as err:  # the collector shows what it read last
                    log.info("metrics: refresh failed: %s", err)
        body = encoder(self.registry)
        self._rendered[content_type] = (trio.current_time(), body)
        return body, content_type

    async def listen(self, address: str) -> list[trio.SocketListener]:
        """Bind `address` (host:port; port 0 picks a free one) and set `self.address`; `serve` then serves it."""
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"bad metrics address {address!r}: expected host:port")
        listeners = await trio.open_tcp_listeners(int(port), host=host.strip("[]"))
        self.address = f"{host}:{listeners[0].socket.getsockname()[1]}"
        return listeners

    async def serve(self, listeners: list[trio.SocketListener]) -> None:
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        """One client, one request, one reply; nothing it sends escapes this function."""
        try:
            try:
                self._slots.acquire_nowait()
            except trio.WouldBlock:
                await self._send(stream, http.error(503, "too many scrapes at once"))
                return
            try:
                await self._answer(stream)
            finally:
                self._slots.release()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away
        except Exception:  # a bug here must not end the server, nor the agent
            log.exception("metrics: a scrape failed")
        finally:
            await trio.aclose_forcefully(stream)

    async def _answer(self, stream: trio.SocketStream) -> None:
        data = b""
        with trio.move_on_after(HEAD_TIMEOUT):
            while not http.head_complete(data) and len(data) < http.MAX_HEAD:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                data += chunk
        if not data:
            return  # connected and said nothing (a port check), or too slowly
        request = http.parse(data)
        if isinstance(request, http.Scrape):
            try:
                body, content_type = await self.render(request.accept)
                reply = http.Reply(200, body, content_type, request.head_only)
            except Exception:
                log.exception("metrics: rendering failed")
                reply = http.error(500, "rendering the metrics failed: see the agent's log")
        else:
            reply = request
        await self._send(stream, reply)

    async def _send(self, stream: trio.SocketStream, reply: http.Reply) -> None:
        """Send `reply`, then close our side and drop what the client still sends for a moment before the
        socket closes: closing with bytes unread would reset the connection, and the client lose the reply."""
        with trio.move_on_after(SEND_TIMEOUT):
            await stream.send_all(reply.encode())
            await stream.send_eof()
            drained = 0
            with trio.move_on_after(LINGER):
                while drained < http.MAX_HEAD and (chunk := await stream.receive_some(4096)):
                    drained += len(chunk)
