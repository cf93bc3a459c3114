"""The Discord side of generations: launching jobs and their persistent buttons (how a
job's events are shown is bot/job_observer.py).

A job's status message is the public reply to the member's interaction (further jobs of
one interaction, such as variations, are its followups): Discord creates it with the
acknowledgement, and while the interaction's token lives (15 minutes) it is edited through
the interaction's webhook, whose rate-limit bucket is the token's own, not the channel's.
The message is the bot's, so after the token expires (or a restart) it is edited through
the channel like any other; it becomes the result.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import discord
from discord import ui

from bot.checks import actor_of
from bot.context import BotContext, bot_of
from bot.job_render import (
    STATUS_WORDS,
    status_embed,
)
from bot.relay import TOKEN_MARGIN
from bot.rendering import status_post_refused
from bot.tree import defer_public, public_reply_id, public_reply_shown, send_ephemeral
from bot.webhook_edit import webhook_editor
from core.errors import GENERIC_FAILURE, ComfyVastError
from core.generation import (
    GenerationRequest,
    InputImage,
    JobView,
)

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
        await defer_public(interaction)
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
        await defer_public(interaction)
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
        await defer_public(interaction)
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
    """Submit each request, show its status message, start it.

    The interaction must have been acknowledged with ``defer_public``: its reply becomes
    the first job's status message, followups the others'. Errors are ComfyVastErrors
    with a sentence.
    """
    gen = bot.services.generation
    channel = interaction.channel
    if channel is None or not hasattr(channel, "send"):
        raise ComfyVastError("Generations can only run in a text channel.")
    if len(requests) > 1:
        await gen.check_limits(requests[0].actor, len(requests))
    jobs: list[JobView] = []
    # The first job's status message is the reply: recorded with its row when Discord
    # named it (no second write to attach it).
    reply_id = public_reply_id(interaction)
    for request in requests:
        job = await gen.submit(request, message_id=None if jobs else reply_id)
        try:
            message, edit = await _show_status(interaction, job, first=not jobs)
        except discord.HTTPException as exc:
            await gen.abandon(job.id, "The status message could not be posted.")
            raise ComfyVastError(status_post_refused(exc)) from exc
        except BaseException:
            # A timeout, a dropped connection, a cancelled command: the job never runs, so
            # it must not hold one of its member's job slots.
            await asyncio.shield(gen.abandon(job.id, "The status message could not be posted."))
            raise
        public_reply_shown(interaction)
        lifetime = (interaction.expires_at - discord.utils.utcnow()).total_seconds()
        bot.relay.via_webhook(
            message.id,
            lane=("interaction", interaction.id),
            edit=edit,
            send=interaction.followup.send,
            lifetime=lifetime - TOKEN_MARGIN,
        )
        if (job.channel_id, job.message_id) != (message.channel.id, message.id):
            await gen.attach_message(job.id, message.channel.id, message.id)
        gen.start(job.id)
        jobs.append(job)
    return jobs


async def _show_status(
    interaction: discord.Interaction, job: JobView, *, first: bool
) -> tuple[discord.Message, Callable[..., Awaitable[Any]]]:
    """Post the status of ``job`` through the interaction's webhook: the reply for the
    first job, a followup for the others. Returns the message and how to edit it there."""
    kwargs: dict[str, Any] = {
        "embed": status_embed(job),
        "view": status_view(job.id),
        "allowed_mentions": discord.AllowedMentions.none(),
    }
    if first:
        message: discord.Message = await interaction.edit_original_response(**kwargs)
        return message, webhook_editor(interaction, None)
    message = await interaction.followup.send(wait=True, **kwargs)
    return message, webhook_editor(interaction, message.id)
