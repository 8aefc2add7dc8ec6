"""Who may call what: every registered RPC, called on a real agent as an agent, a user and an operator.

The roles are checked in one place (`overlay.wire.rpc.Endpoint.dispatch`) before the arguments are
decoded and before any handler runs. Each call here sends one unknown field: a caller whose role may
call the method gets that field refused (bad_request, so nothing ran); any other gets `forbidden`.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from overlay.wire import tls
from overlay.wire.ca import issue
from overlay.wire.rpc import ANYONE, Method, RemoteError, Transport

ROOT = Path(__file__).resolve().parents[2]
CATALOGUES = ("overlay.messages", "agents.messages", "images.messages", "discovery.ve.messages",
              "discovery.ha.messages", "discovery.scheduler.messages", "discovery.top.messages")


def registered() -> list[Method]:
    methods = [value for name in CATALOGUES for value in vars(importlib.import_module(name)).values()
               if isinstance(value, Method)]
    assert len({m.name for m in methods}) == len(methods)
    return sorted(methods, key=lambda m: m.name)


def test_every_method_is_declared_in_a_catalogue() -> None:
    """`Method(...)` appears only in the catalogues this test reads, so none escapes the role check below.
    A simulation's own methods (`*/sim.py`: between its simulated nodes, on the in-memory network) are no
    agent's surface, so no role applies to them."""
    places = []
    for path in ROOT.glob("*/**/*.py"):
        if ".venv" in path.parts or "tests" in path.parts or path.name == "sim.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Method":
                places.append(".".join(path.relative_to(ROOT).with_suffix("").parts))
    assert set(places) == set(CATALOGUES)


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    from tests.integration.conftest import running_cluster

    with running_cluster(tmp_path_factory, "roles", 1, 1) as cluster:
        ca = cluster.dir / "ca"
        out = cluster.dir / "callers"
        yield cluster.node("node1")["addr"], {
            "node": issue(ca, "prober", "node", out_dir=out),
            "client": issue(ca, "bob", "client", out_dir=out),
            "operator": tls.Identity(cert=cluster.dir / "operator.pem", key=cluster.dir / "operator.key",
                                     ca=ca / "ca.pem"),
        }


@pytest.mark.integration
@pytest.mark.parametrize("role", tls.ROLES)
async def test_every_rpc_as_every_role(agent, role) -> None:
    addr, identities = agent
    outcomes = {}
    async with Transport(identities[role], f"test-{role}") as transport:
        for method in registered():
            try:
                await transport.call(addr, method.name, {"__probe__": 1}, timeout=30)
                outcomes[method.name] = "ran"
            except RemoteError as err:
                outcomes[method.name] = err.kind
    expected = {m.name: "bad_request" if role in m.roles else "forbidden" for m in registered()}
    assert outcomes == expected


def test_cluster_wide_actions_are_for_operators_and_user_views_for_everyone() -> None:
    roles = {m.name: m.roles for m in registered()}
    assert roles["overlay.bind"] == roles["dvms.load"] == frozenset({"operator"})
    assert roles["ve.create"] == roles["overlay.put"] == roles["agent.members"] == ANYONE
    assert all("client" not in roles[name] for name in roles if name.split(".")[0] in ("host", "dht", "chord"))


def test_every_method_declares_its_answer() -> None:
    """So a caller decodes what a node answers with the method's type (`Endpoint.ask`), and a handler that
    answers something else is a `bad_answer`: the protocols' own hops (Chord, the DHT, SWIM, spiral) too."""
    assert [m.name for m in registered() if m.answer is None] == []


async def test_nothing_runs_for_a_caller_the_role_check_refuses() -> None:
    """The check comes before decoding and before the handler."""
    from overlay.messages import NoArgs
    from overlay.wire.rpc import OPERATORS, Caller, Endpoint, Forbidden

    ran = []

    async def handler(caller, request):
        ran.append(request)

    endpoint = Endpoint("n1")
    endpoint.route(Method("x.y", NoArgs, OPERATORS), handler)
    with pytest.raises(Forbidden):
        await endpoint.dispatch(Caller("bob", "client", "", ""), "x.y", {})
    await endpoint.dispatch(Caller("op", "operator", "", ""), "x.y", {})
    assert ran == [NoArgs()]

