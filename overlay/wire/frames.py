"""Length-prefixed msgpack frames: the byte format of the wire, with no I/O.

A frame is a 4-byte big-endian length followed by that many bytes of msgpack. The decoder is fed
whatever bytes arrived and hands back whole messages; anything malformed raises `FrameError`, after
which the connection must be closed (there is no way to resynchronise a byte stream).
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

HEADER = struct.Struct(">I")
MAX_FRAME = 4 * 1024 * 1024
"""Default hard limit on one frame's body; a peer announcing more is cut off before we buffer it."""


class FrameError(Exception):
    """The peer sent bytes that are not a valid frame: close the connection."""


def encode(message: Any, max_frame: int = MAX_FRAME) -> bytes:
    body: bytes = msgpack.packb(message, use_bin_type=True)
    if len(body) > max_frame:
        raise FrameError(f"frame of {len(body)} bytes exceeds the {max_frame}-byte limit")
    return HEADER.pack(len(body)) + body


class Decoder:
    """Incremental decoder: `feed(data)` returns the complete messages received so far."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()

    def feed(self, data: bytes | bytearray) -> list[Any]:
        self._buffer += data
        messages = []
        while len(self._buffer) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buffer)
            if length > self.max_frame:
                raise FrameError(f"peer announced a {length}-byte frame, limit is {self.max_frame}")
            if len(self._buffer) < HEADER.size + length:
                break
            body = bytes(self._buffer[HEADER.size : HEADER.size + length])
            del self._buffer[: HEADER.size + length]
            messages.append(_unpack(body))
        return messages

    @property
    def pending(self) -> int:
        """Bytes received but not yet part of a whole frame (non-zero at EOF means a truncated frame)."""
        return len(self._buffer)


def _unpack(body: bytes) -> Any:
    try:
        # strict_map_key=False lets integer keys through; ext types and oversized containers are refused.
        return msgpack.unpackb(body, raw=False, strict_map_key=False, ext_hook=_refuse_ext)
    except FrameError:
        raise
    except Exception as err:  # msgpack raises several unrelated types for garbage
        raise FrameError(f"undecodable frame: {type(err).__name__}: {err}") from None


def _refuse_ext(code: int, data: bytes) -> Any:
    raise FrameError(f"msgpack extension type {code} is not part of the protocol")
