"""RPC over mutually authenticated TLS: the only way agents (and the CLI) talk to each other.

One TCP connection per peer address carries many concurrent calls, matched by request id. Every
connection starts with a handshake: each end sends a hello stating the protocol versions it speaks, its
node name and site, and the connection uses the highest version both speak (`overlay.wire.versions`);
handlers see it as `Caller.version`, callers ask `peer_version`. A peer that shares no version with us,
has no valid certificate, or sends a frame that breaks the rules is disconnected and logged, and nobody
else notices. Every call has a deadline.

Messages (msgpack):
    handshake   {"proto": oldest, "versions": [oldest, newest], "node": str, "site": str}  (`versions`)
    request     [REQUEST, id, method, args]           args is a dict
    response    [RESPONSE, id, True, result, stamp, held]
    error       [RESPONSE, id, False, {"kind": str, "message": str}, stamp, held]

`stamp` is whatever the responder's `stamp()` returns (its network coordinate in an agent, None
otherwise) and `held` the seconds the responder spent on the request. The caller subtracts `held`
from the time it waited, so every RPC, however slow its handler, yields a clean network RTT sample
for membership and coordinates (Serf gets them from dedicated probes only).

Emulated WAN latency: when a `delay` function is given (the one-way latency between two sites), a call to
a peer of another site waits the round trip, twice delay(my_site, peer_site), before its request leaves,
and the answer leaves at once: every call, and every chain of calls, takes one emulated RTT per hop as on
a real path (only the moment the peer sees the request moves, from half-way to the end of the round
trip). One timer per call rather than one per frame: an idle agent's CPU goes mostly to wake-ups.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import socket
import ssl
import types
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic

import trio
from typing_extensions import TypeVar

from overlay.wire import codec, frames, tls, versions
from overlay.wire.tls_socket import TlsSocket
from overlay.wire.versions import SPOKEN, HandshakeRefused, NoCommonVersion, Versions

REQUEST, RESPONSE = 0, 1
HANDSHAKE_TIMEOUT = 5.0
DEFAULT_TIMEOUT = 10.0
MAX_IN_FLIGHT = 128
"""Concurrent requests served per connection; more wait, so one chatty peer cannot exhaust memory."""
SEND_LIMIT = 30.0
"""Seconds a frame, once its sending began, may take to leave; past that the connection is given up."""

log = logging.getLogger(__name__)


class RpcError(Exception):
    """Base of everything a call can raise."""


class Unreachable(RpcError):
    """Could not connect, the TLS handshake failed, or the connection broke during the call."""


class RpcTimeout(RpcError):
    """No answer before the deadline."""


class RemoteError(RpcError):
    """The peer ran the method and it failed; `kind` says how (bad_request, not_found, conflict...)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class RequestError(Exception):
    """Raised by a handler to answer with a clean error instead of a crash report."""

    kind = "bad_request"


class NotFound(RequestError):
    kind = "not_found"


class Conflict(RequestError):
    kind = "conflict"


class Forbidden(RequestError):
    """The caller's certificate may not do this (a VE of another owner, say)."""

    kind = "forbidden"


class UnknownMethod(RequestError):
    kind = "unknown_method"


class BadAnswer(RequestError):
    """A handler answered with something its method does not declare: a bug on the answering node, told
    to the caller in one line (the kind `Endpoint.ask` gives an answer that does not fit) rather than sent
    on or left to break the connection."""

    kind = "bad_answer"


NODE, CLIENT, OPERATOR = tls.ROLES
"""The roles a certificate carries (its OU): an agent, a user, an operator of the whole cluster."""
AGENTS = frozenset({NODE})
OPERATORS = frozenset({OPERATOR})
PEOPLE = frozenset({CLIENT, OPERATOR})
ANYONE = frozenset(tls.ROLES)


R = TypeVar("R", default=Any)
A = TypeVar("A", default=Any)


