"""The house's rules, checked on the source: imports point down the layers, no module imports itself
back through any chain (imports under TYPE_CHECKING and inside functions included), and the CLI starts
without loading the agent."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RANK = {"vivaldi": 0, "overlay": 1, "dvms": 2, "images": 2, "agents": 3, "discovery": 4}
"""A package may import only packages of a lower rank (and itself): vivaldi → overlay → dvms,
images → agents → discovery."""


def modules() -> dict[str, Path]:
    found = {}
    for package in RANK:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every project module that `name` imports, wherever the import statement stands."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `from pkg import name`: the module, not the name
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {t for t in imports(name, path, known) if known[t].name != "__init__.py"}
            for name, path in known.items()}


def test_imports_point_down_the_layers() -> None:
    wrong = sorted(f"{a} imports {b}" for a, targets in graph().items() for b in targets
                   if a.split(".")[0] != b.split(".")[0] and RANK[b.split(".")[0]] >= RANK[a.split(".")[0]])
    assert wrong == []


def test_no_import_cycle() -> None:
    edges = graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert [" → ".join(c) for c in cycles] == []


@pytest.mark.parametrize("module, also", [
    ("discovery.cli.main", ("trio", "cryptography", "yaml")),  # `discovery --help`: typer and rich only
    ("discovery.cli.client", ("cryptography",)),  # a call: trio, ssl and msgpack; no CA code
])
def test_the_cli_loads_no_agent_code(module: str, also: tuple[str, ...]) -> None:
    heavy = ("libvirt", "kademlia", "asyncio", "pykka", "trio_asyncio", "ortools", "numpy", "agents.node",
             "agents.host", *also)
    probe = (f"import sys, {module}; "
             f"print(sorted(m for m in sys.modules if any(m == h or m.startswith(h + '.') for h in {heavy!r})))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    assert loaded.stdout.strip() == "[]"
