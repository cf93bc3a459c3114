"""/workflow add|list|remove: custom ComfyUI workflows with named parameters (admin)."""

from __future__ import annotations

import discord
from discord import app_commands
from discord.ext import commands

from bot.checks import AdminCog, actor_of
from bot.context import BotContext
from bot.options import ServerOption, WorkflowOption
from bot.rendering import BRAND_COLOUR, truncate
from core.errors import ValidationFailed


@app_commands.default_permissions(manage_guild=True)
@app_commands.guild_only()
class Workflows(
    AdminCog,
    commands.GroupCog,
    group_name="workflow",
    group_description="Custom ComfyUI workflows.",
):
    def __init__(self, bot: BotContext) -> None:
        self.bot = bot
        super().__init__()

    @app_commands.command(name="add", description="Add a workflow saved with 'Save (API Format)'.")
    @app_commands.describe(
        name="A short name for /generate workflow:.",
        file="The workflow JSON (API format).",
        params="Mappings like prompt=6.text, seed=3.seed (default: guessed from the nodes).",
        server="Check the workflow against this server (default: any running one).",
    )
    async def add(
        self,
        interaction: discord.Interaction,
        name: app_commands.Range[str, 1, 32],
        file: discord.Attachment,
        params: app_commands.Range[str, 0, 1000] | None = None,
        server: ServerOption | None = None,
    ) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        if file.size > 512 * 1024:
            raise ValidationFailed("The workflow file is larger than 512 KB.")
        info = await self.bot.services.workflows.add(
            actor_of(interaction), name, await file.read(), params=params, server=server
        )
        mapping = ", ".join(
            f"{k}→" + "/".join(f"{n}.{i}" for n, i in v) for k, v in sorted(info.params.items())
        )
        text = f"Added workflow **{info.name}** ({info.nodes} nodes). Parameters: {mapping}."
        if info.warnings:
            text += "\nNote: " + truncate("; ".join(info.warnings), 800)
        await interaction.followup.send(text, ephemeral=True)

    @app_commands.command(name="list", description="The custom workflows.")
    async def list_workflows(self, interaction: discord.Interaction) -> None:
        items = await self.bot.services.workflows.list()
        if not items:
            await interaction.response.send_message("No custom workflows yet.", ephemeral=True)
            return
        lines = [f"**{w.name}** · {w.nodes} nodes · {', '.join(sorted(w.params))}" for w in items]
        embed = discord.Embed(
            title="Workflows", description=truncate("\n".join(lines), 4000), colour=BRAND_COLOUR
        )
        await interaction.response.send_message(embed=embed, ephemeral=True)

    @app_commands.command(name="remove", description="Remove a custom workflow.")
    @app_commands.describe(name="The workflow to remove.")
    async def remove(self, interaction: discord.Interaction, name: WorkflowOption) -> None:
        await self.bot.services.workflows.remove(actor_of(interaction), name)
        await interaction.response.send_message(f"Removed workflow **{name}**.", ephemeral=True)

    @remove.autocomplete("name")
    async def _name_autocomplete(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        names = [n for n in await self.bot.services.workflows.names() if current.lower() in n]
        return [app_commands.Choice(name=n, value=n) for n in names[:25]]


async def setup(bot: BotContext) -> None:
    await bot.add_cog(Workflows(bot))
