"""Test-only fake Discord (REST API v10 + Gateway) for end-to-end tests of the bot.

Usage::

    from tests.fakediscord import FakeDiscord, running_bot
"""

from .botrunner import BotHandle, connect_bot, running_bot
from .models import (
    ADMINISTRATOR,
    ALL_PERMISSIONS,
    BOT_PERMISSIONS,
    DEFAULT_MEMBER_PERMISSIONS,
    FLAG_EPHEMERAL,
    FLAG_LOADING,
    MANAGE_GUILD,
    Attachment,
    Channel,
    Guild,
    Interaction,
    Message,
    Recorded,
    Role,
    User,
)
from .ratelimit import RateLimits
from .server import ApiError, FakeDiscord

__all__ = [
    "ADMINISTRATOR",
    "ALL_PERMISSIONS",
    "BOT_PERMISSIONS",
    "DEFAULT_MEMBER_PERMISSIONS",
    "FLAG_EPHEMERAL",
    "FLAG_LOADING",
    "MANAGE_GUILD",
    "ApiError",
    "Attachment",
    "BotHandle",
    "Channel",
    "FakeDiscord",
    "Guild",
    "Interaction",
    "Message",
    "RateLimits",
    "Recorded",
    "Role",
    "User",
    "connect_bot",
    "running_bot",
]

