"""/server: the team's GPU servers (admin only)."""

from __future__ import annotations

import time

import discord
from discord import app_commands
from discord.ext import commands

from bot.bot import ComfyVastBot
from bot.checks import AdminCog, actor_of
from bot.rendering import BRAND_COLOUR, human_duration, timestamp, truncate
from core.comfy.errors import ComfyError
from core.errors import ValidationFailed
from core.servers import validate_comfy_url, validate_name, validate_ssh_target
from core.ssh import SSHAuthError, SSHTarget, host_key_fingerprint


async def server_autocomplete(
    interaction: discord.Interaction, current: str
) -> list[app_commands.Choice[str]]:
    bot: ComfyVastBot = interaction.client  # type: ignore[assignment]
    names = await bot.services.servers.names(current)
    return [app_commands.Choice(name=n, value=n) for n in names[:25]]


@app_commands.default_permissions(manage_guild=True)
@app_commands.guild_only()
class Servers(AdminCog, commands.GroupCog, group_name="server",
              group_description="Manage the team's GPU servers."):
    def __init__(self, bot: ComfyVastBot) -> None:
        self.bot = bot
        super().__init__()

    @app_commands.command(name="add-direct", description="Register a ComfyUI that is already running.")
    @app_commands.describe(name="A short name (letters, digits, dashes).",
                           url="ComfyUI's address, e.g. http://10.0.0.5:8188")
    async def add_direct(
        self, interaction: discord.Interaction, name: app_commands.Range[str, 1, 32],
        url: app_commands.Range[str, 8, 500],
    ) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        url = validate_comfy_url(url)
        client = self.bot.services.comfy.client_for(url)
        started = time.monotonic()
        try:
            stats = await client.system_stats()
        except ComfyError as exc:
            raise ValidationFailed(f"ComfyUI did not answer at {url}: {exc}") from None
        server = await self.bot.services.servers.add_direct(actor_of(interaction), name, url)
        gpu = stats.devices[0].name if stats.devices else "unknown device"
        await interaction.followup.send(
            f"Added server **{server.name}**: ComfyUI {stats.comfyui_version} on {gpu} "
            f"(answered in {(time.monotonic() - started) * 1000:.0f} ms).",
            ephemeral=True,
        )

    @app_commands.command(name="add-ssh", description="Register a GPU host the team owns (SSH).")
    @app_commands.describe(name="A short name (letters, digits, dashes).",
                           host="Hostname or IP address.", port="SSH port.",
                           user="SSH user (needs the bot's public key in authorized_keys).",
                           comfy_port="ComfyUI's port on that host.")
    async def add_ssh(
        self, interaction: discord.Interaction, name: app_commands.Range[str, 1, 32],
        host: app_commands.Range[str, 1, 253], port: app_commands.Range[int, 1, 65535] = 22,
        user: app_commands.Range[str, 1, 32] = "root",
        comfy_port: app_commands.Range[int, 1, 65535] = 8188,
    ) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        services = self.bot.services
        host, port, user = validate_ssh_target(host, port, user)
        await services.servers.ensure_name_free(validate_name(name))
        remote = services.remote
        try:
            # Trust on first use: the key seen now is pinned and checked ever after.
            host_key = await remote.connector.fetch_host_key(host, port)
            target = SSHTarget(host, port, user, pinned_host_key=host_key)
            await remote.pool.run(target, "true", timeout=30)
        except SSHAuthError:
            raise ValidationFailed(
                f"{user}@{host}:{port} refused the bot's key. Add this line to "
                f"~{user}/.ssh/authorized_keys there, then try again:\n"
                f"`{remote.key.public_openssh}`"
            ) from None
        server = await services.servers.add_ssh(
            actor_of(interaction), name, host, port, user, host_key, comfy_port=comfy_port
        )
        await interaction.followup.send(
            f"Added server **{server.name}** ({user}@{host}:{port}); host key "
            f"`{host_key_fingerprint(host_key)}` pinned. Install ComfyUI with /setup run.",
            ephemeral=True,
        )

    @app_commands.command(name="list", description="All servers with state, GPU, price and queue.")
    async def list_servers(self, interaction: discord.Interaction) -> None:
        servers = await self.bot.services.servers.list()
        if not servers:
            await interaction.response.send_message(
                "No servers yet: add one with /server add-direct, /server add-ssh or "
                "/server create.", ephemeral=True)
            return
        jobs = await self.bot.services.servers.active_jobs()
        lines = []
        for s in servers:
            uptime = ""
            if s.running_since and s.status == "running":
                uptime = " · up " + human_duration(
                    (discord.utils.utcnow() - s.running_since).total_seconds())
            price = f" · ${s.price_per_hour:.3f}/h" if s.price_per_hour else ""
            lines.append(
                f"**{s.name}** ({s.provider}) · {s.status} · {s.gpu or 'GPU ?'}{price}{uptime}"
                f" · {jobs.get(s.id, 0)} job(s) · last used {timestamp(s.last_used_at)}"
            )
        embed = discord.Embed(title="Servers", description=truncate("\n".join(lines), 4000),
                              colour=BRAND_COLOUR)
        await interaction.response.send_message(embed=embed, ephemeral=True)

    @app_commands.command(name="status", description="Live state of one server.")
    @app_commands.describe(server="The server.")
    @app_commands.autocomplete(server=server_autocomplete)
    async def status(self, interaction: discord.Interaction, server: str) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        view = await self.bot.services.servers.get(server)
        embed = discord.Embed(title=f"Server {view.name}", colour=BRAND_COLOUR)
        embed.add_field(name="Provider", value=view.provider)
        embed.add_field(name="State", value=view.status)
        if view.gpu:
            embed.add_field(name="GPU", value=f"{view.gpu_count}× {view.gpu}")
        try:
            conn = await self.bot.services.comfy.get(view)
            stats = await conn.client.system_stats()
            queue = await conn.client.get_queue()
            devices = ", ".join(
                f"{d.name} ({d.vram_free // 2**20} / {d.vram_total // 2**20} MiB free)"
                for d in stats.devices) or "none reported"
            embed.add_field(name="ComfyUI", value=f"{stats.comfyui_version}, answering",
                            inline=False)
            embed.add_field(name="Devices", value=truncate(devices, 1000), inline=False)
            embed.add_field(name="Queue",
                            value=f"{len(queue.running)} running, {len(queue.pending)} waiting")
        except Exception as exc:  # shown, not raised: the status of a broken server is useful
            embed.add_field(name="ComfyUI", value=f"not answering: {exc}", inline=False)
        await interaction.followup.send(embed=embed, ephemeral=True)


async def setup(bot: ComfyVastBot) -> None:
    await bot.add_cog(Servers(bot))
