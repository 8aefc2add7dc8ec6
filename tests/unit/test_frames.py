"""The frame codec: round trips, limits, and garbage that must raise FrameError, never anything else."""

import contextlib

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlay.wire import frames

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
