"""The frame codec: round trips, limits, and garbage that must raise FrameError, never anything else; and a
connection sends each frame whole."""

import contextlib

import msgpack
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from overlay.wire import frames
from overlay.wire.frames import MAX_FRAME, Decoder
from overlay.wire.rpc import SEND_LIMIT, _Connection

messages = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text() | st.binary() | st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@given(st.lists(messages, max_size=5), st.integers(1, 64))
def test_round_trip_in_arbitrary_chunks(batch, chunk):
    data = b"".join(frames.encode(m) for m in batch)
    decoder = frames.Decoder()
    out = []
    for i in range(0, len(data), chunk):
        out += decoder.feed(data[i : i + chunk])
    assert out == batch
    assert decoder.pending == 0


def test_encode_refuses_oversized_message():
    with pytest.raises(frames.FrameError, match="exceeds"):
        frames.encode(b"x" * 2000, max_frame=1000)


def test_decoder_refuses_announced_oversized_frame_before_buffering_it():
    decoder = frames.Decoder(max_frame=1000)
    with pytest.raises(frames.FrameError, match="1001-byte frame"):
        decoder.feed(frames.HEADER.pack(1001))


def test_truncated_frame_stays_pending():
    data = frames.encode({"a": 1})
    decoder = frames.Decoder()
    assert decoder.feed(data[:-1]) == []
    assert decoder.pending == len(data) - 1


def test_extension_types_are_refused():
    body = msgpack.packb(msgpack.ExtType(5, b"zz"))
    with pytest.raises(frames.FrameError, match="extension type 5"):
        frames.Decoder().feed(frames.HEADER.pack(len(body)) + body)


@given(st.binary(max_size=200))
def test_garbage_raises_only_frame_error(blob):
    decoder = frames.Decoder(max_frame=1 << 16)
    with contextlib.suppress(frames.FrameError):
        decoder.feed(blob)


@given(st.binary(min_size=1, max_size=100))
def test_garbage_body_with_valid_length_raises_frame_error_or_decodes(body):
    decoder = frames.Decoder()
    try:
        result = decoder.feed(frames.HEADER.pack(len(body)) + body)
    except frames.FrameError:
        return
    assert len(result) == 1


class HeldStream:
    """A stream whose `send_all` waits until the test releases it: a frame caught half-way out."""

    def __init__(self) -> None:
        self.started, self.release, self.sent, self.closed = trio.Event(), trio.Event(), bytearray(), False

    async def send_all(self, data: bytes) -> None:
        self.started.set()
        await self.release.wait()
        self.sent += data

    async def aclose(self) -> None:
        self.closed = True


async def test_a_call_cancelled_while_its_frame_leaves_still_sends_it_whole() -> None:
    """A cut frame would break the pooled connection for every other call to that peer."""
    stream = HeldStream()
    conn = _Connection(stream, MAX_FRAME)  # type: ignore[arg-type]
    caller = trio.CancelScope()

    async def call() -> None:
        with caller:
            await conn.send(["request", 1])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call)
        await stream.started.wait()
        caller.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert stream.sent == b""  # still leaving, though its caller is gone
        stream.release.set()
    assert Decoder().feed(stream.sent) == [["request", 1]] and not stream.closed


async def test_a_frame_that_cannot_leave_closes_the_connection(autojump_clock: trio.testing.MockClock) -> None:
    stream = HeldStream()  # a peer that stopped reading
    conn = _Connection(stream, MAX_FRAME)  # type: ignore[arg-type]
    with pytest.raises(trio.BrokenResourceError, match=f"within {SEND_LIMIT:g}s"):
        await conn.send(["request", 1])
    assert stream.closed
