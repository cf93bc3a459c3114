"""/pool: server pools made from one template, scaled by the autoscaler (admin only)."""

from __future__ import annotations

import math
from typing import Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot.autocomplete import server_autocomplete
from bot.checks import AdminCog, actor_of
from bot.confirm import confirm
from bot.context import BotContext, bot_of
from bot.options import GpuOption, ProfileOption, ServerOption
from bot.rendering import BRAND_COLOUR, truncate
from core.pools import PoolService, PoolStatus, PoolView, Template, parse_models

Setting = Literal["min", "max", "target_wait", "idle_timeout", "cooldown", "max_price", "disk"]
PoolName = app_commands.Range[str, 1, 24]


def pool_line(pool: PoolView) -> str:
    price = f" ≤ ${pool.max_price:.2f}/h" if pool.max_price is not None else ""
    return (f"**{pool.name}**: {pool.gpu}{price}, {pool.min_servers}–{pool.max_servers} "
            f"servers, target wait {pool.target_wait} s, idle stop {pool.idle_timeout} min, "
            f"cool-down {pool.cooldown} s")


def status_embed(status: PoolStatus) -> discord.Embed:
    pool = status.pool
    wait = "∞ (no server ready)" if math.isinf(status.expected_wait) else (
        f"{status.expected_wait:.0f} s")
    embed = discord.Embed(title=f"Pool {pool.name}", colour=BRAND_COLOUR,
                          description=pool_line(pool))
    template = [f"image: {pool.image or 'default'}", f"disk: {pool.disk_gb or 'default'} GB",
                f"profile: {pool.profile or 'none'}", f"models: {len(pool.models)}"]
    embed.add_field(name="Template", value=", ".join(template), inline=False)
    servers = "\n".join(
        f"{s.name}: {s.status}, ${s.price_per_hour:.3f}/h" for s in status.servers
    ) or "none"
    embed.add_field(name="Servers", value=truncate(servers, 1000), inline=False)
    embed.add_field(name="Queue", value=f"{status.queued} jobs, ~{status.job_seconds:.0f} s "
                    f"each, expected wait {wait}", inline=False)
    if status.decisions:
        lines = "\n".join(f"#{d.id} {d.action} {d.server_name or ''}: {d.state} ({d.reason})"
                          for d in status.decisions)
        embed.add_field(name="Latest decisions", value=truncate(lines, 1000), inline=False)
    return embed


async def pool_autocomplete(
    interaction: discord.Interaction, current: str
) -> list[app_commands.Choice[str]]:
    pools = await bot_of(interaction).services.pools.store.pools()
    return [app_commands.Choice(name=p.name, value=p.name)
            for p in pools if current.lower() in p.name][:25]


@app_commands.default_permissions(manage_guild=True)
@app_commands.guild_only()
class Pools(AdminCog, commands.GroupCog, group_name="pool",
            group_description="Server pools: a template, limits, and demand-based scaling."):
    confirm_timeout = 60.0

    def __init__(self, bot: BotContext) -> None:
        self.bot = bot
        super().__init__()

    @property
    def service(self) -> PoolService:
        return self.bot.services.pools

    @app_commands.command(name="create", description="Save how to make a pool's servers.")
    @app_commands.describe(
        name="The pool's name.", gpu="The GPU model to rent, e.g. RTX 4090.",
        max_price="The most to pay per hour ($).", image="The Docker image (default: config).",
        disk="Disk in GB.", profile="The setup profile to run on new servers.",
        models="Models to download on new servers: https:// URLs, optionally folder:URL.",
        min="Servers kept at least.", max="Servers at most.",
        target_wait="The queue wait (seconds) to stay under.",
        idle_timeout="Minutes idle before a member stops.",
    )
    async def create(
        self, interaction: discord.Interaction, name: PoolName, gpu: GpuOption,
        max_price: app_commands.Range[float, 0.01, 100.0] | None = None,
        image: app_commands.Range[str, 1, 255] | None = None,
        disk: app_commands.Range[int, 10, 2000] | None = None,
        profile: ProfileOption | None = None,
        models: app_commands.Range[str, 1, 4000] | None = None,
        min: app_commands.Range[int, 0, 20] = 0, max: app_commands.Range[int, 1, 20] = 2,
        target_wait: app_commands.Range[int, 5, 86400] = 60,
        idle_timeout: app_commands.Range[int, 1, 10080] = 15,
    ) -> None:
        template = Template(gpu, max_price, image, disk, profile, parse_models(models))
        pool = await self.service.create(
            actor_of(interaction), name, template, min_servers=min, max_servers=max,
            target_wait=target_wait, idle_timeout=idle_timeout,
        )
        await interaction.response.send_message(
            f"Pool created. {pool_line(pool)}. Add servers with /pool add-server; the "
            "autoscaler rents more when jobs wait.", ephemeral=True)

    @app_commands.command(name="set", description="Change one of a pool's limits.")
    @app_commands.describe(name="The pool.", setting="What to change.", value="The new value.")
    @app_commands.autocomplete(name=pool_autocomplete)
    async def set_(self, interaction: discord.Interaction, name: PoolName, setting: Setting,
                   value: app_commands.Range[float, 0, 86400]) -> None:
        pool = await self.service.set(actor_of(interaction), name, setting, value)
        await interaction.response.send_message(f"Updated. {pool_line(pool)}.", ephemeral=True)

    @app_commands.command(name="status", description="A pool's servers, queue and decisions.")
    @app_commands.describe(name="The pool.")
    @app_commands.autocomplete(name=pool_autocomplete)
    async def status(self, interaction: discord.Interaction, name: PoolName) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        view = await self.bot.services.autoscaler.status(name)
        await interaction.followup.send(embed=status_embed(view), ephemeral=True)

    @app_commands.command(name="list", description="Every pool and its limits.")
    async def list_(self, interaction: discord.Interaction) -> None:
        pools = await self.service.store.pools()
        text = "\n".join(pool_line(p) for p in pools) or "No pools yet: /pool create."
        await interaction.response.send_message(truncate(text, 1900), ephemeral=True)

    @app_commands.command(name="add-server", description="Make an existing server a member.")
    @app_commands.describe(name="The pool.", server="The server.")
    @app_commands.autocomplete(name=pool_autocomplete, server=server_autocomplete)
    async def add_server(self, interaction: discord.Interaction, name: PoolName,
                         server: ServerOption) -> None:
        view = await self.service.add_server(actor_of(interaction), name, server)
        await interaction.response.send_message(
            f"**{view.name}** joined pool **{name.lower()}**; it stops after "
            f"{view.idle_timeout} idle minutes.", ephemeral=True)

    @app_commands.command(name="remove", description="Forget a pool (its servers stay).")
    @app_commands.describe(name="The pool.")
    @app_commands.autocomplete(name=pool_autocomplete)
    async def remove(self, interaction: discord.Interaction, name: PoolName) -> None:
        pool = await self.service.store.get(name)
        question = (f"Remove pool **{pool.name}**? Its servers stay; nothing scales them "
                    "any more.")
        if not await confirm(interaction, question, confirm_label="Remove", danger=True,
                             timeout=self.confirm_timeout):
            await interaction.followup.send("Nothing was removed.", ephemeral=True)
            return
        await self.service.remove(actor_of(interaction), pool.name)
        await interaction.followup.send(f"Pool **{pool.name}** removed.", ephemeral=True)


async def setup(bot: BotContext) -> None:
    await bot.add_cog(Pools(bot))
