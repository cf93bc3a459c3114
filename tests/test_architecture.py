"""The layering rules, read from the source with ast (nothing is imported).

cogs -> bot -> core -> core.db: ``core/`` never imports discord, bot or cogs; a cog never
imports another cog, nor the SSH or Vast.ai clients; no import circle inside ``bot/`` or
``core/`` (nor among the cogs); only the bot's wiring and entry point import ``bot.bot``; only
``core/generation/store.py`` writes generation rows; modules and classes stay small.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bot", "cogs", "core")
# Generated migration scripts are data, not product modules.
EXCLUDED = ("core/db/migrations/",)
MAX_MODULE_LINES = 460
MAX_CLASS_LINES = 310


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    tree: ast.Module

    @property
    def rel(self) -> str:
        return self.path.relative_to(ROOT).as_posix()


def _modules() -> dict[str, Module]:
    found: dict[str, Module] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith(EXCLUDED):
                continue
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join(parts)
            found[name] = Module(name, path, ast.parse(path.read_text(), filename=rel))
    return found


MODULES = _modules()


def _imports(module: Module) -> Iterator[str]:
    """Every module ``module`` imports, anywhere in its body (functions included)."""
    is_package = module.path.name == "__init__.py"
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.name.split(".")
                drop = node.level - 1 if is_package else node.level
                base = base[: len(base) - drop] if drop else base
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # ``from pkg import sub`` imports the submodule when there is one.
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
            yield from subs
            if len(subs) < len(node.names):
                yield target


def _graph() -> dict[str, set[str]]:
    return {
        name: {dep for dep in _imports(mod) if dep in MODULES and dep != name}
        for name, mod in MODULES.items()
    }


def _top(name: str) -> str:
    return name.split(".")[0]


def test_the_scan_sees_the_product() -> None:
    # Guards the other tests against passing on an empty or wrong tree.
    assert {"bot.bot", "core.errors", "core.db.models"} <= MODULES.keys()
    assert any(name.startswith("cogs.") for name in MODULES)
    assert sum(len(deps) for deps in _graph().values()) > 100


def test_core_imports_neither_discord_nor_bot_nor_cogs() -> None:
    bad = [
        f"{mod.rel} imports {dep}"
        for mod in MODULES.values() if _top(mod.name) == "core"
        for dep in _imports(mod) if _top(dep) in ("discord", "bot", "cogs")
    ]
    assert bad == []


FORBIDDEN_IN_COGS = ("core.ssh", "core.vast")


def test_cogs_import_no_cog_and_no_transport_client() -> None:
    bad = []
    for mod in MODULES.values():
        if _top(mod.name) != "cogs" or mod.name == "cogs":
            continue
        for dep in _imports(mod):
            if dep.startswith("cogs.") and dep != mod.name:
                bad.append(f"{mod.rel} imports the cog {dep}")
            if any(dep == f or dep.startswith(f + ".") for f in FORBIDDEN_IN_COGS):
                bad.append(f"{mod.rel} imports {dep}")
    assert bad == []


def test_only_the_wiring_and_entry_point_import_bot_bot() -> None:
    allowed = {"bot.bot", "bot.cli", "bot.__main__"}
    bad = [
        mod.rel for mod in MODULES.values()
        if mod.name not in allowed and "bot.bot" in _imports(mod)
    ]
    assert bad == []


def _cycle_from(graph: dict[str, set[str]], start: str, scope: str) -> list[str] | None:
    """A path start -> ... -> start inside ``scope``, if there is one (iterative DFS)."""
    stack: list[tuple[str, list[str]]] = [(start, [start])]
    seen: set[str] = set()
    while stack:
        node, path = stack.pop()
        for dep in sorted(graph[node]):
            if _top(dep) != scope:
                continue
            if dep == start:
                return [*path, start]
            if dep not in seen:
                seen.add(dep)
                stack.append((dep, [*path, dep]))
    return None


@pytest.mark.parametrize("scope", ["bot", "cogs", "core"])
def test_no_import_circle(scope: str) -> None:
    graph = _graph()
    cycles = {
        " -> ".join(cycle)
        for name in graph if _top(name) == scope
        if (cycle := _cycle_from(graph, name, scope)) is not None
    }
    assert sorted(cycles) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"core.a": {"core.b"}, "core.b": {"core.c"}, "core.c": {"core.a"}, "core.d": set()}
    assert _cycle_from(graph, "core.a", "core") == ["core.a", "core.b", "core.c", "core.a"]
    assert _cycle_from(graph, "core.d", "core") is None


GENERATION_STORE = "core.generation.store"
ROW_CLASS = "ComfyGeneration"


def _row_writes(mod: Module) -> Iterator[str]:
    """Places that write generation rows, or load whole ones (a loaded row could be
    changed and flushed): insert/update/delete on the table, constructing a row,
    ``session.get(ComfyGeneration, ...)`` or ``select(ComfyGeneration)``."""
    for node in ast.walk(mod.tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        fname = func.id if isinstance(func, ast.Name) else (
            func.attr if isinstance(func, ast.Attribute) else "")
        first = node.args[0] if node.args else None
        on_rows = isinstance(first, ast.Name) and first.id == ROW_CLASS
        if fname == ROW_CLASS:
            yield f"{mod.rel}:{node.lineno} constructs a row"
        elif fname in ("update", "insert", "delete") and on_rows:
            yield f"{mod.rel}:{node.lineno} {fname}({ROW_CLASS})"
        elif fname in ("get", "select") and on_rows:
            yield f"{mod.rel}:{node.lineno} loads whole rows"


def test_only_the_store_writes_generation_rows() -> None:
    writers = [
        where for mod in MODULES.values()
        if mod.name not in (GENERATION_STORE, "core.db.models")
        for where in _row_writes(mod)
    ]
    assert writers == []
    # The store itself must be where the writes are, or this test checks nothing.
    assert list(_row_writes(MODULES[GENERATION_STORE]))


def test_no_module_is_too_long() -> None:
    long = {
        mod.rel: n for mod in MODULES.values()
        if (n := len(mod.path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}


def test_no_class_is_too_long() -> None:
    long = {
        f"{mod.rel}:{node.name}": node.end_lineno - node.lineno + 1
        for mod in MODULES.values()
        for node in ast.walk(mod.tree)
        if isinstance(node, ast.ClassDef) and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES
    }
    assert long == {}
