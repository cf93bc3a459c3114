"""/models: what the servers have (everyone), download and delete (admins).

Downloads can take far longer than an interaction token lives (15 minutes), so their
progress is a regular channel message the bot owns, edited through the shared
:class:`~bot.relay.MessageRelay` (coalesced, final state never dropped).
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import discord
from discord import app_commands
from discord.ext import commands

from bot.autocomplete import name_choices, server_autocomplete
from bot.checks import actor_of, admin_only
from bot.confirm import confirm
from bot.context import BotContext
from bot.options import ServerOption
from bot.rendering import (
    BRAND_COLOUR,
    ERROR_COLOUR,
    OK_COLOUR,
    human_duration,
    progress_bar,
    truncate,
)
from core.db.models import utcnow
from core.errors import ComfyVastError
from core.model_files import (
    MODEL_FOLDERS,
    DownloadObserver,
    DownloadRequest,
    DownloadView,
    ModelListing,
    format_size,
    validate_folder,
    validate_model_path,
)
from core.providers import has_shell

if TYPE_CHECKING:
    from core.model_files import CacheEntry, CacheReport, ModelService

log = logging.getLogger(__name__)

FOLDER_CHOICES = [app_commands.Choice(name=f, value=f) for f in MODEL_FOLDERS]
CONFIRM_TIMEOUT = 60.0
MAX_CHOICES = 25
# Discord allows 6000 characters over all embeds of a message and 10 embeds.
EMBED_BUDGET = 5800
MAX_EMBEDS = 10

STATUS_TITLES = {
    "pending": "Starting download",
    "downloading": "Downloading",
    "verifying": "Checking",
    "completed": "Downloaded",
    "failed": "Download failed",
}


# --------------------------------------------------------------------------- rendering


def _speed(bps: float | None) -> str:
    if not bps:
        return "–"
    return f"{bps / 1024**2:.1f} MB/s" if bps >= 1024**2 else f"{bps / 1024:.0f} kB/s"


def download_embed(d: DownloadView) -> discord.Embed:
    colour = {"completed": OK_COLOUR, "failed": ERROR_COLOUR}.get(d.status, BRAND_COLOUR)
    embed = discord.Embed(
        title=truncate(f"{STATUS_TITLES.get(d.status, d.status)}: {d.filename}", 256),
        description=f"`{d.folder}` on **{d.server_name}**",
        colour=colour,
    )
    fraction = d.fraction
    if d.status in ("pending", "downloading", "verifying"):
        if fraction is not None:
            line = (f"`{progress_bar(fraction)}` {fraction * 100:.0f}% · "
                    f"{format_size(d.bytes_done)} of {format_size(d.bytes_total)}")
        else:
            line = f"{format_size(d.bytes_done)} so far (size unknown)"
        if d.status == "downloading":
            line += f" · {_speed(d.speed)}"
            if d.eta_seconds is not None:
                line += f" · ETA {human_duration(d.eta_seconds)}"
        if d.status == "verifying":
            line += "\nChecking the file before it goes live…"
        if d.resumed_from:
            line += f"\nResumed from {format_size(d.resumed_from)} already on the server."
        embed.add_field(name="Progress", value=line, inline=False)
    elif d.status == "completed":
        embed.add_field(name="Size", value=format_size(d.bytes_done))
        if d.sha256:
            embed.add_field(name="sha256", value=f"`{d.sha256}`", inline=False)
    if d.error:
        embed.add_field(name="Error", value=truncate(d.error, 1000), inline=False)
    host = urlsplit(d.url).hostname or "?"
    embed.set_footer(text=f"Download #{d.id} · from {host}")
    return embed


def _last_use(when: dt.datetime | None, now: dt.datetime) -> str:
    if when is None:
        return "never used"
    return f"used {human_duration((now - when).total_seconds())} ago"


def entry_line(name: str, entry: CacheEntry | None, now: dt.datetime) -> str:
    """One model: its name, then size, last use and pin (when the disk could be read)."""
    if entry is None:
        return name
    parts = [name, format_size(entry.size), _last_use(entry.last_used, now)]
    if entry.pinned:
        parts.append("pinned")
    if entry.in_use:
        parts.append("in use")
    return " · ".join(parts)


def listing_embeds(listings: list[ModelListing], folder: str | None,
                   failures: list[str],
                   reports: dict[int, CacheReport] | None = None) -> list[discord.Embed]:
    budget = EMBED_BUDGET
    embeds: list[discord.Embed] = []
    now = utcnow()
    for listing in listings[:MAX_EMBEDS]:
        source = "ComfyUI" if listing.source == "comfyui" else "the disk over SSH (ComfyUI is down)"
        footer = f"Read from {source}"
        report = (reports or {}).get(listing.server_id)
        entries = {(e.folder, e.name): e for e in report.entries} if report else {}
        embed = discord.Embed(title=listing.server_name, colour=BRAND_COLOUR)
        if report is not None:
            embed.description = (f"Model cache: {format_size(report.used)} of "
                                 f"{format_size(report.limit)} used")
            budget -= len(embed.description)
        budget -= len(listing.server_name) + len(footer)
        folders = [folder] if folder else [f for f in MODEL_FOLDERS if listing.names(f)]
        if not folders:
            embed.description = "\n".join(filter(None, [embed.description, "No models yet."]))
        for name in folders:
            names = listing.names(name)
            lines = [entry_line(n, entries.get((name, n)), now) for n in names]
            value = "\n".join(lines) if lines else "(empty)"
            room = max(min(1024, budget - len(name) - 8), 0)
            if room < 20:
                break
            if len(value) > room:
                value = truncate(value, room - 12) + f"\n(+{len(names)} in all)"
            embed.add_field(name=f"{name} ({len(names)})", value=value, inline=False)
            budget -= len(value) + len(name) + 8
        embed.set_footer(text=footer)
        embeds.append(embed)
    if failures and len(embeds) < MAX_EMBEDS:
        text = truncate("\n".join(failures), max(budget, 100))
        embeds.append(discord.Embed(title="Could not list", description=text,
                                    colour=ERROR_COLOUR))
    return embeds


# --------------------------------------------------------------------------- observer


class DiscordDownloadObserver(DownloadObserver):
    """Posts a download's status message in the channel and keeps it current."""

    def __init__(self, bot: BotContext, channel_id: int, guild_id: int | None) -> None:
        self.bot = bot
        self.channel_id = channel_id
        self.guild_id = guild_id
        self.message: discord.Message | None = None

    async def on_started(self, download: DownloadView) -> tuple[int, int] | None:
        channel = self.bot.get_partial_messageable(self.channel_id, guild_id=self.guild_id)
        self.message = await channel.send(embed=download_embed(download))
        return self.channel_id, self.message.id

    async def on_progress(self, download: DownloadView) -> None:
        if download.message_id is None or download.channel_id is None:
            return

        async def build() -> dict[str, Any]:
            return {"embed": download_embed(download)}

        self.bot.relay.update(download.channel_id, download.message_id, build)

    async def on_finished(self, download: DownloadView) -> None:
        if download.message_id is None or download.channel_id is None:
            return

        async def build() -> dict[str, Any]:
            return {"embed": download_embed(download)}

        await self.bot.relay.finish(download.channel_id, download.message_id, build)


