"""An in-memory network for simulations: the production services, thousands of nodes, one process.

`MemNetwork` connects `MemTransport`s (the `Endpoint` surface of the real transport) with a
per-pair one-way latency; run it under trio's virtual clock (`trio.testing.MockClock` with
`autojump_threshold=0`) and simulated minutes pass in seconds. A crashed node does not answer: its
callers wait out their timeout, as they would for a host that vanished. Every request and answer is
copied through msgpack, so a simulation catches what the wire would refuse.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack
import trio

from overlay.rpc import Caller, Endpoint, RemoteError, RequestError, RpcError, RpcTimeout, Unreachable

LatencyFn = Callable[[str, str], float]
"""One-way latency in seconds between two addresses."""


class MemNetwork:
    def __init__(self, latency: LatencyFn | None = None) -> None:
        self.latency = latency or (lambda a, b: 0.0)
        self.endpoints: dict[str, MemTransport] = {}
        self.down: set[str] = set()
        self.messages = 0

    def endpoint(self, addr: str, node: str, site: str = "") -> MemTransport:
        transport = MemTransport(self, addr, node, site)
        self.endpoints[addr] = transport
        self.down.discard(addr)
        return transport

    def crash(self, addr: str) -> None:
        """The node stops answering at once; its state is gone with it."""
        self.down.add(addr)
        self.endpoints.pop(addr, None)


class MemTransport(Endpoint):
    def __init__(self, network: MemNetwork, addr: str, node: str, site: str) -> None:
        super().__init__(node, site)
        self.network = network
        self.addr = addr

    async def call(self, addr: str, method: str, args: dict[str, Any] | None = None,
                   timeout: float | None = None) -> Any:
        deadline = timeout if timeout is not None else self.default_timeout
        net = self.network
        if self.addr in net.down:
            raise Unreachable(f"{addr}: this node is down")
        one_way = net.latency(self.addr, addr)
        with trio.move_on_after(deadline):
            net.messages += 1
            await trio.sleep(one_way)
            target = net.endpoints.get(addr)
            if target is None:
                await trio.sleep_forever()  # a vanished host: the caller can only time out
            ok, value = await target.serve(self, method, _copy(args or {}))
            await trio.sleep(one_way)
            if self.on_rtt is not None:
                self.on_rtt(target.node, 2 * one_way, target.stamp() if target.stamp else None)
            if ok:
                return _copy(value)
            raise RemoteError(value["kind"], value["message"])
        raise RpcTimeout(f"{addr}: no answer to {method} within {deadline:g}s")

    async def serve(self, caller: MemTransport, method: str, args: dict[str, Any]) -> tuple[bool, Any]:
        """Run a handler as the real transport would; a handler's bug propagates (a simulation should stop)."""
        handler = self.handlers.get(method)
        if handler is None:
            return False, {"kind": "unknown_method", "message": f"no method {method!r}"}
        try:
            return True, await handler(Caller(caller.node, "node", caller.node, caller.site), args)
        except RequestError as err:
            return False, {"kind": err.kind, "message": str(err)}
        except RpcError as err:
            return False, {"kind": "upstream", "message": str(err)}


def _copy(value: Any) -> Any:
    return msgpack.unpackb(msgpack.packb(value, use_bin_type=True), raw=False, strict_map_key=False)
