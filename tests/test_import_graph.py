"""The house rules of the package's layering, checked on the source with ``ast``.

- No import cycles, counting imports inside functions too (a lazy import is still a dependency).
- ``formats/`` (the on-disk contracts and codecs) imports nothing else of ours.
- ``convert/`` (the offline pipeline) imports ``formats/`` only; its command line, which fronts
  both halves (``verify``, ``warm``, ``cache``), may import ``cache/``.
- ``cache/`` (the run-time side) imports ``formats/``; only ``cache/store.py``, whose job is to
  call the converter, imports ``convert/``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("formats", "convert", "cache")
CLI = {"prebake.convert.cli", "prebake.convert.commands"}
CONVERTER_CALLERS = {"prebake.cache.store"}


def module_name(path: Path) -> str:
    package, stem = path.parent.name, path.stem
    return f"prebake.{package}" if stem == "__init__" else f"prebake.{package}.{stem}"


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The modules of ours that ``path`` imports anywhere in it (``from pkg import module`` included)."""
    me = module_name(path)
    package = me if path.stem == "__init__" else me.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m in modules and m != me}


def graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).glob("*.py"))]
    modules = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, modules) for p in files}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``g`` as a list of modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(g[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        state[m] = 2
        path.pop()
        return None

    for m in sorted(g):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def layer(m: str) -> str:
    return m.split(".")[1]


def test_the_graph_is_read():
    g = graph()
    assert "prebake.formats.manifest" in g["prebake.cache.load"]
    assert "prebake.convert.execute" in g["prebake.convert.bake"]  # from prebake.convert import execute


def test_no_import_cycles():
    assert find_cycle(graph()) is None, " -> ".join(find_cycle(graph()))


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_layers():
    bad = []
    for m, deps in graph().items():
        for d in deps:
            if layer(m) == "formats" and layer(d) != "formats":
                bad.append(f"{m} -> {d}: formats/ imports nothing else of ours")
            if layer(m) == "convert" and layer(d) == "cache" and m not in CLI:
                bad.append(f"{m} -> {d}: convert/ imports formats/ only (its CLI aside)")
            if layer(m) == "cache" and layer(d) == "convert" and m not in CONVERTER_CALLERS:
                bad.append(f"{m} -> {d}: only cache/store.py calls the converter")
    assert not bad, "\n".join(bad)
