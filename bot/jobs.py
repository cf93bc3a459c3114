"""The Discord side of generations: status messages, results, persistent buttons.

The status message is a regular channel message the bot owns, so it can be edited long
after the 15-minute interaction token has expired; the interaction itself only gets a
private "queued" reply.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
from typing import Any

import discord
from discord import ui

from bot.checks import actor_of
from bot.context import BotContext, bot_of
from bot.job_render import (
    DEFAULT_UPLOAD_LIMIT,
    MAX_FILES_PER_MESSAGE,
    STATUS_WORDS,
    files_of,
    plan_upload,
    result_embed,
    status_embed,
)
from bot.relay import MessageRelay
from bot.tree import send_ephemeral
from core.errors import GENERIC_FAILURE, ComfyVastError
from core.generation import (
    GenerationFailed,
    GenerationRequest,
    InputImage,
    JobObserver,
    JobView,
)
from core.images import UPLOAD_MARGIN, ImageFile, ImageRejected, thumbnail

log = logging.getLogger(__name__)

# Re-exported: cogs/generation.py renders the status of a job with these.
__all__ = ["STATUS_WORDS", "launch_jobs", "status_embed"]

# --------------------------------------------------------------------------- buttons


class _JobButton:
    """Mixin for persistent buttons whose custom id carries the job id (survive restarts).

    Each concrete class also derives from ``ui.DynamicItem`` with its own template.
    """

    action: str = ""
    label: str = ""
    style: discord.ButtonStyle = discord.ButtonStyle.secondary
    emoji: str | None = None

    def __init__(self, job_id: int) -> None:
        super().__init__(  # type: ignore[call-arg]
            ui.Button(
                label=self.label,
                style=self.style,
                emoji=self.emoji,
                custom_id=f"cv:{self.action}:{job_id}",
            )
        )
        self.job_id = job_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: ui.Button[Any], match: re.Match[str]
    ) -> Any:
        return cls(int(match["job"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        bot = bot_of(interaction)
        try:
            await self.run(bot, interaction)
        except ComfyVastError as exc:
            await send_ephemeral(interaction, str(exc))
        except Exception:
            log.exception("button %s on job %s failed", self.action, self.job_id)
            await send_ephemeral(interaction, GENERIC_FAILURE)

    async def run(self, bot: BotContext, interaction: discord.Interaction) -> None:
        raise NotImplementedError


class CancelButton(
    _JobButton, ui.DynamicItem[ui.Button[Any]], template=r"cv:cancel:(?P<job>[0-9]+)"
):
    action = "cancel"
    label = "Cancel"
    style = discord.ButtonStyle.danger
    emoji = None

    async def run(self, bot: BotContext, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        job = await bot.services.generation.cancel(self.job_id, actor_of(interaction))
        await interaction.followup.send(f"Job #{job.id} is {job.status}.", ephemeral=True)


class RerollButton(
    _JobButton, ui.DynamicItem[ui.Button[Any]], template=r"cv:reroll:(?P<job>[0-9]+)"
):
    action = "reroll"
    label = "Re-roll"
    style = discord.ButtonStyle.primary
    emoji = "🎲"

    async def run(self, bot: BotContext, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        gen = bot.services.generation
        job = await gen.get(self.job_id)
        request = gen.request_from(job, actor_of(interaction), seed=None, kind="reroll")
        await launch_jobs(bot, interaction, [request])


class VariationsButton(
    _JobButton, ui.DynamicItem[ui.Button[Any]], template=r"cv:vary:(?P<job>[0-9]+)"
):
    action = "vary"
    label = "Variations"
    style = discord.ButtonStyle.secondary
    emoji = "🔀"

    async def run(self, bot: BotContext, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        gen = bot.services.generation
        job = await gen.get(self.job_id)
        actor = actor_of(interaction)
        requests = [
            gen.request_from(job, actor, seed=None, batch=1, kind="variation") for _ in range(4)
        ]
        await launch_jobs(bot, interaction, requests)


class UpscaleButton(
    _JobButton, ui.DynamicItem[ui.Button[Any]], template=r"cv:upscale:(?P<job>[0-9]+)"
):
    action = "upscale"
    label = "Upscale"
    style = discord.ButtonStyle.secondary
    emoji = "🔍"

    async def run(self, bot: BotContext, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        gen = bot.services.generation
        job = await gen.get(self.job_id)
        models = await gen.upscale_models(job.server_id)
        if not models:
            models = await gen.upscale_models()
        if not models:
            raise ComfyVastError("No running server has an upscale model.")
        server_id, names = next(iter(models.items()))
        images = await gen.output_images(self.job_id)
        source = images[0]
        server = await bot.services.servers.get(server_id)
        request = GenerationRequest(
            actor=actor_of(interaction),
            prompt=job.prompt,
            kind="upscale",
            image=InputImage(source.filename, source.data),
            upscale_model=names[0],
            server=server.name,
            parent_id=job.id,
        )
        await launch_jobs(bot, interaction, [request])


DYNAMIC_ITEMS: tuple[type[ui.DynamicItem[Any]], ...] = (
    CancelButton,
    RerollButton,
    VariationsButton,
    UpscaleButton,
)


def status_view(job_id: int) -> ui.View:
    view = ui.View(timeout=None)
    view.add_item(CancelButton(job_id))
    return view


def result_view(job_id: int, *, upscale: bool) -> ui.View:
    view = ui.View(timeout=None)
    view.add_item(RerollButton(job_id))
    view.add_item(VariationsButton(job_id))
    if upscale:
        view.add_item(UpscaleButton(job_id))
    return view


# --------------------------------------------------------------------------- launching


async def launch_jobs(
    bot: BotContext, interaction: discord.Interaction, requests: list[GenerationRequest]
) -> list[JobView]:
    """Submit each request, post its status message, start it; reply privately.

    The interaction must already be deferred. Errors are ComfyVastErrors with a sentence.
    """
    gen = bot.services.generation
    channel = interaction.channel
    if channel is None or not hasattr(channel, "send"):
        raise ComfyVastError("Generations can only run in a text channel.")
    if len(requests) > 1:
        await gen.check_limits(requests[0].actor, len(requests))
    jobs: list[JobView] = []
    links: list[str] = []
    for request in requests:
        job = await gen.submit(request)
        try:
            message = await channel.send(  # type: ignore[union-attr]
                embed=status_embed(job),
                view=status_view(job.id),
                allowed_mentions=discord.AllowedMentions.none(),
            )
        except discord.HTTPException as exc:
            await gen.abandon(job.id, "The status message could not be posted.")
            raise ComfyVastError(
                "I can't post in this channel; check my Send Messages and Embed Links permissions."
            ) from exc
        await gen.attach_message(job.id, message.channel.id, message.id)
        gen.start(job.id)
        jobs.append(job)
        links.append(f"#{job.id} ({message.jump_url})")
    text = "Queued " + ", ".join(links) + "."
    await interaction.followup.send(text, ephemeral=True)
    return jobs


# --------------------------------------------------------------------------- observer


def _part_marker(job_id: int) -> str:
    """How a later part of a batch's result begins (found again after a restart)."""
    return f"Job #{job_id}, part "


