"""/setup: install, repair and reset ComfyUI on a server over SSH (admin only).

A run's progress lives in a channel message the bot owns (interaction tokens expire after
15 minutes; an installation can take longer). The message is edited through the relay,
so edits are coalesced, and its final state carries the full log as a file.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import discord
from discord import app_commands
from discord.ext import commands

from bot.autocomplete import server_autocomplete
from bot.checks import AdminCog, actor_of
from bot.confirm import confirm
from bot.context import BotContext, bot_of
from bot.options import ProfileOption, ServerOption
from bot.relay import MessageRelay
from bot.rendering import (
    BRAND_COLOUR,
    ERROR_COLOUR,
    OK_COLOUR,
    human_duration,
    status_post_refused,
    truncate,
)
from core.errors import ComfyVastError, ValidationFailed
from core.setup import ExecutionView, SetupObserver, SetupService

log = logging.getLogger(__name__)

# Discord's default upload limit; the guild's own limit is used when it is known.
DEFAULT_UPLOAD_LIMIT = 10 * 1024 * 1024
ICONS = {"done": "✅", "skipped": "⏭️", "failed": "❌", "running": "▶️", "waiting": "▫️"}


# --------------------------------------------------------------------------- rendering


def _code(text: str, limit: int) -> str:
    # A fence inside the output would end the code block early.
    body = text.replace("```", "`\u200b``").strip() or "(no output yet)"
    return "```\n" + truncate(body[-(limit - 8):], limit - 8) + "\n```"


def _steps_text(view: ExecutionView) -> str:
    outcomes = {o.index: o for o in view.outcomes}
    names = view.step_names or tuple(o.name for o in view.outcomes)
    lines = []
    for index, name in enumerate(names, start=1):
        outcome = outcomes.get(index)
        if outcome is not None and outcome.outcome == "skipped":
            lines.append(f"{ICONS['skipped']} {index}. {name} · already done")
        elif outcome is not None:
            took = f" · {human_duration(outcome.seconds)}" if outcome.seconds is not None else ""
            verb = "failed" if outcome.outcome == "failed" else "done"
            lines.append(f"{ICONS[outcome.outcome]} {index}. {name} · {verb}{took}")
        elif not view.finished and index == view.current_step:
            lines.append(f"{ICONS['running']} {index}. **{name}** · running")
        else:
            lines.append(f"{ICONS['waiting']} {index}. {name}")
    return truncate("\n".join(lines), 3000) or "(no steps)"


def setup_embed(view: ExecutionView) -> discord.Embed:
    """The status of one run: step i/n with names, elapsed time, the last output lines."""
    step = f"step {view.current_step}/{view.total_steps}"
    if view.succeeded:
        title, colour = f"ComfyUI is ready on {view.server_name}", OK_COLOUR
    elif view.finished:
        where = f" at {step}" if view.current_step else ""
        title, colour = f"Setup failed on {view.server_name}{where}", ERROR_COLOUR
    elif view.status == "pending":
        title, colour = f"Setup of {view.server_name} is starting", BRAND_COLOUR
    else:
        title, colour = f"Setting up {view.server_name}: {step}", BRAND_COLOUR
    embed = discord.Embed(title=truncate(title, 256), description=_steps_text(view),
                          colour=colour)
    if view.succeeded:
        ran, skipped = len(view.ran()), len(view.skipped())
        embed.add_field(name="Result", inline=False,
                        value=f"{ran} step(s) ran, {skipped} were already done. "
                              "The full log is attached.")
    elif view.finished:
        embed.add_field(name="Error", value=_code(view.error or "unknown error", 1024),
                        inline=False)
        embed.add_field(name="Next", inline=False,
                        value=f"Fix the cause and run `/setup run {view.server_name}` again: "
                              "it resumes at the failed step. The full log is attached.")
    else:
        embed.add_field(name="Output", value=_code(view.output_tail, 1024), inline=False)
    profile = f"{view.profile} v{view.profile_version}" if view.profile else "unknown profile"
    embed.set_footer(text=f"Setup #{view.id} · profile {profile} · "
                          f"{human_duration(view.elapsed())} elapsed")
    return embed


def log_file(view: ExecutionView, text: str, limit: int = DEFAULT_UPLOAD_LIMIT) -> discord.File:
    """The full log as a file that fits ``limit`` (the end is kept: failures are there)."""
    data = text.encode("utf-8", "replace")
    room = max(limit - 64 * 1024, 1024)
    if len(data) > room:
        data = b"[the beginning of the log was cut to fit the upload limit]\n" + data[-room:]
    return discord.File(io.BytesIO(data), filename=f"setup-{view.id}.log")


class DiscordSetupObserver(SetupObserver):
    """Renders a service's runs into their status messages through the relay."""

    def __init__(self, bot: BotContext, service: SetupService) -> None:
        self.bot = bot
        self.service = service

    @property
    def relay(self) -> MessageRelay:
        # Looked up when used: the relay is made in setup_hook, cogs may load without it.
        return self.bot.relay  # type: ignore[no-any-return]

    def on_update(self, execution_id: int) -> None:
        view = self.service.snapshot(execution_id)
        if view is None or view.channel_id is None or view.message_id is None:
            return
        self.relay.update(view.channel_id, view.message_id,
                          lambda: self._render(execution_id))

    async def _render(self, execution_id: int) -> dict[str, Any]:
        # Built when the edit is really sent, so it is always the newest state.
        view = self.service.snapshot(execution_id) or await self.service.get(execution_id)
        return {"embed": setup_embed(view)}

    async def on_finished(self, view: ExecutionView, log_text: str) -> None:
        if view.channel_id is None or view.message_id is None:
            return
        limit = self._upload_limit(view.channel_id)

        async def final() -> dict[str, Any]:
            return {"embed": setup_embed(view), "attachments": [log_file(view, log_text, limit)]}

        await self.relay.finish(view.channel_id, view.message_id, final)

    def _upload_limit(self, channel_id: int) -> int:
        channel = self.bot.get_channel(channel_id)
        guild = getattr(channel, "guild", None)
        return guild.filesize_limit if guild is not None else DEFAULT_UPLOAD_LIMIT


