"""The wire format of DVMS messages between agents (`discovery.scheduler.service.encode`/`decode`)."""

from __future__ import annotations

import json

import pytest

from discovery.scheduler.service import decode, encode
from dvms.partition import Join, KeepAlive, PartitionId, Refuse, Yield
from overlay.wire.rpc import RequestError

PID = PartitionId("node1", 0, 3)


@pytest.mark.parametrize("msg", [
    Join(PID, "node1", 2, 1.5, PartitionId("node2", 1, 1)), Join(PID, "node1", 2, 1.5),
    KeepAlive(PID, "node1", 4, 2.0, ("node1", "node3")), Refuse(PID, "node2", 2, 1.5, PID, "node1"),
    Yield(PID, "node1", 5, PartitionId("node0", 0, 1), ("node1",)),
])
def test_messages_round_trip_through_json(msg):
    assert decode(json.loads(json.dumps(encode(msg)))) == msg


@pytest.mark.parametrize("bad", [
    None, [], {}, {"type": "Nope"}, {"type": "Join"}, {**encode(Join(PID, "a", 1, 0.0)), "pid": ["a", 0]},
    {**encode(Join(PID, "a", 1, 0.0)), "extra": 1}, {**encode(Join(PID, "a", 1, 0.0)), "version": "1"},
    {**encode(Join(PID, "a", 1, 0.0)), "sent_at": float("nan")},
    {**encode(KeepAlive(PID, "a", 1, 0.0, ("a",))), "members": [1]},
])
def test_malformed_messages_are_request_errors(bad):
    with pytest.raises(RequestError):
        decode(bad)
