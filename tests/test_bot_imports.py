"""The bot layer's import rules, read from the source (ast), imports inside functions and
TYPE_CHECKING blocks included: only the wiring and the entry point import bot.bot, no cog
imports another cog, and no import circle among the modules of bot/ and cogs/."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WIRING = {"bot.bot", "bot.cli", "bot.__main__"}


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in ("bot", "cogs"):
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the bot/cogs modules it imports (``from a import b`` counts a.b if a
    module, else a)."""

    def resolve(name: str) -> str | None:
        parts = name.split(".")
        while parts:
            if ".".join(parts) in modules:
                return ".".join(parts)
            parts.pop()
        return None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            deps.update(t for t in map(resolve, targets) if t is not None and t != name)
        graph[name] = deps
    return graph


GRAPH = _imports(_modules())


def test_only_the_wiring_and_the_entry_point_import_bot_bot() -> None:
    offenders = sorted(m for m, deps in GRAPH.items() if "bot.bot" in deps and m not in WIRING)
    assert offenders == []


def test_no_cog_imports_another_cog() -> None:
    offenders = sorted(
        f"{m} -> {d}"
        for m, deps in GRAPH.items() if m.startswith("cogs.")
        for d in deps if d.startswith("cogs.")
    )
    assert offenders == []


def test_no_import_circle_in_bot_or_cogs() -> None:
    circles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for dep in sorted(GRAPH.get(module, ())):
            if state.get(dep) == 1:
                circles.append([*path[path.index(dep):], dep])
            elif dep not in state:
                visit(dep)
        path.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
    assert circles == []
