"""/server: the team's GPU servers (admin only)."""

from __future__ import annotations

import logging
from typing import Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot.autocomplete import server_autocomplete
from bot.checks import AdminCog, actor_of
from bot.confirm import confirm
from bot.context import BotContext
from bot.diagnose_render import diagnosis_embed
from bot.options import GpuOption, ServerOption
from bot.rendering import echo, fit_embed
from bot.server_render import (
    add_comfy_fields,
    offers_embed,
    plan_embed,
    servers_embed,
    status_embed,
)
from core.audit import Actor
from core.errors import GENERIC_FAILURE, ComfyVastError, ValidationFailed
from core.providers import provider_for
from core.providers.vast import Offer, OfferQuery
from core.servers import default_name, validate_name
from core.servers.boot import StillStarting
from core.servers.keys import RotationReport
from core.servers.service import MessageRef, RentPlan

log = logging.getLogger(__name__)

SORTS = Literal["price", "reliability", "performance", "value", "bandwidth", "vram"]
REGIONS = Literal["europe", "north-america", "asia", "oceania", "south-america"]


class OffersView(discord.ui.View):
    """Rent buttons under /server offers; only the admin who searched may press them."""

    def __init__(self, cog: Servers, owner_id: int, query: OfferQuery, offers: list[Offer]) -> None:
        super().__init__(timeout=300)
        self.cog, self.owner_id, self.query = cog, owner_id, query
        for index, offer in enumerate(offers[:5], start=1):
            button: discord.ui.Button[OffersView] = discord.ui.Button(
                label=f"Rent {index}",
                style=discord.ButtonStyle.primary,
                custom_id=f"cv:offer:{offer.id}:{index}",
            )
            button.callback = self._make_callback(offer.id)  # type: ignore[method-assign]
            self.add_item(button)

    def _make_callback(self, offer_id: int):  # type: ignore[no-untyped-def]
        async def callback(interaction: discord.Interaction) -> None:
            if interaction.user.id != self.owner_id:
                await interaction.response.send_message(
                    "Only the admin who searched can rent from this list.", ephemeral=True
                )
                return
            await self.cog.rent_flow(
                interaction, self.query, offer_id=offer_id, name=None, disk=None, image=None
            )

        return callback


