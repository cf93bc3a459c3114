"""The command tree: one place that turns errors into one ephemeral sentence."""

from __future__ import annotations

import logging

import discord
from discord import app_commands

from bot.checks import NotAdmin, actor_of, is_admin_command
from bot.context import bot_of
from bot.rendering import echo, fit_content
from core.audit import OUTCOME_ERROR, OUTCOME_REFUSED
from core.errors import GENERIC_FAILURE, ComfyVastError, PermissionDenied

log = logging.getLogger(__name__)


def describe_error(error: Exception) -> tuple[str, bool]:
    """The sentence to show, and whether the error is expected (no traceback needed)."""
    if isinstance(error, app_commands.CommandInvokeError):
        error = error.original
    if isinstance(error, ComfyVastError):
        return str(error), True
    if isinstance(error, NotAdmin):
        return str(error), True
    if isinstance(error, app_commands.CommandOnCooldown):
        return f"Slow down: try again in {error.retry_after:.0f} s.", True
    if isinstance(error, app_commands.NoPrivateMessage):
        return "This command only works in a server channel.", True
    if isinstance(error, app_commands.MissingPermissions | app_commands.BotMissingPermissions):
        return str(error), True
    if isinstance(error, app_commands.TransformerError):
        return f"'{echo(error.value)}' is not a valid value for this option.", True
    if isinstance(error, app_commands.CheckFailure):
        return "You can't use this command here.", True
    return GENERIC_FAILURE, False


# Interaction.extras keys: the interaction was acknowledged with a public "thinking..."
# reply (defer_public) that has not become a status message yet; the reply's message id.
_PUBLIC_PENDING = "comfyvast.public_reply_pending"
_REPLY_ID = "comfyvast.public_reply_id"


async def defer_public(interaction: discord.Interaction) -> None:
    """Acknowledge with a public "thinking..." reply, to become a job's status message.

    Discord creates the reply with the acknowledgement (no channel message budget spent)
    and the interaction's webhook edits it. Should the command fail before it shows a
    status, send_ephemeral removes the reply so that the error stays private.
    """
    interaction.extras[_PUBLIC_PENDING] = True
    response = await interaction.response.defer(thinking=True)
    # The callback's answer names the reply it created (``response_message_id``, with the
    # message as ``resource.message`` for type 5; /work/shared/reference/discord.md):
    # a job can be recorded with its status message known.
    if response is not None and response.message_id is not None:
        interaction.extras[_REPLY_ID] = response.message_id


def public_reply_id(interaction: discord.Interaction) -> int | None:
    """The id of the reply defer_public created, if Discord named it."""
    reply_id = interaction.extras.get(_REPLY_ID)
    return reply_id if isinstance(reply_id, int) else None


def public_reply_shown(interaction: discord.Interaction) -> None:
    """The public reply now shows something the channel should see: it stays."""
    interaction.extras.pop(_PUBLIC_PENDING, None)


async def send_ephemeral(interaction: discord.Interaction, content: str) -> None:
    """Reply privately whether or not the interaction was already acknowledged.

    The text is clipped to Discord's 2000 characters: an error sentence may quote what a
    member typed, and a refused reply would leave them on "thinking..." for ever.
    """
    content = fit_content(content) or "-"
    if interaction.extras.pop(_PUBLIC_PENDING, False):
        # The first followup after a "thinking" reply would replace it and be as public
        # as it: delete the reply, so the followup is a new, private message.
        try:
            await interaction.delete_original_response()
        except discord.HTTPException as exc:
            log.warning("could not remove the reply of interaction %s (%s)",
                        interaction.id, exc)
    for attempt in (content, GENERIC_FAILURE):
        try:
            if interaction.response.is_done():
                await interaction.followup.send(attempt, ephemeral=True)
            else:
                await interaction.response.send_message(attempt, ephemeral=True)
            return
        except discord.HTTPException as exc:
            # The token may have expired (15 min) or the interaction timed out (3 s): no
            # second try. A refused message (400) gets the plain sentence instead, so the
            # member is never left on "thinking...".
            log.warning("could not deliver an error message for interaction %s (%s)",
                        interaction.id, exc)
            if exc.status != 400 or attempt == GENERIC_FAILURE:
                return


class ComfyVastTree(app_commands.CommandTree):
    async def on_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        message, expected = describe_error(error)
        command = interaction.command
        name = command.qualified_name if command else "unknown"
        if not expected:
            log.error("command %s failed", name, exc_info=error)
        if is_admin_command(command) or isinstance(error, NotAdmin):
            original = getattr(error, "original", error)
            refused = isinstance(error, NotAdmin) or isinstance(original, PermissionDenied)
            await bot_of(interaction).services.audit.record(
                actor_of(interaction),
                name,
                outcome=OUTCOME_REFUSED if refused else OUTCOME_ERROR,
                details={"error": message, "options": _options(interaction)},
            )
        await send_ephemeral(interaction, message)


def _options(interaction: discord.Interaction) -> dict[str, object]:
    """The options as given, flattened; values only of simple types (no attachments)."""
    out: dict[str, object] = {}

    def walk(options: list[dict[str, object]]) -> None:
        for opt in options:
            nested = opt.get("options")
            if isinstance(nested, list):
                walk(nested)  # type: ignore[arg-type]
            elif isinstance(opt.get("value"), str | int | float | bool):
                out[str(opt["name"])] = opt["value"]

    data = interaction.data or {}
    walk(list(data.get("options", [])))  # type: ignore[arg-type]
    return out
