"""What bot modules and cogs need from the bot: the :class:`BotContext` protocol.

Every module in ``bot/`` and ``cogs/`` types against this protocol instead of the concrete
``bot.bot.ComfyVastBot``, so only the wiring (``bot/bot.py``) and the entry point
(``bot/cli.py``) import the bot class, and the bot modules that the wiring loads do not
import it back (no import circle).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Protocol

import discord
from discord import app_commands
from discord.ext import commands

from bot.relay import MessageRelay
from core.services import Services


class BotContext(Protocol):
    """The running bot as the rest of the bot sees it.

    Resources: the services, the edit relay, the start time, and ``spawn`` for background
    work that outlives an interaction; plus the few discord.py client methods in use.
    """

    services: Services
    relay: MessageRelay
    started_at: float  # time.monotonic() when the bot was built (for uptime)

    @property
    def user(self) -> discord.ClientUser | None: ...

    @property
    def tree(self) -> app_commands.CommandTree[Any]: ...

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task[Any]:
        """Run a background task that is tracked, logged when it crashes, cancelled on close."""
        ...

    def get_partial_messageable(self, id: int, /) -> discord.PartialMessageable: ...

    def get_channel(self, id: int, /) -> Any: ...

    def get_guild(self, id: int, /) -> discord.Guild | None: ...

    async def wait_until_ready(self) -> None: ...

    async def add_cog(self, cog: commands.Cog, /) -> None: ...


def bot_of(interaction: discord.Interaction) -> BotContext:
    """The bot that received ``interaction``."""
    return interaction.client  # type: ignore[return-value]