@dataclass(frozen=True)
class Method(Generic[R, A]):
    """An RPC as registered: the name callers use (a plain string that grep finds), the dataclass its
    arguments must decode to (`overlay.wire.codec`), the roles allowed to call it, and the type of its
    answer. Every method is declared once, in its layer's `messages` module, served with
    `Endpoint.route` and called, typed, with `Endpoint.ask`."""

    name: str
    request: type[R] | types.UnionType
    """A frozen dataclass, or a union of them (tagged by `type` on the wire, as `dvms.msg` is)."""
    roles: frozenset[str]
    answer: type[A] | types.UnionType | None = None
    """What the method answers, as the codec decodes it (a dataclass, `bool`, `bytes`, `list[X]`,
    `X | None`, `type(None)` for nothing); None: not declared yet, the answer is left as it came."""

    def read_answer(self, value: Any) -> A:
        """`value`, as the method answered it on the wire, decoded into its answer type; CodecError if
        it does not fit."""
        return value if self.answer is None else codec.decode(self.answer, value, f"{self.name} answer")

    def write_answer(self, value: A, check: bool = True) -> Any:
        """A handler's answer as it goes on the wire, checked against the answer type (as the caller will
        read it) unless told not to; CodecError if it does not fit. An undeclared answer goes as it is."""
        if self.answer is None:
            return value
        wire = codec.encode(value)
        if check:
            self.read_answer(wire)
        return wire


@dataclass(frozen=True)
class Caller:
    """Who is calling: the certificate's identity and what the peer said in its handshake."""

    cn: str
    role: str
    node: str
    site: str
    version: int = SPOKEN.newest
    """The protocol version of the caller's connection: answer nothing newer (a call from this process: ours)."""


Handler = Callable[[Caller, Any], Awaitable[Any]]
"""A handler as an endpoint keeps it: it receives the request decoded into its method's request type (a
frozen dataclass) and answers with a value of the method's answer type (dataclasses included: `dispatch`
encodes them), or, for a method that declares none, with plain msgpack values, passed on as they are.
`Endpoint.route` checks, for a type checker, that a handler fits its method."""
DelayFn = Callable[[str, str], float]


class _Connection:
    """A TLS stream plus the framing state shared by the reading and writing sides."""

    def __init__(self, stream: TlsSocket, max_frame: int) -> None:
        self.stream = stream
        self.max_frame = max_frame
        self.decoder = frames.Decoder(max_frame)
        self.inbox: list[Any] = []
        self.send_lock = trio.Lock()
        self.peer_node = ""
        self.peer_site = ""
        self.version = 0
        """The protocol version agreed in the handshake (0 until then)."""

    async def send(self, message: Any) -> None:
        """Send one frame whole, even if the caller is cancelled meanwhile: a frame cut half-way would
        leave the peer a broken stream and break the TLS stream for every call pooled on it. A frame
        that cannot leave within SEND_LIMIT (a peer that stopped reading) closes the connection."""
        data = frames.encode(message, self.max_frame)
        await _acquire(self.send_lock)
        try:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + SEND_LIMIT) as scope:
                await self.stream.send_all(data)
            if scope.cancelled_caught:
                await self.close()
                raise trio.BrokenResourceError(f"a frame could not be sent within {SEND_LIMIT:g}s")
        finally:
            self.send_lock.release()

    async def receive(self) -> Any:
        """Next message; raises EOFError on a clean close, frames.FrameError on garbage."""
        while not self.inbox:
            data = await self.stream.receive_some(65536)
            if not data:
                if self.decoder.pending:
                    raise frames.FrameError(f"connection closed inside a frame ({self.decoder.pending} bytes)")
                raise EOFError
            self.inbox.extend(self.decoder.feed(data))
        return self.inbox.pop(0)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await trio.aclose_forcefully(self.stream)


