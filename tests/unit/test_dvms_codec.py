"""The wire format of DVMS messages between agents: the ISP core's messages through the one codec
(`overlay.wire.codec`, tagged by class name), as `dvms.msg` carries them."""

from __future__ import annotations

import json

import pytest

from dvms.partition import Join, KeepAlive, PartitionId, Refuse, Wire, Yield
from overlay.wire.codec import CodecError, decode, encode_tagged

PID = PartitionId("node1", 0, 3)


@pytest.mark.parametrize("msg", [
    Join(PID, "node1", 2, 1.5, PartitionId("node2", 1, 1)), Join(PID, "node1", 2, 1.5),
    KeepAlive(PID, "node1", 4, 2.0, ("node1", "node3")), Refuse(PID, "node2", 2, 1.5, PID, "node1"),
    Yield(PID, "node1", 5, PartitionId("node0", 0, 1), ("node1",)),
])
def test_messages_round_trip_through_json(msg):
    assert decode(Wire, json.loads(json.dumps(encode_tagged(msg)))) == msg


JOIN = encode_tagged(Join(PID, "a", 1, 0.0))


@pytest.mark.parametrize("bad, says", [
    (None, "expected a map"), ([], "expected a map"), ({}, "type: expected one of"),
    ({"type": "Nope"}, "type: expected one of"), ({"type": "Join"}, "missing field"),
    ({**JOIN, "pid": {"origin": "a", "incarnation": 0}}, "pid.seq: missing field"),
    ({**JOIN, "extra": 1}, "extra: unknown field"), ({**JOIN, "version": "1"}, "version: expected int"),
    ({**JOIN, "sent_at": float("nan")}, "sent_at: expected a finite number"),
    ({**encode_tagged(KeepAlive(PID, "a", 1, 0.0, ("a",))), "members": [1]}, r"members\[0\]: expected str"),
])
def test_malformed_messages_are_refused_naming_the_field(bad, says):
    with pytest.raises(CodecError, match=says):
        decode(Wire, bad)