class KeyCommands:
    """/server rotate-key, mixed into :class:`Servers` (its admin check applies)."""

    bot: BotContext

    @app_commands.command(
        name="rotate-key", description="Replace the bot's SSH key on every server (asks first)."
    )
    async def rotate_key(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        if not await confirm(
            interaction,
            "Rotate the bot's SSH key? A new key is installed and proven on every running "
            "server, then the old one is removed there. Servers that cannot be reached keep "
            "both keys until the next rotation.",
            confirm_label="Rotate",
            danger=True,
        ):
            await interaction.followup.send("The key was not rotated.", ephemeral=True)
            return
        log.info("SSH key rotation requested by %s", interaction.user.id)
        report = await self.bot.services.keys.rotate()
        await interaction.followup.send(rotation_text(report), ephemeral=True)


@app_commands.default_permissions(manage_guild=True)
@app_commands.guild_only()
class Servers(
    AdminCog,
    KeyCommands,
    commands.GroupCog,
    group_name="server",
    group_description="Manage the team's GPU servers.",
):
    def __init__(self, bot: BotContext) -> None:
        self.bot = bot
        super().__init__()

    @app_commands.command(
        name="add-direct", description="Register a ComfyUI that is already running."
    )
    @app_commands.describe(
        name="A short name (letters, digits, dashes).",
        url="ComfyUI's address, e.g. http://10.0.0.5:8188",
    )
    async def add_direct(
        self,
        interaction: discord.Interaction,
        name: app_commands.Range[str, 1, 32],
        url: app_commands.Range[str, 8, 500],
    ) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        added = await self.bot.services.server_ops.add_direct(actor_of(interaction), name, url)
        stats = added.stats
        gpu = stats.devices[0].name if stats.devices else "unknown device"
        await interaction.followup.send(
            f"Added server **{added.server.name}**: ComfyUI {stats.comfyui_version} on {gpu} "
            f"(answered in {added.answered_ms:.0f} ms).",
            ephemeral=True,
        )

    @app_commands.command(name="add-ssh", description="Register a GPU host the team owns (SSH).")
    @app_commands.describe(
        name="A short name (letters, digits, dashes).",
        host="Hostname or IP address.",
        port="SSH port.",
        user="SSH user (needs the bot's public key in authorized_keys).",
        comfy_port="ComfyUI's port on that host.",
    )
    async def add_ssh(
        self,
        interaction: discord.Interaction,
        name: app_commands.Range[str, 1, 32],
        host: app_commands.Range[str, 1, 253],
        port: app_commands.Range[int, 1, 65535] = 22,
        user: app_commands.Range[str, 1, 32] = "root",
        comfy_port: app_commands.Range[int, 1, 65535] = 8188,
    ) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        added = await self.bot.services.server_ops.add_ssh(
            actor_of(interaction), name, host, port, user, comfy_port=comfy_port
        )
        server = added.server
        await interaction.followup.send(
            f"Added server **{server.name}** ({server.ssh_user}@{server.ssh_host}:"
            f"{server.ssh_port}); host key `{added.fingerprint}` pinned. "
            "Install ComfyUI with /setup run.",
            ephemeral=True,
        )

    # ------------------------------------------------------------------ Vast.ai

    @app_commands.command(name="offers", description="Search Vast.ai GPU offers.")
    @app_commands.describe(
        gpu="GPU model, e.g. RTX 4090.",
        num_gpus="GPUs per machine.",
        max_price="Highest $/h.",
        min_reliability="Lowest reliability (0-1).",
        region="Region.",
        sort="Order of the results.",
    )
    async def offers(
        self,
        interaction: discord.Interaction,
        gpu: GpuOption | None = None,
        num_gpus: app_commands.Range[int, 1, 8] = 1,
        max_price: app_commands.Range[float, 0.01, 100.0] | None = None,
        min_reliability: app_commands.Range[float, 0.0, 1.0] | None = None,
        region: REGIONS | None = None,
        sort: SORTS = "price",
    ) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        query = OfferQuery(
            gpu_name=gpu,
            num_gpus=num_gpus,
            max_price_per_hour=max_price,
            min_reliability=min_reliability,
            region=region,
            sort=sort,
            limit=10,
        )
        found = await self.bot.services.server_ops.offers(query)
        if not found:
            await interaction.followup.send("No offer matches; relax the filters.", ephemeral=True)
            return
        view = OffersView(self, interaction.user.id, query, found)
        await interaction.followup.send(embed=offers_embed(found), view=view, ephemeral=True)

    @app_commands.command(name="create", description="Rent a GPU server on Vast.ai.")
    @app_commands.describe(
        gpu="Rent the cheapest offer with this GPU (or give offer_id).",
        offer_id="Rent this exact offer (from /server offers).",
        name="A short name.",
        disk="Disk in GB.",
        image="Docker image (default from config).",
        max_price="Highest $/h when picking by GPU.",
    )
    async def create(
        self,
        interaction: discord.Interaction,
        gpu: GpuOption | None = None,
        offer_id: app_commands.Range[int, 1, 2**53 - 1] | None = None,
        name: app_commands.Range[str, 1, 32] | None = None,
        disk: app_commands.Range[int, 10, 2000] | None = None,
        image: app_commands.Range[str, 3, 200] | None = None,
        max_price: app_commands.Range[float, 0.01, 100.0] | None = None,
    ) -> None:
        if not gpu and offer_id is None:
            raise ValidationFailed("Give a GPU (e.g. RTX 4090) or an offer id.")
        query = OfferQuery(gpu_name=gpu, max_price_per_hour=max_price, min_disk_gb=disk, limit=20)
        await self.rent_flow(
            interaction, query, offer_id=offer_id, name=name, disk=disk, image=image
        )

    async def rent_flow(
        self,
        interaction: discord.Interaction,
        query: OfferQuery,
        *,
        offer_id: int | None,
        name: str | None,
        disk: int | None,
        image: str | None,
    ) -> None:
        """Plan, confirm (GPU, VRAM, $/h, the month's spend), then rent in the background
        with the progress in a bot-owned channel message."""
        if not interaction.response.is_done():
            await interaction.response.defer(ephemeral=True, thinking=True)
        ops = self.bot.services.server_ops
        plan = await ops.plan(query, offer_id=offer_id)
        taken = [s.name for s in await self.bot.services.servers.list(include_destroyed=True)]
        name = validate_name(name) if name else default_name(plan.offer.gpu_name, taken)
        await self.bot.services.servers.ensure_name_free(name)
        if not await confirm(interaction, plan_embed(plan, name), confirm_label="Rent it"):
            await interaction.followup.send("Nothing was rented.", ephemeral=True)
            return
        channel = interaction.channel
        status = await channel.send(  # type: ignore[union-attr]
            f"⏳ Renting **{name}** ({plan.offer.num_gpus}× {plan.offer.gpu_name}, "
            f"${plan.offer.price_per_hour:.3f}/h) for {interaction.user.mention}…",
            allowed_mentions=discord.AllowedMentions.none(),
        )
        await interaction.followup.send(f"Renting: {status.jump_url}", ephemeral=True)
        actor = actor_of(interaction)
        self.bot.spawn(
            run_rent(self.bot, actor, plan, name, disk, image, status), name=f"rent-{name}"
        )

    @app_commands.command(name="start", description="Start a stopped Vast.ai server.")
    @app_commands.describe(server="The server.")
    @app_commands.autocomplete(server=server_autocomplete)
    async def start(self, interaction: discord.Interaction, server: ServerOption) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        view = await self.bot.services.servers.get(server)
        await self.bot.services.server_ops.check_budget(view.price_per_hour, "Starting this server")
        if not await confirm(
            interaction,
            f"Start **{view.name}** at ${view.price_per_hour:.3f}/h?",
            confirm_label="Start it",
        ):
            await interaction.followup.send("Not started.", ephemeral=True)
            return
        channel = interaction.channel
        status = await channel.send(f"⏳ Starting **{view.name}**…")  # type: ignore[union-attr]
        await interaction.followup.send(f"Starting: {status.jump_url}", ephemeral=True)
        actor = actor_of(interaction)

        self.bot.spawn(run_start(self.bot, actor, view.name, status), name=f"start-{view.name}")

    @app_commands.command(name="stop", description="Stop a Vast.ai server (its disk still bills).")
    @app_commands.describe(server="The server.")
    @app_commands.autocomplete(server=server_autocomplete)
    async def stop(self, interaction: discord.Interaction, server: ServerOption) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        # A restart mid-stop finishes it and posts the outcome in this channel.
        ref = MessageRef(interaction.channel_id) if interaction.channel_id else None
        view = await self.bot.services.server_ops.stop(actor_of(interaction), server, message=ref)
        await interaction.followup.send(
            f"Stopped **{view.name}**. A stopped Vast.ai instance still bills its disk; "
            "/server destroy ends that.",
            ephemeral=True,
        )

    @app_commands.command(name="destroy", description="Destroy a server (asks first).")
    @app_commands.describe(server="The server.")
    @app_commands.autocomplete(server=server_autocomplete)
    async def destroy(self, interaction: discord.Interaction, server: ServerOption) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        view = await self.bot.services.servers.get(server)
        what = (
            "This destroys the rented instance and everything on its disk."
            if provider_for(view).rented
            else "The bot forgets this server; the host stays."
        )
        if not await confirm(
            interaction, f"Destroy **{view.name}**? {what}", confirm_label="Destroy", danger=True
        ):
            await interaction.followup.send("Nothing was destroyed.", ephemeral=True)
            return
        ref = MessageRef(interaction.channel_id) if interaction.channel_id else None
        done = await self.bot.services.server_ops.destroy(
            actor_of(interaction), view.name, message=ref
        )
        await interaction.followup.send(
            f"Destroyed **{view.name}** (kept in the records as {done.name}).", ephemeral=True
        )

    @app_commands.command(name="autostop", description="Stop a server after N idle minutes.")
    @app_commands.describe(server="The server.", minutes="Idle minutes before it stops; 0 = never.")
    @app_commands.autocomplete(server=server_autocomplete)
    async def autostop(
        self,
        interaction: discord.Interaction,
        server: ServerOption,
        minutes: app_commands.Range[int, 0, 10080],
    ) -> None:
        view = await self.bot.services.server_ops.set_autostop(
            actor_of(interaction), server, minutes
        )
        text = "never stops by itself" if minutes == 0 else f"stops after {minutes} idle minutes"
        await interaction.response.send_message(f"**{view.name}** {text}.", ephemeral=True)

    @app_commands.command(
        name="diagnose",
        description="Check reachability, SSH, the ComfyUI port and service, the install, GPU.",
    )
    @app_commands.describe(server="The server.")
    @app_commands.autocomplete(server=server_autocomplete)
    async def diagnose(self, interaction: discord.Interaction, server: ServerOption) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        report = await self.bot.services.diagnostics.diagnose(server)
        await interaction.followup.send(embed=diagnosis_embed(report), ephemeral=True)

    @app_commands.command(name="list", description="All servers with state, GPU, price and queue.")
    async def list_servers(self, interaction: discord.Interaction) -> None:
        servers = await self.bot.services.servers.list()
        if not servers:
            await interaction.response.send_message(
                "No servers yet: add one with /server add-direct, /server add-ssh or "
                "/server create.",
                ephemeral=True,
            )
            return
        jobs = await self.bot.services.servers.active_jobs()
        spend = await self.bot.services.server_ops.spend_report(servers)
        embed = servers_embed(servers, jobs, spend, discord.utils.utcnow())
        await interaction.response.send_message(embed=embed, ephemeral=True)

    @app_commands.command(name="status", description="Live state of one server.")
    @app_commands.describe(server="The server.")
    @app_commands.autocomplete(server=server_autocomplete)
    async def status(self, interaction: discord.Interaction, server: ServerOption) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        view = await self.bot.services.servers.get(server)
        embed = status_embed(view)
        try:
            conn = await self.bot.services.comfy.get(view)
            stats = await conn.client.system_stats()
            queue = await conn.client.get_queue()
            add_comfy_fields(embed, stats, queue)
        except Exception as exc:  # shown, not raised: the status of a broken server is useful
            # The error text may quote the server's answer: clipped to a field's 1024.
            embed.add_field(name="ComfyUI", value=echo(f"not answering: {exc}", 1024),
                            inline=False)
        await interaction.followup.send(embed=fit_embed(embed), ephemeral=True)


async def run_rent(
    bot: BotContext,
    actor: Actor,
    plan: RentPlan,
    name: str,
    disk: int | None,
    image: str | None,
    status: discord.Message,
) -> None:
    """Rent in the background, with the progress in the bot-owned ``status`` message."""
    lines: list[str] = [status.content]

    async def progress(text: str) -> None:
        lines.append(f"• {text}")
        content = "\n".join(lines[-12:])
        bot.relay.update(status.channel.id, status.id, lambda: _content(content))

    # Kept with the row: after a restart the bot finishes the rent and edits this message.
    ref = MessageRef(status.channel.id, status.id, status.content)
    try:
        server = await bot.services.server_ops.rent(
            actor, plan, name, image=image, disk_gb=disk, progress=progress, message=ref
        )
        lines.append(
            f"✅ **{server.name}** is running ({server.gpu}, "
            f"${server.price_per_hour:.3f}/h). Install ComfyUI with /setup run."
        )
    except ComfyVastError as exc:
        lines.append(f"❌ {exc}")
    except Exception:
        log.exception("renting %s failed", name)
        lines.append(f"❌ {GENERIC_FAILURE}")
    final = "\n".join(lines[-12:])
    await bot.relay.finish(status.channel.id, status.id, lambda: _content(final))


async def run_start(bot: BotContext, actor: Actor, name: str, status: discord.Message) -> None:
    """Start in the background; a start still waiting for its GPU is kept and followed."""
    ref = MessageRef(status.channel.id, status.id, status.content)

    async def progress(text: str) -> None:  # e.g. "waiting for the GPU to be free"
        content = f"{status.content}\n• {text}"
        bot.relay.update(status.channel.id, status.id, lambda: _content(content))

    try:
        done = await bot.services.server_ops.start(actor, name, progress=progress, message=ref)
        text = f"✅ **{done.name}** is running."
    except StillStarting as exc:  # kept, not destroyed; this message is edited when it runs
        text = f"⏳ **{name}**: {exc}"
    except ComfyVastError as exc:
        text = f"❌ Starting **{name}** failed: {exc}"
    except Exception:
        log.exception("starting %s failed", name)
        text = f"❌ {GENERIC_FAILURE}"
    final = f"{status.content}\n{text}"
    await bot.relay.finish(status.channel.id, status.id, lambda: _content(final))


def rotation_text(report: RotationReport) -> str:
    """The reply to /server rotate-key, within Discord's 2000 characters."""
    lines = [f"New SSH key `{report.fingerprint}`"
             + (" (resumed the unfinished rotation)." if not report.started else ".")]
    if report.done:
        lines.append("Old key removed from: " + ", ".join(report.done[:20])
                     + (f" and {len(report.done) - 20} more" if len(report.done) > 20 else ""))
    if report.finished:
        lines.append("The old key is gone everywhere.")
    else:
        lines.append("These servers could not be switched and keep both keys; "
                     "run /server rotate-key again to finish:")
        lines += [f"- **{name}**: {reason[:150]}" for name, reason in report.pending[:10]]
        if len(report.pending) > 10:
            lines.append(f"... and {len(report.pending) - 10} more")
    return "\n".join(lines)[:1900]


async def _content(text: str) -> dict[str, object]:
    return {"content": text}


async def setup(bot: BotContext) -> None:
    await bot.add_cog(Servers(bot))
