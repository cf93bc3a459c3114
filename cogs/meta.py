"""/about, /help and /audit: what the bot is, what it can do, what admins did."""

from __future__ import annotations

import time
from importlib.metadata import PackageNotFoundError, version

import discord
from discord import app_commands
from discord.ext import commands

from bot.checks import admin_only
from bot.context import BotContext
from bot.rendering import BRAND_COLOUR, human_duration, timestamp, truncate
from core.overview import overview


def package_version() -> str:
    try:
        return version("comfyvast")
    except PackageNotFoundError:
        return "0+unknown"


class Meta(commands.Cog):
    def __init__(self, bot: BotContext) -> None:
        self.bot = bot

    @app_commands.command(name="about", description="What this bot is, its version and load.")
    async def about(self, interaction: discord.Interaction) -> None:
        stats = await overview(self.bot.services.sessions)
        embed = discord.Embed(
            title="comfyvast",
            description="Your team's AI image studio on rented or owned GPUs.",
            colour=BRAND_COLOUR,
        )
        embed.add_field(name="Version", value=package_version())
        embed.add_field(
            name="Servers", value=f"{stats.servers_total} known, {stats.servers_running} running"
        )
        embed.add_field(
            name="Queue",
            value=f"{stats.jobs_waiting} waiting, {stats.jobs_running} running",
        )
        embed.add_field(name="Uptime", value=human_duration(time.monotonic() - self.bot.started_at))
        await interaction.response.send_message(embed=embed, ephemeral=True)

    @app_commands.command(name="help", description="List the commands you can use.")
    async def help(self, interaction: discord.Interaction) -> None:
        lines: list[str] = []
        for command in sorted(self.bot.tree.walk_commands(), key=lambda c: c.qualified_name):
            if isinstance(command, app_commands.Group):
                continue
            lines.append(f"`/{command.qualified_name}`: {command.description}")
        embed = discord.Embed(
            title="Commands", description=truncate("\n".join(lines), 4000), colour=BRAND_COLOUR
        )
        embed.set_footer(text="Admin commands need Manage Server or a configured admin role.")
        await interaction.response.send_message(embed=embed, ephemeral=True)

    @app_commands.command(name="audit", description="Recent admin actions and refusals.")
    @app_commands.describe(limit="How many entries to show (1-25).")
    @admin_only()
    async def audit(
        self, interaction: discord.Interaction, limit: app_commands.Range[int, 1, 25] = 10
    ) -> None:
        entries = await self.bot.services.audit.recent(limit)
        if not entries:
            await interaction.response.send_message("No audit entries yet.", ephemeral=True)
            return
        lines = [
            f"{timestamp(e.created_at)} <@{e.user_id}> `{e.action}` "
            f"{e.resource or ''} **{e.outcome}**"
            if e.user_id
            else f"{timestamp(e.created_at)} (bot) `{e.action}` {e.resource or ''} **{e.outcome}**"
            for e in entries
        ]
        embed = discord.Embed(
            title="Audit log", description=truncate("\n".join(lines), 4000), colour=BRAND_COLOUR
        )
        await interaction.response.send_message(embed=embed, ephemeral=True)


async def setup(bot: BotContext) -> None:
    await bot.add_cog(Meta(bot))
