"""The Discord side of server life: idle warnings with a Keep-alive button, and notices.

The loop that reconciles with Vast.ai and stops idle servers is
``core.servers.service.ServerService.maintain``."""

from __future__ import annotations

import logging
import re
from typing import Any

import discord
from discord import ui

from bot.checks import actor_of, is_admin_member
from bot.context import BotContext, bot_of
from bot.tree import send_ephemeral
from core.errors import ComfyVastError
from core.servers import ServerView
from core.servers.context import ServerEvents
from core.servers.pending import MessageRef

log = logging.getLogger(__name__)


class KeepAliveButton(ui.DynamicItem[ui.Button[Any]], template=r"cv:keepalive:(?P<server>[0-9]+)"):
    """Resets a server's idle timer; persistent, so it works after a restart."""

    def __init__(self, server_id: int) -> None:
        super().__init__(
            ui.Button(
                label="Keep alive",
                style=discord.ButtonStyle.primary,
                emoji="⏰",
                custom_id=f"cv:keepalive:{server_id}",
            )
        )
        self.server_id = server_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: ui.Button[Any], match: re.Match[str]
    ) -> KeepAliveButton:
        return cls(int(match["server"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        bot = bot_of(interaction)
        if not is_admin_member(interaction, bot.services.settings):
            await send_ephemeral(
                interaction, "Only admins can keep a server running: it costs money."
            )
            return
        try:
            server = await bot.services.server_ops.keep_alive(actor_of(interaction), self.server_id)
        except ComfyVastError as exc:
            await send_ephemeral(interaction, str(exc))
            return
        await interaction.response.edit_message(
            content=f"Server **{server.name}** will stay up: its idle timer was reset by "
            f"{interaction.user.mention}.",
            view=None,
            allowed_mentions=discord.AllowedMentions.none(),
        )


class DiscordServerEvents(ServerEvents):
    def __init__(self, bot: BotContext) -> None:
        self.bot = bot

    async def idle_warning(self, server: ServerView, channel_id: int, minutes_left: int) -> None:
        view = ui.View(timeout=None)
        view.add_item(KeepAliveButton(server.id))
        channel = self.bot.get_partial_messageable(channel_id)
        action = self.bot.services.settings.costs.idle_action
        verb = "destroyed" if action == "destroy" else "stopped"
        try:
            await channel.send(
                f"Server **{server.name}** has been idle and will be {verb}"
                f" in about {minutes_left} minute(s) to save money.",
                view=view,
            )
        except discord.HTTPException as exc:
            log.warning("could not post the idle warning for %s: %s", server.name, exc)

    async def notice(self, channel_id: int, text: str) -> None:
        try:
            await self.bot.get_partial_messageable(channel_id).send(
                text, allowed_mentions=discord.AllowedMentions.none()
            )
        except discord.HTTPException as exc:
            log.warning("could not post a server notice: %s", exc)


    async def operation_done(self, message: MessageRef, text: str) -> None:
        """Finish the progress message of an operation that outlived its task (a restart,
        a start still waiting for its GPU); a channel notice when there was no message."""
        if message.message_id is None:
            await self.notice(message.channel_id, text)
            return
        content = f"{message.header}\n{text}" if message.header else text

        async def payload() -> dict[str, object]:
            return {"content": content[:2000]}

        try:
            await self.bot.relay.finish(message.channel_id, message.message_id, payload)
        except discord.HTTPException as exc:
            log.warning("could not update the server message: %s", exc)
