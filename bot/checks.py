"""Permission checks: admins are Manage Server holders or configured roles/users."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import discord
from discord import app_commands

from bot.context import bot_of
from core.audit import Actor
from core.config import Settings

__all__ = [
    "AdminCog", "NotAdmin", "actor_of", "admin_only", "bot_of", "is_admin_command",
    "is_admin_member",
]

T = TypeVar("T")


class NotAdmin(app_commands.CheckFailure):
    """Raised when a member runs an admin-only command."""

    def __str__(self) -> str:
        return (
            "This command is for admins: it needs the Manage Server permission "
            "or a configured admin role."
        )


def is_admin_member(interaction: discord.Interaction, settings: Settings) -> bool:
    user = interaction.user
    if user.id in settings.discord.admin_user_ids:
        return True
    if interaction.guild is None:
        return False
    perms = interaction.permissions
    if perms.manage_guild or perms.administrator:
        return True
    role_ids = {role.id for role in getattr(user, "roles", [])}
    if isinstance(user, discord.Member) and not role_ids:
        role_ids = set(user._roles)  # roles not cached yet: use the raw ids
    return bool(role_ids & set(settings.discord.admin_role_ids))


def actor_of(interaction: discord.Interaction) -> Actor:
    settings = bot_of(interaction).services.settings
    return Actor(
        user_id=interaction.user.id,
        guild_id=interaction.guild_id,
        channel_id=interaction.channel_id,
        is_admin=is_admin_member(interaction, settings),
    )


def admin_only() -> Callable[[T], T]:
    """Hide the command from non-admins (default_permissions) and check at run time too.

    Marks the command ``extras["admin"]`` so the tree audits every use and refusal.
    """

    async def predicate(interaction: discord.Interaction) -> bool:
        if not is_admin_member(interaction, bot_of(interaction).services.settings):
            raise NotAdmin()
        return True

    check = app_commands.check(predicate)
    perms = app_commands.default_permissions(manage_guild=True)

    def decorator(func: Any) -> Any:
        func = perms(check(func))
        if isinstance(func, app_commands.Command | app_commands.Group):
            func.extras["admin"] = True
        else:
            extras = getattr(func, "__comfyvast_extras__", {})
            extras["admin"] = True
            func.__comfyvast_extras__ = extras
        return func

    return decorator


class AdminCog:
    """Mixin for cogs whose every command is admin-only (checked and audited)."""

    admin_cog = True

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        if not is_admin_member(interaction, bot_of(interaction).services.settings):
            raise NotAdmin()
        return True


def is_admin_command(command: Any) -> bool:
    if command is None:
        return False
    if getattr(getattr(command, "binding", None), "admin_cog", False):
        return True
    node = command
    while node is not None:
        if getattr(node, "extras", {}).get("admin"):
            return True
        callback = getattr(node, "callback", None)
        if callback is not None and getattr(callback, "__comfyvast_extras__", {}).get("admin"):
            return True
        node = getattr(node, "parent", None)
    return False