class _Outbound:
    """A client connection: calls wait on their request id until the reader task fills it in."""

    def __init__(self, conn: _Connection) -> None:
        self.conn = conn
        self.ids = itertools.count(1)
        self.waiting: dict[int, tuple[trio.Event, list[Any]]] = {}
        self.broken: Exception | None = None

    async def read_loop(self) -> None:
        try:
            while True:
                msg = await self.conn.receive()
                if not (isinstance(msg, list) and len(msg) == 6 and msg[0] == RESPONSE):
                    raise frames.FrameError(f"expected a response, got {type(msg).__name__}")
                slot = self.waiting.pop(msg[1], None)
                if slot is not None:  # a response to a call that already timed out is dropped
                    slot[1].extend(msg[2:])
                    slot[0].set()
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError, frames.FrameError) as err:
            self.broken = err
        except Exception as err:  # never let one peer's connection take the transport's nursery down
            log.exception("reading from %s failed", self.conn.peer_node)
            self.broken = err
        finally:
            for event, _ in self.waiting.values():
                event.set()
            self.waiting.clear()
            await self.conn.close()


class Endpoint:
    """What services see of a transport: routes for incoming requests and calls to peers.

    `Transport` is the real one (TCP + TLS); `overlay.wire.memnet.MemTransport` runs the same services
    in memory for simulations of thousands of nodes.
    """

    def __init__(self, node: str, site: str = "", default_timeout: float = DEFAULT_TIMEOUT) -> None:
        self.node = node
        self.site = site
        self.default_timeout = default_timeout
        self.routes: dict[str, tuple[Method, Handler]] = {}
        self.versions = SPOKEN
        """The protocol versions this endpoint speaks."""
        self.addr = ""  # our own address once serving; calls to it are served locally
        self.on_rtt: Callable[[str, float, Any], None] | None = None
        """Called with (peer node, network RTT in seconds, peer's stamp) after each answered call."""
        self.stamp: Callable[[], Any] | None = None
        """Returns what to attach to every response we send (see the module docstring)."""
        self.on_served: Callable[[str, float, str | None], None] | None = None
        """Called with (method, seconds held, error kind or None) after each request a peer sent for a method
        served here (`Transport`): what the agent's metrics observe (`agents.metrics`)."""
        self.check_answers = True
        """Whether `dispatch` checks each answer against its method before it leaves (`BadAnswer`). Off only
        where every caller `ask`s, which checks it on arrival (a handler's slip is still a `bad_answer`,
        without the answering side's log line): a simulation of thousands of nodes, where checking every
        answer twice costs it 5 to 10 % of its time."""

    def route(self, method: Method[R, A], handler: Callable[[Caller, R], Awaitable[A]]) -> None:
        """Serve `method` with `handler`, which takes the method's request type and answers its answer type."""
        if method.name in self.routes:
            raise ValueError(f"{method.name} is served twice")
        self.routes[method.name] = (method, handler)

    def handler(self, name: str) -> Handler | None:
        route = self.routes.get(name)
        return route[1] if route else None

    async def dispatch(self, caller: Caller, name: str, args: Any) -> Any:
        """The one place where a request meets its handler: the method must be served here, the caller's
        role allowed, and the arguments decode into the method's request type; otherwise a RequestError
        (unknown_method, forbidden, bad_request) answers before the handler runs. The handler gets the
        decoded request; its answer is encoded and checked against the declared type (`BadAnswer`; see
        `check_answers`)."""
        route = self.routes.get(name)
        if route is None:
            raise UnknownMethod(f"no method {name!r}")
        method, handler = route
        if caller.role not in method.roles:
            raise Forbidden(f"{caller.cn!r} ({caller.role}) may not call {name}; it is for "
                            f"{', '.join(sorted(method.roles))}")
        try:
            request = codec.decode(method.request, args)
        except codec.CodecError as err:
            raise RequestError(f"{name}: {err}") from None
        answer = await handler(caller, request)
        try:
            return method.write_answer(answer, self.check_answers)
        except codec.CodecError as err:
            log.error("%s answered with what it does not declare: %s", name, err)
            raise BadAnswer(str(err)) from None

    async def call(self, addr: str, method: str, args: dict[str, Any] | None = None,
                   timeout: float | None = None) -> Any:
        raise NotImplementedError

    async def ask(self, addr: str, method: Method[R, A], request: R, timeout: float | None = None) -> A:
        """`call`, typed: `request` (the method's request dataclass) goes out encoded, and the answer comes
        back decoded into the method's answer type. An answer that does not fit it fails like a remote
        error of kind `bad_answer`."""
        answer = _read(addr, method, await self.call(addr, method.name, codec.encode(request), timeout))
        if isinstance(answer, RpcError):
            raise answer
        return answer

    async def forget(self, addr: str) -> None:
        """Drop any cached connection to `addr` (e.g. after the peer was declared dead)."""

    async def peer_version(self, addr: str, timeout: float | None = None) -> int:
        """The protocol version spoken with the node at `addr` (connecting if need be): a service sends a
        message that version N brought only to a peer where this is at least N. Unreachable if the peer
        shares no version with us."""
        raise NotImplementedError

    async def call_many(self, addrs: list[str], method: str, args: dict[str, Any] | None = None,
                        timeout: float | None = None) -> dict[str, Any]:
        """Call each address in parallel; each answer is the result or the RpcError it raised.

        A call to our own address runs the handler directly, without a network round trip.
        """
        answers: dict[str, Any] = {}

        async def one(addr: str) -> None:
            try:
                if addr == self.addr:
                    answers[addr] = await self.dispatch(Caller(self.node, NODE, self.node, self.site,
                                                               self.versions.newest), method, args or {})
                else:
                    answers[addr] = await self.call(addr, method, args, timeout)
            except (RpcError, RequestError) as err:
                answers[addr] = err

        async with trio.open_nursery() as nursery:
            for addr in dict.fromkeys(addrs):
                nursery.start_soon(one, addr)
        return answers


    async def ask_many(self, addrs: list[str], method: Method[R, A], request: R,
                       timeout: float | None = None) -> dict[str, A | RpcError]:
        """`call_many`, typed as `ask` is: each answer decoded into the method's answer type, or the error
        it met (an answer that does not fit is a RemoteError of kind `bad_answer`)."""
        answers = await self.call_many(addrs, method.name, codec.encode(request), timeout)
        read: dict[str, A | RpcError] = {}
        for addr, value in answers.items():
            answer = _read(addr, method, value)
            read[addr] = answer
        return read


