"""The packages of autoshard import one way: each only from itself and the packages left of it.

    schema  configs  ops  graph  cost  choose  execute  distributed  serve  api  scale  cli  testing

Every import counts, those inside functions too; the package root (`autoshard/__init__.py`,
`__main__.py`) may import anything. Also held here: no module over 400 lines, and no class swap
(`__class__ =`) or patch of another module's globals (`setattr(<module>, ...)`) in product code.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "autoshard"
ORDER = ["schema", "configs", "ops", "graph", "cost", "choose", "execute", "distributed", "serve", "api", "scale", "cli", "testing"]
MAX_LINES = 400


def _modules():
    return sorted(p for p in ROOT.rglob("*.py"))


def _package(path: pathlib.Path) -> str | None:
    rel = path.relative_to(ROOT).parts
    if len(rel) == 1:
        return None if rel[0] in ("__init__.py", "__main__.py") else rel[0][:-3]
    return rel[0]


def _imported(tree: ast.AST) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("autoshard"):
            names = [node.module] if node.module != "autoshard" else [f"autoshard.{a.name}" for a in node.names]
            out += [(node.lineno, n) for n in names]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("autoshard.")]
    return out


def test_every_package_is_in_the_order():
    found = {_package(p) for p in _modules()} - {None}
    assert found <= set(ORDER), f"packages not in the import order: {sorted(found - set(ORDER))}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_go_one_way(path):
    mine = _package(path)
    if mine is None:
        return
    bad = []
    for line, name in _imported(ast.parse(path.read_text())):
        parts = name.split(".")
        if len(parts) < 2:
            continue
        theirs = parts[1]
        if theirs in ORDER and ORDER.index(theirs) > ORDER.index(mine):
            bad.append(f"line {line}: {name} ({theirs} is right of {mine})")
    assert not bad, f"{path.relative_to(ROOT)} imports up: " + "; ".join(bad)


def test_the_checker_sees_an_upward_import(tmp_path):
    # the walk must find imports inside functions, where the lazy upward ones hide
    tree = ast.parse("def f():\n    from autoshard.api import plan\n")
    assert _imported(tree) == [(2, "autoshard.api")]


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_are_small(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines (at most {MAX_LINES})"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_class_swaps_or_module_patches(path):
    tree = ast.parse(path.read_text())
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Attribute) and t.attr == "__class__":
                    bad.append(f"line {node.lineno}: assigns __class__")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr":
            target = node.args[0] if node.args else None
            if isinstance(target, ast.Name) and target.id in {"api", "module", "mod"}:
                bad.append(f"line {node.lineno}: setattr on a module")
    assert not bad, f"{path.relative_to(ROOT)}: " + "; ".join(bad)
