"""Protocol version negotiation (`overlay.wire.versions`): the choice itself, the hellos of every version,
and two transports over loopback TLS that speak different ranges (and a raw version-1 client)."""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from discovery.agent_config import protocol_versions
from discovery.toml_config import ConfigError
from overlay.messages import NoArgs
from overlay.wire import frames, tls, versions
from overlay.wire.ca import init_ca, issue
from overlay.wire.memnet import MemNetwork
from overlay.wire.rpc import ANYONE, Caller, Method, Transport, Unreachable
from overlay.wire.versions import HandshakeRefused, Hello, Versions, negotiate, read_hello

ranges = st.tuples(st.integers(1, 8), st.integers(0, 4)).map(lambda t: Versions(t[0], t[0] + t[1]))


@given(ranges, ranges)
def test_the_version_chosen_is_the_newest_both_speak(mine: Versions, theirs: Versions) -> None:
    chosen = negotiate(mine, theirs)
    common = [v for v in range(1, 13) if v in mine and v in theirs]
    assert chosen == (max(common) if common else None)
    if chosen is not None:
        assert chosen in mine and chosen in theirs
    assert negotiate(theirs, mine) == chosen  # both ends agree without another message


@given(ranges, ranges)
def test_both_ends_read_the_same_ranges_from_the_hellos(mine: Versions, theirs: Versions) -> None:
    ours, peer = read_hello(versions.hello("a", "rennes", mine)), read_hello(versions.hello("b", "", theirs))
    assert (ours, peer) == (Hello("a", "rennes", mine), Hello("b", "", theirs))
    assert negotiate(mine, peer.versions) == negotiate(theirs, ours.versions)


@given(ranges)
def test_an_agent_before_ranges_accepts_exactly_the_peers_that_speak_version_1(mine: Versions) -> None:
    """A version-1 agent checks only `proto == 1` and ignores the other keys."""
    assert (versions.hello("a", "", mine)["proto"] == 1) == (1 in mine)


def test_a_node_whose_newest_version_is_1_sends_version_1s_hello_exactly() -> None:
    assert versions.hello("old", "lyon", Versions(1, 1)) == {"proto": 1, "node": "old", "site": "lyon"}
    assert versions.hello("new", "lyon", Versions(1, 2)) == {"proto": 1, "node": "new", "site": "lyon",
                                                             "versions": [1, 2]}


def test_hellos_of_every_version_are_read() -> None:
    assert read_hello({"proto": 1, "node": "old", "site": "lyon"}) == Hello("old", "lyon", Versions(1, 1))
    later = {"proto": 3, "versions": [3, 5], "node": "n", "site": "s", "build": "x", "features": ["y"]}
    assert read_hello(later) == Hello("n", "s", Versions(3, 5))  # keys of later versions are ignored


@pytest.mark.parametrize("frame, line", [
    (["hello?"], "bad handshake frame: \"['hello?']\""),
    ({"proto": 1}, "bad handshake frame"),
    ({"proto": 0, "node": "old"}, "bad handshake from 'old': protocol versions 0..0: expected 1 <= oldest <= newest"),
    ({"node": "n"}, "bad handshake from 'n': protocol versions None..None"),
    ({"proto": True, "node": "n"}, "bad handshake from 'n': protocol versions True..True"),
    ({"proto": 1, "versions": [2, 1], "node": "n"}, "protocol versions 2..1: expected 1 <= oldest <= newest"),
    ({"proto": 1, "versions": [1], "node": "n"}, "versions [1]: expected [oldest, newest]"),
    ({"proto": 1, "versions": "1..2", "node": "n"}, "versions '1..2': expected [oldest, newest]"),
    ({"proto": 1, "node": "n" * 300}, "bad handshake frame"),
])
def test_a_bad_hello_is_refused_in_one_line(frame: object, line: str) -> None:
    with pytest.raises(HandshakeRefused) as refused:
        read_hello(frame)
    assert line in str(refused.value) and "\n" not in str(refused.value)


def test_versions_parse_and_print() -> None:
    assert Versions.parse("2") == Versions(2, 2) and Versions.parse(" 1..3 ") == Versions(1, 3)
    assert (str(Versions(2, 2)), str(Versions(1, 3))) == ("version 2", "versions 1..3")
    for bad in ("", "0", "2..1", "1-2", "a..b", "1..", "1.5"):
        with pytest.raises(ValueError, match="expected N or OLDEST..NEWEST"):
            Versions.parse(bad)


def test_the_environment_only_narrows_what_the_build_speaks() -> None:
    spoken = versions.SPOKEN
    assert protocol_versions(None) == protocol_versions("") == spoken
    assert protocol_versions(str(spoken.oldest)) == Versions(spoken.oldest, spoken.oldest)
    with pytest.raises(ConfigError, match=r"^\$DISCOVERY_PROTOCOL: .* is not within what this build speaks"):
        protocol_versions(f"{spoken.oldest}..{spoken.newest + 1}")
    with pytest.raises(ConfigError, match=r"^\$DISCOVERY_PROTOCOL: protocol versions 'x'"):
        protocol_versions("x")


# -- two transports over loopback TLS -----------------------------------------------------------------

WHO = Method("test.who", NoArgs, ANYONE, int)


Ids = tuple[tls.Identity, tls.Identity]


