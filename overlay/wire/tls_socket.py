"""TLS straight on a non-blocking socket, waited on with trio's readiness primitives: the transport's stream.

Why not `trio.SSLStream`: it is general (any transport stream underneath, renegotiation, any number of
tasks reading and writing at once), and that generality is paid in Python on every frame: memory BIOs
copied by hand, conflict detectors, inner locks, a checkpoint sandwich around each step. An idle agent's
CPU is mostly the few RPCs a second it serves and makes, and that layer was a sixth of each. Here OpenSSL
reads and writes the socket itself (`ssl.SSLSocket`), and the cases it must handle are few, because the
transport's contexts speak TLS 1.3 only (`overlay.wire.tls`): no renegotiation, so a write never waits to
read; one task reads a connection and its writers take turns (`overlay.wire.rpc`), so no two tasks ever
wait on one socket for the same thing.

What it must keep from `trio.SSLStream`: its errors. A TLS failure or a broken socket is a
`trio.BrokenResourceError` whose cause is the `ssl.SSLError` (or `OSError`), an end of stream without
close_notify too (an attacker may not truncate a stream unnoticed); `receive_some` returns b"" only at a
clean close.
"""

from __future__ import annotations

import contextlib
import socket
import ssl

import trio

RECEIVE_SIZE = 65536
DISCARD_READS = 16
"""At most this many reads of unread bytes before a close (a peer that keeps sending gets its reset)."""


class TlsSocket(trio.abc.AsyncResource):
    """One TLS connection over the TCP socket of `tcp` (taken over: `tcp` must not be used any more)."""

    def __init__(self, tcp: trio.SocketStream, context: ssl.SSLContext, server_side: bool) -> None:
        raw = socket.socket(fileno=tcp.socket.detach())
        raw.setblocking(False)
        self.ssl = context.wrap_socket(raw, server_side=server_side, do_handshake_on_connect=False,
                                       suppress_ragged_eofs=False)

    async def do_handshake(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                self.ssl.do_handshake()
                return
            except ssl.SSLWantReadError:
                await trio.lowlevel.wait_readable(self.ssl)
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(self.ssl)
            except (ssl.SSLError, OSError) as err:
                raise trio.BrokenResourceError from err

    async def send_all(self, data: bytes) -> None:
        """Send `data` whole. After a want-write OpenSSL needs the same bytes again, from the same start."""
        await trio.lowlevel.checkpoint_if_cancelled()
        view = memoryview(data)
        while view:
            try:
                view = view[self.ssl.send(view):]
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(self.ssl)
            except (ssl.SSLError, OSError) as err:
                raise trio.BrokenResourceError from err

    async def receive_some(self, max_bytes: int = RECEIVE_SIZE) -> bytes:
        """Some decrypted bytes (what OpenSSL holds already first), b"" once the peer closed cleanly."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                return self.ssl.recv(max_bytes)
            except ssl.SSLWantReadError:
                await trio.lowlevel.wait_readable(self.ssl)
            except ssl.SSLZeroReturnError:
                return b""
            except (ssl.SSLError, OSError) as err:
                raise trio.BrokenResourceError from err

    async def aclose(self) -> None:
        """Close at once, without close_notify (as `trio.aclose_forcefully` would), waking any task that waits
        on the socket: it gets `trio.ClosedResourceError`."""
        if self.ssl.fileno() != -1:
            trio.lowlevel.notify_closing(self.ssl)
            _discard_unread(self.ssl)
            self.ssl.close()
        await trio.lowlevel.checkpoint()


def _discard_unread(sock: ssl.SSLSocket) -> None:
    """Read, past TLS, what the peer sent and nobody read (a refused handshake reads only the first record):
    Linux answers the close of a socket holding unread bytes with a reset, which the peer would read as an
    error rather than as the end. `trio.SSLStream` never left any: it read whatever had arrived."""
    with contextlib.suppress(OSError):  # nothing more for now (would block), or already broken
        for _ in range(DISCARD_READS):
            if not socket.socket.recv(sock, RECEIVE_SIZE):
                return