class DiscordJobObserver(JobObserver):
    """Renders job events into the status message and delivers results to the channel."""

    def __init__(self, bot: BotContext, relay: MessageRelay) -> None:
        self.bot = bot
        self.relay = relay
        self._previews: dict[int, bytes] = {}
        self._preview_sent: dict[int, int] = {}  # job id -> id() of the preview last sent
        self._results: dict[int, str] = {}  # job id -> jump URL of its result message

    async def on_update(self, job: JobView, preview: bytes | None) -> None:
        if job.message_id is None or job.channel_id is None:
            return
        if preview is not None:
            self._previews[job.id] = preview
        self.relay.update(job.channel_id, job.message_id, lambda: self._render_status(job.id))

    async def _render_status(self, job_id: int) -> dict[str, Any]:
        # Built when the edit is really sent: always the newest state and preview.
        job = await self.bot.services.generation.snapshot(job_id)
        # No view: an edit without components keeps the Cancel button posted with the
        # message (and building one per edit is most of an edit's garbage).
        kwargs: dict[str, Any] = {}
        preview = self._previews.get(job_id)
        name = None
        if preview is not None:
            name = "preview.jpg"
            if self._preview_sent.get(job_id) != id(preview):
                try:
                    thumb = await asyncio.to_thread(thumbnail, preview)
                except ImageRejected as exc:
                    # An untrusted server's preview: not shown, the progress still is.
                    log.warning("preview of job %s refused: %s", job_id, exc)
                    self._previews.pop(job_id, None)
                    thumb, name = None, None
                if thumb is not None:
                    kwargs["attachments"] = [discord.File(io.BytesIO(thumb), filename=name)]
                self._preview_sent[job_id] = id(preview)
        kwargs["embed"] = status_embed(job, preview_name=name)
        return kwargs

    async def deliver(
        self, job: JobView, images: list[ImageFile], *, check_existing: bool = False
    ) -> None:
        if job.channel_id is None:
            return
        channel = self.bot.get_partial_messageable(job.channel_id, guild_id=job.guild_id)
        existing, parts_posted = (
            await self._find_delivery(channel, job) if check_existing else (None, set())
        )
        if existing is not None and len(images) < MAX_FILES_PER_MESSAGE:
            self._results[job.id] = existing.jump_url  # one message, already posted
            return
        limit = self._upload_limit(job.guild_id)
        if len(images) == 1 and images[0].size <= limit - UPLOAD_MARGIN:
            messages, shown = [images], images[0].filename  # nothing to re-encode
        else:
            try:
                messages, shown = await asyncio.to_thread(plan_upload, images, limit)
            except (ImageRejected, ValueError) as exc:
                # A header that looked right over data that does not decode, or a file
                # that cannot be made small enough: the job fails with the reason.
                raise GenerationFailed(f"ComfyUI's images could not be posted: {exc}.") from exc
        if existing is None:
            upscale = self.bot.services.generation.has_upscale_model(job.server_id)
            existing = await channel.send(
                content=f"<@{job.user_id}>",
                embed=result_embed(job, shown),
                files=files_of(messages[0]),
                view=result_view(
                    job.id, upscale=upscale and job.parameters.get("kind") != "upscale"
                ),
                allowed_mentions=discord.AllowedMentions(users=True),
                # Discord drops a second message with the same nonce sent shortly after.
                nonce=f"cvjob{job.id}",
            )
        # The rest of a large batch, as replies to the first message; after a restart, only
        # the parts that had not been posted yet (the plan is the same for the same images).
        for part, files in enumerate(messages[1:], start=2):
            if part in parts_posted:
                continue
            await channel.send(
                content=f"{_part_marker(job.id)}{part} of {len(messages)}",
                files=files_of(files),
                allowed_mentions=discord.AllowedMentions.none(),
                reference=existing,
                mention_author=False,
                nonce=f"cvjob{job.id}p{part}",
            )
        self._results[job.id] = existing.jump_url

    async def on_finished(self, job: JobView) -> None:
        """The final state of the status message: done (with a link), failed or cancelled."""
        link = self._results.pop(job.id, None)
        if job.message_id is not None and job.channel_id is not None:
            await self.relay.finish(
                job.channel_id,
                job.message_id,
                lambda: self._render_final(job, f"Finished: {link}" if link else None),
            )
        self._forget(job.id)

    async def _render_final(self, job: JobView, link: str | None) -> dict[str, Any]:
        # The final view comes with the event: no database read for the last edit.
        embed = status_embed(job)
        if link:
            embed.add_field(name="Result", value=link, inline=False)
        return {"embed": embed, "attachments": [], "view": None}

    async def _find_delivery(
        self, channel: discord.PartialMessageable, job: JobView
    ) -> tuple[discord.Message | None, set[int]]:
        """The result message already posted for this job (a restart mid-delivery), and the
        numbers of the batch's later parts already posted."""
        if job.message_id is None:
            return None, set()
        marker = f"Job #{job.id} "
        parts = _part_marker(job.id)
        found: discord.Message | None = None
        posted: set[int] = set()
        try:
            async for message in channel.history(
                after=discord.Object(id=job.message_id), limit=100
            ):
                if message.author.id != self.bot.user.id:  # type: ignore[union-attr]
                    continue
                if message.content.startswith(parts) and message.attachments:
                    number = message.content[len(parts) :].split(" ", 1)[0]
                    if number.isdigit():
                        posted.add(int(number))
                    continue
                for embed in message.embeds:
                    if (
                        found is None
                        and embed.footer.text
                        and (embed.footer.text + " ").startswith(marker)
                        and message.attachments
                    ):
                        found = message
        except discord.HTTPException as exc:
            log.warning("could not read channel history to check delivery: %s", exc)
        return found, posted

    def _upload_limit(self, guild_id: int | None) -> int:
        guild = self.bot.get_guild(guild_id) if guild_id else None
        return guild.filesize_limit if guild is not None else DEFAULT_UPLOAD_LIMIT

    def _forget(self, job_id: int) -> None:
        self._previews.pop(job_id, None)
        self._preview_sent.pop(job_id, None)