@pytest.fixture(scope="module")
def ids(tmp_path_factory: pytest.TempPathFactory) -> Ids:
    """An agent's identity and a client's, of one CA."""
    ca = tmp_path_factory.mktemp("pki") / "ca"
    init_ca(ca)
    return issue(ca, "a", "node", out_dir=ca.parent), issue(ca, "b", "client", out_dir=ca.parent)


async def who(caller: Caller, request: NoArgs) -> int:
    """The version the handler sees."""
    return caller.version


@pytest.mark.parametrize("server, client, used", [((1, 2), (1, 2), 2), ((1, 2), (1, 1), 1), ((1, 1), (1, 2), 1),
                                                   ((2, 2), (1, 2), 2)])
async def test_a_connection_uses_the_newest_version_both_speak_and_both_ends_know_it(
        ids: Ids, server: tuple[int, int], client: tuple[int, int], used: int) -> None:
    async with Transport(ids[0], "a", speaks=Versions(*server)) as a, \
            Transport(ids[1], "b", speaks=Versions(*client)) as b:
        a.route(WHO, who)
        addr = f"127.0.0.1:{await a.listen('127.0.0.1', 0)}"
        assert await b.ask(addr, WHO, NoArgs()) == used  # the handler's Caller.version
        assert await b.peer_version(addr) == used
        assert b.peer_versions() == {"a": used}


async def test_disjoint_ranges_are_refused_in_one_line_on_both_ends_once(
        ids: Ids, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "overlay.wire.rpc")
    async with Transport(ids[0], "a", speaks=Versions(1, 1)) as a, \
            Transport(ids[1], "b", speaks=Versions(2, 2)) as b, Transport(ids[1], "cli") as cli:
        a.route(WHO, who)
        addr = f"127.0.0.1:{await a.listen('127.0.0.1', 0)}"
        for _ in range(3):  # a member retries its seeds every tick: the reason is told once
            with pytest.raises(Unreachable, match=r"handshake failed: no common protocol version with a "
                                                  r"\(127.0.0.1:\d+\): it speaks version 1, we speak version 2$"):
                await b.ask(addr, WHO, NoArgs())
        with trio.fail_after(5):
            while a.rejected_connections < 3:  # the server's side ends after the dialer's
                await trio.sleep(0.01)
        assert await cli.ask(addr, WHO, NoArgs()) == 1  # and the server still serves whoever it can

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert any(w.startswith(f"cannot call {addr}: no common protocol version with a") for w in warnings)
    assert any(w.startswith("refused connection: no common protocol version with b (127.0.0.1:")
               and w.endswith("it speaks version 2, we speak version 1") for w in warnings)


async def test_a_client_of_version_1_is_answered_in_a_hello_it_accepts_and_served_as_version_1(ids: Ids) -> None:
    """The exact frames of an agent released before version ranges, on a raw TLS stream."""
    async with Transport(ids[0], "a") as a:
        a.route(WHO, who)
        port = await a.listen("127.0.0.1", 0)
        stream = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), tls.client_context(ids[1]),
                                server_hostname=None)
        await stream.send_all(frames.encode({"proto": 1, "node": "old", "site": ""}))
        await stream.send_all(frames.encode([0, 1, WHO.name, {}]))
        decoder, got = frames.Decoder(), list[Any]()
        with trio.fail_after(5):
            while len(got) < 2:
                got += decoder.feed(await stream.receive_some(65536))
        await stream.aclose()
    assert got[0]["proto"] == 1 and got[0]["node"] == "a"  # all a version-1 agent checks
    assert got[1][:4] == [1, 1, True, 1]


async def test_a_simulation_negotiates_as_the_wire_does() -> None:
    net = MemNetwork()
    old, new, newer = (net.endpoint(f"{n}:1", n, speaks=v)
                       for n, v in (("old", Versions(1, 1)), ("new", Versions(1, 2)), ("newer", Versions(2, 2))))
    for endpoint in (old, new, newer):
        endpoint.route(WHO, who)
    assert await new.ask("old:1", WHO, NoArgs()) == await old.ask("new:1", WHO, NoArgs()) == 1
    assert await new.ask("newer:1", WHO, NoArgs()) == await newer.peer_version("new:1") == 2
    with pytest.raises(Unreachable, match="no common protocol version with newer"):
        await old.ask("newer:1", WHO, NoArgs())


async def test_a_dialer_refused_by_an_agent_before_ranges_says_what_may_be_why(ids: Ids) -> None:
    """Such an agent closes the connection on a hello whose `proto` is not 1, without a word."""

    async def version_1_agent(tcp: trio.SocketStream) -> None:
        stream = trio.SSLStream(tcp, tls.server_context(ids[0]), server_side=True)
        decoder = frames.Decoder()
        with trio.fail_after(5):
            await stream.do_handshake()
            while not (hello := decoder.feed(await stream.receive_some(65536))):
                pass
        assert hello[0]["proto"] == 2
        await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery, Transport(ids[1], "b", speaks=Versions(2, 2)) as b:
        listeners = await nursery.start(partial(trio.serve_tcp, version_1_agent, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        with pytest.raises(Unreachable, match="handshake failed: the peer closed the connection in the handshake: an "
                                              "agent before version ranges does so if it does not speak version 2$"):
            await b.call(f"127.0.0.1:{port}", WHO.name)
        nursery.cancel_scope.cancel()
