"""Autocompletes shared by several cogs (a cog never imports another cog)."""

from __future__ import annotations

import discord
from discord import app_commands

from bot.context import bot_of
from bot.rendering import CHOICE_LIMIT, truncate

# Discord shows at most 25 choices.
MAX_CHOICES = 25


def name_choices(names: list[str]) -> list[app_commands.Choice[str]]:
    """Up to 25 choices offering each name as itself. A choice's value holds at most 100
    characters and Discord refuses the whole answer for one that is longer, so a longer name
    is left out (a cut one would name something else); the member can still type it."""
    fitting = [n for n in names if 1 <= len(n) <= CHOICE_LIMIT]
    return [app_commands.Choice(name=truncate(n, CHOICE_LIMIT), value=n)
            for n in fitting[:MAX_CHOICES]]


async def server_autocomplete(
    interaction: discord.Interaction, current: str
) -> list[app_commands.Choice[str]]:
    """Live servers whose name contains what was typed (used by /server, /setup, /models)."""
    names = await bot_of(interaction).services.servers.names(current)
    return name_choices(names)
