"""The shape of the code: lines per top-level folder and the longest functions, as JSON.

    python benchmarks/code_shape.py [--top 15]

Lines are physical lines of `.py` files (tests counted apart); a function's length is its span in the
source, decorators and docstring included. Used to compare the layout before and after a change.
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("vivaldi", "overlay", "dvms", "images", "agents", "discovery", "tests", "benchmarks")


def functions(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            end = node.end_lineno or node.lineno  # set by ast.parse; None only on hand-made nodes
            found.append((end - start + 1, f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    lines: dict[str, int] = {}
    files: dict[str, int] = {}
    longest: list[tuple[int, str]] = []
    for folder in FOLDERS:
        paths = sorted((ROOT / folder).rglob("*.py"))
        lines[folder] = sum(len(p.read_text().splitlines()) for p in paths)
        files[folder] = len(paths)
        if folder not in ("tests", "benchmarks"):
            for path in paths:
                longest.extend(functions(path))
    longest.sort(reverse=True)
    print(json.dumps({"lines": lines, "files": files,
                      "longest": [{"lines": n, "where": w} for n, w in longest[: args.top]]}, indent=1))


if __name__ == "__main__":
    main()
