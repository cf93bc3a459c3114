"""Checks over the whole command surface and the layering."""

from __future__ import annotations

import ast
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from discord import AppCommandOptionType, app_commands

from bot.bot import EXTENSIONS, ComfyVastBot
from core.services import Services

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def tree(services: Services) -> AsyncIterator[app_commands.CommandTree]:
    bot = ComfyVastBot(services)
    for ext in EXTENSIONS:
        await bot.load_extension(ext)
    yield bot.tree
    await bot.close()


def leaves(tree: app_commands.CommandTree) -> list[Any]:
    return [c for c in tree.walk_commands() if isinstance(c, app_commands.Command)]


async def test_every_command_and_option_is_described(tree: app_commands.CommandTree) -> None:
    commands = leaves(tree)
    assert len(commands) >= 20
    for command in commands:
        assert command.description and command.description != "…", command.qualified_name
        for param in command.parameters:
            assert param.description and param.description != "…", (
                f"/{command.qualified_name} option {param.name} has no description"
            )


async def test_command_names_are_unique(tree: app_commands.CommandTree) -> None:
    names = [c.qualified_name for c in tree.walk_commands()]
    assert len(names) == len(set(names))
    top = [c.name for c in tree.get_commands()]
    assert len(top) == len(set(top))


async def test_admin_groups_are_hidden_by_default(tree: app_commands.CommandTree) -> None:
    for name in ("server", "workflow"):
        group = tree.get_command(name)
        assert group is not None and group.default_permissions is not None
        assert group.default_permissions.manage_guild


def test_core_never_imports_discord() -> None:
    offenders = []
    for path in (ROOT / "core").rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n == "discord" or n.startswith(("discord.", "bot", "cogs")) for n in names):
                offenders.append(f"{path.relative_to(ROOT)}: {names}")
    assert offenders == []


def test_no_host_key_checking_is_ever_disabled() -> None:
    for folder in ("core", "bot", "cogs"):
        for path in (ROOT / folder).rglob("*.py"):
            assert "known_hosts=None" not in path.read_text(), path


async def test_every_string_option_has_a_max_length(tree: app_commands.CommandTree) -> None:
    """A value Discord lets through unbounded can come back inside an error reply and
    push it past 2000 characters (Discord then drops the reply). Options with choices are
    bounded by their choices. (discord.py keeps a string's max_length in max_value.)"""
    unbounded = [
        f"/{command.qualified_name} {param.name}"
        for command in leaves(tree)
        for param in command.parameters
        if param.type is AppCommandOptionType.string
        and not param.choices
        and param.max_value is None
    ]
    assert unbounded == []


async def test_every_integer_option_has_a_max_value(tree: app_commands.CommandTree) -> None:
    """Ids go to 32-bit columns; a larger number must be refused by Discord, not by the
    database with a traceback."""
    unbounded = [
        f"/{command.qualified_name} {param.name}"
        for command in leaves(tree)
        for param in command.parameters
        if param.type is AppCommandOptionType.integer
        and not param.choices
        and param.max_value is None
    ]
    assert unbounded == []