# --------------------------------------------------------------------------- the cog


@app_commands.guild_only()
class Models(commands.GroupCog, group_name="models",
             group_description="Model files on the team's servers."):
    def __init__(self, bot: BotContext) -> None:
        self.bot = bot
        super().__init__()

    @property
    def service(self) -> ModelService:
        return self.bot.services.models  # type: ignore[attr-defined,no-any-return]

    @app_commands.command(name="list", description="The models a server has, per folder.")
    @app_commands.describe(
        server="The server (default: every running server).",
        folder="Only this folder.",
        refresh="Read the lists again instead of using the cache.",
    )
    @app_commands.choices(folder=FOLDER_CHOICES)
    async def list_models(
        self, interaction: discord.Interaction, server: ServerOption | None = None,
        folder: str | None = None, refresh: bool = False,
    ) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        if folder is not None:
            folder = validate_folder(folder)
        if server is not None:
            views = [await self.bot.services.servers.get(server)]
        else:
            views = [v for v in await self.bot.services.servers.list() if v.is_ready]
        if not views:
            await interaction.followup.send(
                "No server is running; start or add one first.", ephemeral=True)
            return
        listings: list[ModelListing] = []
        failures: list[str] = []
        reports: dict[int, CacheReport] = {}
        for view in views:
            try:
                listings.append(await self.service.list(view, refresh=refresh))
            except ComfyVastError as exc:
                if server is not None:
                    raise
                failures.append(f"**{view.name}**: {exc}")
                continue
            if has_shell(view):
                # Sizes, last use and pins; the names alone still show when SSH fails.
                try:
                    reports[view.id] = await self.service.report(view)
                except ComfyVastError as exc:
                    log.info("no cache details for %s: %s", view.name, exc)
        await interaction.followup.send(
            embeds=listing_embeds(listings, folder, failures, reports), ephemeral=True)

    @app_commands.command(name="download",
                          description="Download a model onto a server (the server fetches it).")
    @app_commands.describe(
        server="The server to download to.",
        url="https:// link to the file (Hugging Face, Civitai, ...).",
        folder="The model folder it belongs in.",
        filename="Save it under this name (default: the source's name).",
        sha256="The file's expected SHA-256; a mismatch discards the file.",
    )
    @app_commands.choices(folder=FOLDER_CHOICES)
    @admin_only()
    async def download(
        self, interaction: discord.Interaction, server: ServerOption,
        url: app_commands.Range[str, 8, 2048], folder: str,
        filename: app_commands.Range[str, 1, 200] | None = None,
        sha256: app_commands.Range[str, 64, 64] | None = None,
    ) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        assert interaction.channel_id is not None  # guild_only
        observer = DiscordDownloadObserver(self.bot, interaction.channel_id, interaction.guild_id)
        request = DownloadRequest(actor=actor_of(interaction), server=server, url=url,
                                  folder=folder, filename=filename, sha256=sha256)
        view = await self.service.start(request, observer)
        where = f" Progress: {observer.message.jump_url}" if observer.message else ""
        await interaction.followup.send(
            f"Downloading **{view.filename}** into `{view.folder}` on **{view.server_name}**."
            f"{where}", ephemeral=True)

    @app_commands.command(name="delete", description="Delete a model file from a server.")
    @app_commands.describe(
        server="The server.", folder="The model folder.", filename="The model to delete.")
    @app_commands.choices(folder=FOLDER_CHOICES)
    @admin_only()
    async def delete(
        self, interaction: discord.Interaction, server: ServerOption, folder: str,
        filename: app_commands.Range[str, 1, 300],
    ) -> None:
        # Check the names first, so a typo is not answered with a confirmation prompt.
        folder = validate_folder(folder)
        filename = validate_model_path(filename)
        view = await self.bot.services.servers.get(server)
        question = (f"Delete `{folder}/{filename}` from **{view.name}**? "
                    "This cannot be undone.")
        # The prompt itself tells a "no" (or no answer in time) apart; nothing to add then.
        if not await confirm(interaction, question, confirm_label="Delete", danger=True,
                             timeout=CONFIRM_TIMEOUT):
            return
        removed = await self.service.delete(actor_of(interaction), view.name, folder, filename)
        await interaction.followup.send(f"Deleted `{removed}` from **{view.name}**.",
                                        ephemeral=True)

    @app_commands.command(name="pin", description="Never let the cache evict this model.")
    @app_commands.describe(server="The server.", folder="The model folder.",
                           filename="The model to keep.")
    @app_commands.choices(folder=FOLDER_CHOICES)
    @admin_only()
    async def pin(
        self, interaction: discord.Interaction, server: ServerOption, folder: str,
        filename: app_commands.Range[str, 1, 300],
    ) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        view = await self.bot.services.servers.get(server)
        path = await self.service.pin(actor_of(interaction), view.name, folder, filename)
        await interaction.followup.send(
            f"Pinned `{path}` on **{view.name}**: the cache will not evict it.", ephemeral=True)

    @app_commands.command(name="unpin", description="Let the cache evict this model again.")
    @app_commands.describe(server="The server.", folder="The model folder.",
                           filename="The pinned model.")
    @app_commands.choices(folder=FOLDER_CHOICES)
    @admin_only()
    async def unpin(
        self, interaction: discord.Interaction, server: ServerOption, folder: str,
        filename: app_commands.Range[str, 1, 300],
    ) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        view = await self.bot.services.servers.get(server)
        path = await self.service.unpin(actor_of(interaction), view.name, folder, filename)
        await interaction.followup.send(
            f"Unpinned `{path}` on **{view.name}**: the cache may evict it when room is "
            "needed.", ephemeral=True)

    # -- autocomplete

    # The server option completes with bot.autocomplete.server_autocomplete (shared).
    list_models.autocomplete("server")(server_autocomplete)
    download.autocomplete("server")(server_autocomplete)
    delete.autocomplete("server")(server_autocomplete)
    pin.autocomplete("server")(server_autocomplete)
    unpin.autocomplete("server")(server_autocomplete)

    @delete.autocomplete("filename")
    @pin.autocomplete("filename")
    @unpin.autocomplete("filename")
    async def _filename_autocomplete(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        folder = getattr(interaction.namespace, "folder", None) or "checkpoints"
        server = getattr(interaction.namespace, "server", None) or None
        try:
            names = await self.service.names(str(folder), current, server=server)
        except Exception:  # autocomplete must answer within 3 s whatever happens
            log.exception("model name autocomplete failed")
            return []
        return name_choices(names)


async def setup(bot: BotContext) -> None:
    await bot.add_cog(Models(bot))
