"""Creating a VE: every VM's reservation is confirmed at once, so none waits for the others to start."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from discovery.ve.records import Slot
from discovery.ve.service import VEService
from overlay.wire.rpc import RemoteError, RequestError

PLACEMENT = {vm: Slot(node, addr, "rennes", 1.0, "nearest with room") for vm, node, addr in
             [("a", "node1", "127.0.0.1:1"), ("b", "node2", "127.0.0.1:2"), ("c", "node3", "127.0.0.1:3")]}


class Hosts:
    """`host.confirm` at three hosts: a real guest takes `start` seconds to start at node1."""

    def __init__(self, start: float, refuse: str | None = None) -> None:
        self.start, self.refuse = start, refuse
        self.sent: dict[str, float] = {}

    async def call(self, addr: str, method: str, args: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert method == "host.confirm"
        self.sent[args["token"]] = trio.current_time()
        if addr == "127.0.0.1:1":
            await trio.sleep(self.start)
        if args["token"] == self.refuse:
            raise RemoteError("conflict", f"reservation {args['token']} is unknown or expired")
        return {"state": "running"}


def service(hosts: Hosts) -> VEService:
    ve = VEService.__new__(VEService)  # `_confirm_all` uses the transport only
    ve.transport = hosts
    return ve


async def test_confirms_go_out_together_so_a_slow_start_cannot_outlast_another_reservation(autojump_clock):
    hosts, tokens = Hosts(start=30.0), {"a": "a#1", "b": "b#1", "c": "c#1"}
    await service(hosts)._confirm_all(PLACEMENT, tokens)
    assert sorted(hosts.sent) == ["a#1", "b#1", "c#1"] and set(hosts.sent.values()) == {0.0}
    assert tokens == {}  # every token was sent: none is left to release


async def test_every_refused_confirm_is_named(autojump_clock):
    hosts, tokens = Hosts(start=1.0, refuse="b#1"), {"a": "a#1", "b": "b#1", "c": "c#1"}
    with pytest.raises(RequestError, match=r"^b on node2: .*b#1 is unknown or expired$"):
        await service(hosts)._confirm_all(PLACEMENT, tokens)
    assert sorted(hosts.sent) == ["a#1", "b#1", "c#1"] and tokens == {}