class Transport(Endpoint):
    """Listens for peers, dials peers, and routes requests to registered handlers.

    Use as `async with Transport(...) as t:`; it owns a nursery for connection tasks.
    """

    def __init__(
        self,
        identity: tls.Identity,
        node: str,
        site: str = "",
        *,
        delay: DelayFn | None = None,
        max_frame: int = frames.MAX_FRAME,
        default_timeout: float = DEFAULT_TIMEOUT,
        speaks: Versions = SPOKEN,
    ) -> None:
        super().__init__(node, site, default_timeout)
        self.versions = speaks
        self.delay = delay
        self.max_frame = max_frame
        self._server_ctx = tls.server_context(identity)
        self._client_ctx = tls.client_context(identity)
        self._pool: dict[str, _Outbound] = {}
        self._dialing: dict[str, trio.Lock] = {}
        self._nursery: trio.Nursery | None = None
        self.rejected_connections = 0
        self._disjoint: set[tuple[str, Versions]] = set()
        """Peers (name, versions) already logged as sharing no version with us: logged once, not per retry."""

    async def __aenter__(self) -> Transport:
        self._nursery_cm = trio.open_nursery()
        self._nursery = await self._nursery_cm.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> bool | None:
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
        try:
            return await self._nursery_cm.__aexit__(*exc)
        except BaseExceptionGroup as group:
            # the body's own exception comes back wrapped; callers should see it as raised
            if exc[1] is not None and group.exceptions == (exc[1],):
                raise exc[1] from None
            raise

    # -- serving -----------------------------------------------------------------------------------

    async def listen(self, host: str, port: int) -> int:
        """Start accepting connections; returns the bound port (useful with port 0)."""
        assert self._nursery is not None, "use Transport as an async context manager"
        listeners = await trio.open_tcp_listeners(port, host=host)
        self._nursery.start_soon(trio.serve_listeners, self._serve_connection, listeners)
        bound = listeners[0].socket.getsockname()[1]
        self.addr = f"{host}:{bound}"
        return bound

    async def _serve_connection(self, tcp: trio.SocketStream) -> None:
        """One inbound connection, start to end. Nothing a peer sends may escape this function."""
        peer = _peer_address(tcp)
        stream = TlsSocket(tcp, self._server_ctx, server_side=True)
        conn = _Connection(stream, self.max_frame)
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await stream.do_handshake()
                cn, role = tls.peer_identity(stream.ssl)
                hello = versions.read_hello(await conn.receive())
                conn.peer_node, conn.peer_site = hello.node, hello.site
                await conn.send(self._hello())  # even to refuse: the dialer learns from it what we speak
                conn.version = versions.agree(self.versions, hello, peer)
            await self._serve_requests(conn, Caller(cn, role, conn.peer_node, conn.peer_site, conn.version), peer)
        except EOFError:
            pass
        except NoCommonVersion as err:
            self.rejected_connections += 1
            self._log_disjoint(err, f"refused connection: {err}")
        except (trio.TooSlowError, trio.BrokenResourceError, ssl.SSLError, tls.TLSError, frames.FrameError,
                HandshakeRefused) as err:
            self.rejected_connections += 1
            log.warning("refused connection from %s: %s", peer, _describe(err))
        except Exception:  # a bug, not the peer's fault; still not a reason to stop serving others
            log.exception("connection from %s failed", peer)
        finally:
            await conn.close()

    async def _serve_requests(self, conn: _Connection, caller: Caller, peer: str) -> None:
        """Read requests and answer each in its own task; returns when the peer goes or misbehaves."""
        limiter = trio.CapacityLimiter(MAX_IN_FLIGHT)
        async with trio.open_nursery() as nursery:
            try:
                while True:
                    msg = await conn.receive()
                    if not (isinstance(msg, list) and len(msg) == 4 and msg[0] == REQUEST and isinstance(msg[1], int)
                            and isinstance(msg[2], str) and isinstance(msg[3], dict)):
                        raise frames.FrameError(f"not a request frame: {str(msg)[:80]!r}")
                    try:  # as `_acquire`: a free slot without a pass through the scheduler
                        limiter.acquire_on_behalf_of_nowait(msg[1])
                    except trio.WouldBlock:
                        await limiter.acquire_on_behalf_of(msg[1])
                    nursery.start_soon(self._answer, conn, caller, msg, limiter)
            except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # peer hung up (maybe without TLS close_notify); in-flight handlers still finish
            except frames.FrameError as err:
                self.rejected_connections += 1
                log.warning("closing connection from %s (%s): %s", caller.node, peer, _describe(err))

    async def _answer(self, conn: _Connection, caller: Caller, msg: list[Any], limiter: trio.CapacityLimiter) -> None:
        _, request_id, method, args = msg
        received = trio.current_time()
        try:
            try:
                reply = [RESPONSE, request_id, True, await self.dispatch(caller, method, args)]
            except Exception as raised:
                err = _refusal_in(raised)
                if isinstance(err, RequestError):
                    reply = [RESPONSE, request_id, False, {"kind": err.kind, "message": str(err)}]
                elif isinstance(err, RpcError):
                    reply = [RESPONSE, request_id, False, {"kind": "upstream", "message": str(err)}]
                else:
                    log.exception("handler %s failed", method)
                    reply = [RESPONSE, request_id, False, {"kind": "internal", "message": _describe(err)}]
            held = trio.current_time() - received
            trailer = [self.stamp() if self.stamp is not None else None, held]
            if self.on_served is not None and method in self.routes:  # only served names: a bounded set
                self.on_served(method, held, None if reply[2] else reply[3]["kind"])
            try:
                await conn.send([*reply, *trailer])
            except frames.FrameError as err:  # our own answer is too big: say so instead of going silent
                await conn.send([RESPONSE, request_id, False, {"kind": "internal", "message": str(err)}, *trailer])
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the caller hung up; its call will time out or fail on its side
        except Exception:
            log.exception("answering %s failed", method)
        finally:
            limiter.release_on_behalf_of(request_id)

    # -- calling -----------------------------------------------------------------------------------

    async def call(self, addr: str, method: str, args: dict[str, Any] | None = None,
                   timeout: float | None = None) -> Any:
        """Call `method` on the agent at `addr` ("host:port"); raises an RpcError subclass on failure."""
        deadline = timeout if timeout is not None else self.default_timeout
        out: _Outbound | None = None
        request_id = 0
        with trio.move_on_after(deadline) as scope:
            out = await self._connection(addr)
            sent = trio.current_time()
            request_id = next(out.ids)
            event, slot = trio.Event(), list[Any]()
            out.waiting[request_id] = (event, slot)
            try:
                await self._round_trip_to(out.conn.peer_site)
                await out.conn.send([REQUEST, request_id, method, args or {}])
            except (trio.BrokenResourceError, trio.ClosedResourceError) as err:
                out.waiting.pop(request_id, None)
                raise Unreachable(f"{addr}: connection lost: {_describe(err)}") from None
            await event.wait()
        if scope.cancelled_caught:
            if out is not None:
                out.waiting.pop(request_id, None)
            raise RpcTimeout(f"{addr}: no answer to {method} within {deadline:g}s")
        assert out is not None
        if not slot:
            raise Unreachable(f"{addr}: connection lost during {method}: {_describe(out.broken)}")
        ok, value, stamp, held = slot
        if self.on_rtt is not None and out.conn.peer_node and isinstance(held, int | float):
            self.on_rtt(out.conn.peer_node, trio.current_time() - sent - held, stamp)
        if ok:
            return value
        if not isinstance(value, dict):
            raise RemoteError("internal", str(value))
        raise RemoteError(str(value.get("kind", "internal")), str(value.get("message", "")))

    async def _connection(self, addr: str) -> _Outbound:
        out = self._pool.get(addr)
        if out is not None and out.broken is None:  # the common case, without the dialing lock's checkpoint
            return out
        lock = self._dialing.setdefault(addr, trio.Lock())
        async with lock:
            out = self._pool.get(addr)
            if out is not None and out.broken is None:
                return out
            out = _Outbound(await self._dial(addr))
            self._pool[addr] = out
            assert self._nursery is not None, "use Transport as an async context manager"
            self._nursery.start_soon(out.read_loop)
            return out

    async def _dial(self, addr: str) -> _Connection:
        host, port = split_addr(addr)
        try:
            tcp = await trio.open_tcp_stream(host, port)
        except OSError as err:
            raise Unreachable(f"{addr}: {err.strerror or err}") from None
        try:  # wrapping reads a byte when the socket looks unconnected: a peer that just reset it fails here
            stream = TlsSocket(tcp, self._client_ctx, server_side=False)
        except OSError as err:
            await tcp.aclose()
            raise Unreachable(f"{addr}: {err.strerror or err}") from None
        conn = _Connection(stream, self.max_frame)
        try:
            await stream.do_handshake()
            await conn.send(self._hello())
            try:
                hello = versions.read_hello(await conn.receive())
            except (EOFError, trio.BrokenResourceError) as err:  # as an agent before version ranges refuses a hello
                why = (f": an agent before version ranges does so if it does not speak version {self.versions.oldest}"
                       if self.versions.oldest > 1 else f": {_describe(err.__cause__)}" if err.__cause__ else "")
                raise HandshakeRefused(f"the peer closed the connection in the handshake{why}") from None
            conn.peer_node, conn.peer_site = hello.node, hello.site
            conn.version = versions.agree(self.versions, hello, addr)
        except (EOFError, trio.BrokenResourceError, ssl.SSLError, frames.FrameError, HandshakeRefused) as err:
            await conn.close()
            if isinstance(err, NoCommonVersion):
                self._log_disjoint(err, f"cannot call {addr}: {err}")
            raise Unreachable(f"{addr}: handshake failed: {_describe(err)}") from None
        return conn

    async def peer_version(self, addr: str, timeout: float | None = None) -> int:
        if addr == self.addr:
            return self.versions.newest
        deadline = timeout if timeout is not None else self.default_timeout
        with trio.move_on_after(deadline):
            return (await self._connection(addr)).conn.version
        raise RpcTimeout(f"{addr}: no handshake within {deadline:g}s")

    def peer_versions(self) -> dict[str, int]:
        """The protocol version of each peer node this transport has a live connection to (those it dialed)."""
        return {out.conn.peer_node: out.conn.version for out in self._pool.values()
                if out.broken is None and out.conn.peer_node}

    def _log_disjoint(self, err: NoCommonVersion, line: str) -> None:
        """A peer that shares no version with us is retried every few seconds: say so at WARNING once."""
        key = (err.peer.node, err.peer.versions)
        log.log(logging.DEBUG if key in self._disjoint else logging.WARNING, "%s", line)
        self._disjoint.add(key)

    async def forget(self, addr: str) -> None:
        out = self._pool.pop(addr, None)
        if out is not None:
            await out.conn.close()

    def _hello(self) -> dict[str, Any]:
        return versions.hello(self.node, self.site, self.versions)

    async def _round_trip_to(self, peer_site: str) -> None:
        """The emulated WAN's round trip to a peer of `peer_site` (module doc)."""
        if self.delay is not None and peer_site:
            seconds = self.delay(self.site, peer_site) + self.delay(peer_site, self.site)
            if seconds > 0:
                await trio.sleep(seconds)