# --------------------------------------------------------------------------- autocomplete


def _service(interaction: discord.Interaction) -> SetupService:
    return bot_of(interaction).services.setup


async def profile_autocomplete(
    interaction: discord.Interaction, current: str
) -> list[app_commands.Choice[str]]:
    profiles = await _service(interaction).profiles()
    return [
        app_commands.Choice(name=truncate(f"{p.name}: {p.description}", 100), value=p.name)
        for p in profiles if current.lower() in p.name
    ][:25]


async def execution_autocomplete(
    interaction: discord.Interaction, current: str
) -> list[app_commands.Choice[int]]:
    runs = await _service(interaction).recent(limit=25)
    choices = []
    for run in runs:
        label = f"#{run.id} {run.server_name} · {run.profile or '?'} · {run.status}"
        if current.strip().lstrip("#") in label:
            choices.append(app_commands.Choice(name=truncate(label, 100), value=run.id))
    return choices


# --------------------------------------------------------------------------- the cog


@app_commands.default_permissions(manage_guild=True)
@app_commands.guild_only()
class Setup(AdminCog, commands.GroupCog, group_name="setup",
            group_description="Install, repair and reset ComfyUI on a server over SSH."):
    # Seconds an admin has to confirm /setup reset (tests shorten it).
    confirm_timeout = 60.0

    def __init__(self, bot: BotContext) -> None:
        self.bot = bot
        super().__init__()

    @property
    def service(self) -> SetupService:
        return self.bot.services.setup

    def attach(self, service: SetupService) -> None:
        """Render ``service``'s runs into their status messages."""
        service.observer = DiscordSetupObserver(self.bot, service)

    async def cog_load(self) -> None:
        self.attach(self.service)
        # Store the profiles and fail the runs a previous process left running.
        await self.service.startup()

    async def cog_unload(self) -> None:
        await self.service.close()

    @app_commands.command(name="run", description="Install or repair ComfyUI on a server, "
                                                   "step by step, with live progress.")
    @app_commands.describe(server="The server (it needs SSH access).",
                           profile="The setup profile (default: the server image's).")
    @app_commands.autocomplete(server=server_autocomplete, profile=profile_autocomplete)
    async def run(self, interaction: discord.Interaction, server: ServerOption,
                  profile: ProfileOption | None = None) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        channel = interaction.channel
        if channel is None or not hasattr(channel, "send"):
            raise ValidationFailed("Setup can only be started in a text channel.")
        service = self.service
        view = await service.begin(actor_of(interaction), server, profile,
                                   channel_id=channel.id)
        try:
            message = await channel.send(  # type: ignore[union-attr]
                embed=setup_embed(view), allowed_mentions=discord.AllowedMentions.none())
        except discord.HTTPException as exc:
            await service.abandon(view.id, "The status message could not be posted.")
            raise ComfyVastError(status_post_refused(exc)) from exc
        await service.attach_message(view.id, message.channel.id, message.id)
        service.start(view.id)
        await interaction.followup.send(
            f"Setup #{view.id} of **{view.server_name}** started with profile "
            f"{view.profile}: {message.jump_url}", ephemeral=True)

    @app_commands.command(name="status", description="The latest setup run on a server.")
    @app_commands.describe(server="The server.")
    @app_commands.autocomplete(server=server_autocomplete)
    async def status(self, interaction: discord.Interaction, server: ServerOption) -> None:
        view = await self.service.latest(server)
        if view is None:
            await interaction.response.send_message(
                f"No setup has run on {server} yet; start one with /setup run.",
                ephemeral=True)
            return
        await interaction.response.send_message(embed=setup_embed(view), ephemeral=True)

    @app_commands.command(name="logs", description="The full log of a setup run, as a file.")
    @app_commands.describe(execution="The run's number (shown as #N by /setup status).")
    @app_commands.autocomplete(execution=execution_autocomplete)
    async def logs(self, interaction: discord.Interaction,
                   execution: app_commands.Range[int, 1, 2**31 - 1]) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        view = await self.service.get(execution)
        text = await self.service.log(execution)
        limit = interaction.guild.filesize_limit if interaction.guild else DEFAULT_UPLOAD_LIMIT
        await interaction.followup.send(
            f"Log of setup #{view.id} on **{view.server_name}** ({view.status}).",
            file=log_file(view, text, limit), ephemeral=True)

    @app_commands.command(name="reset", description="Remove the installation so the next "
                                                     "setup starts clean (asks first).")
    @app_commands.describe(server="The server.",
                           profile="The profile whose installation to remove "
                                   "(default: the one it was set up with).")
    @app_commands.autocomplete(server=server_autocomplete, profile=profile_autocomplete)
    async def reset(self, interaction: discord.Interaction, server: ServerOption,
                    profile: ProfileOption | None = None) -> None:
        plan = await self.service.reset_plan(server, profile)
        question = (f"Reset **{plan.server}** with profile {plan.profile}? This "
                    f"{plan.summary}. The next /setup run starts from scratch.")
        if not await confirm(interaction, question, confirm_label="Reset", danger=True,
                             timeout=self.confirm_timeout):
            await interaction.followup.send("Nothing was reset.", ephemeral=True)
            return
        result = await self.service.reset(actor_of(interaction), plan.server, plan.profile)
        await interaction.followup.send(
            f"Reset **{result.server}**: it {result.summary}. Run /setup run to install "
            "again.", ephemeral=True)


async def setup(bot: BotContext) -> None:
    await bot.add_cog(Setup(bot))
