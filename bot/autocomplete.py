"""Autocompletes shared by several cogs (a cog never imports another cog)."""

from __future__ import annotations

import discord
from discord import app_commands

from bot.context import bot_of

# Discord shows at most 25 choices.
MAX_CHOICES = 25


async def server_autocomplete(
    interaction: discord.Interaction, current: str
) -> list[app_commands.Choice[str]]:
    """Live servers whose name contains what was typed (used by /server, /setup, /models)."""
    names = await bot_of(interaction).services.servers.names(current)
    return [app_commands.Choice(name=n, value=n) for n in names[:MAX_CHOICES]]