def _read(addr: str, method: Method[R, A], value: Any) -> A | RpcError:
    """An answer from `addr` decoded into `method`'s answer type, or the error the call met instead."""
    if isinstance(value, RpcError):
        return value
    if isinstance(value, RequestError):  # our own handler refused: as a peer's refusal would read
        return RemoteError(value.kind, str(value))
    try:
        return method.read_answer(value)
    except codec.CodecError as err:
        return RemoteError("bad_answer", f"{addr}: {err}")


async def _acquire(lock: trio.Lock) -> None:
    """`lock.acquire()`, without its pass through the scheduler when the lock is free: an idle agent's cost is
    mostly such passes, a dozen per call (the frame's send and the TLS stream's take theirs anyway)."""
    try:
        lock.acquire_nowait()
    except trio.WouldBlock:
        await lock.acquire()


def split_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad address {addr!r}: expected host:port")
    return host.strip("[]"), int(port)


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct TCP ports free on `host` right now (bound together, then released)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _peer_address(tcp: trio.SocketStream) -> str:
    with contextlib.suppress(OSError):
        host, port = tcp.socket.getpeername()[:2]
        return f"{host}:{port}"
    return "?"


def _refusal_in(err: Exception) -> Exception:
    """`err`, or the first refusal (RequestError, RpcError) in a group that holds nothing else: a handler's
    nursery wraps what its tasks raised, and the caller should get that one line, not "Exceptions from Trio
    nursery"."""
    if isinstance(err, ExceptionGroup):
        refusals, rest = err.split((RequestError, RpcError))
        if refusals is not None and rest is None:
            while isinstance(first := refusals.exceptions[0], ExceptionGroup):
                refusals = first
            return first
    return err


def _describe(err: BaseException | None) -> str:
    if err is None:
        return "closed"
    text = str(err) or type(err).__name__
    return text.splitlines()[0][:200]
