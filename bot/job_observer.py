"""How jobs look on Discord while they run and when they end (the job observer).

Progress goes to the status message through the relay (coalesced, within the channel's
edit budget). When the images are ready, the status message becomes the result: one edit
carries the images, the final embed and the result buttons, so a job costs one final edit
instead of a new post plus an edit (see bot/relay.py for the budget). The rest of a batch
over one message's 10 attachments follows as replies. Failures and cancellations are
final-state edits of the same message.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from typing import Any

import discord

from bot.context import BotContext
from bot.job_render import (
    DEFAULT_UPLOAD_LIMIT,
    MAX_FILES_PER_MESSAGE,
    STATUS_WORDS,
    files_of,
    plan_upload,
    result_embed,
    status_embed,
)
from bot.jobs import result_view
from bot.pings import ResultPings
from bot.relay import MessageRelay
from core.generation import GenerationFailed, JobObserver, JobView
from core.images import UPLOAD_MARGIN, ImageFile, ImageRejected, thumbnail

log = logging.getLogger(__name__)

# A result shown by editing the status message pings its member (a short reply) only when
# the job took at least this long from the command (see DiscordJobObserver._notify).
NOTIFY_AFTER = 60.0
# Seconds between edits of a status message while its job waits in line: a place in
# line moves with every job that ends ahead of it, and at 5 s those were half of a
# burst's edits; the start of the job is shown at once whatever this is.
QUEUED_INTERVAL = 10.0
# Bot-wide budgets that hold at any number of jobs (each edit and each thumbnail costs the
# bot CPU whatever route it takes): places in line shown per second across every waiting
# job, and preview thumbnails made per second across every running one. Below them each
# job keeps the pace above (10 s in line, a new preview with each progress edit); past
# them every job's interval stretches evenly, so none starves. At 2,000 jobs on 100
# servers, places in line were 70 % of the bot's edits and thumbnails a fifth of its CPU.
QUEUED_EDITS_PER_SECOND = 10.0
PREVIEWS_PER_SECOND = 20.0


def _part_marker(job_id: int) -> str:
    """How a later part of a batch's result begins (found again after a restart)."""
    return f"Job #{job_id}, part "


class DiscordJobObserver(JobObserver):
    """Renders job events into the status message and delivers results to the channel."""

    def __init__(self, bot: BotContext, relay: MessageRelay) -> None:
        self.bot = bot
        self.relay = relay
        # job id -> (number, bytes) of its newest preview, and the number last sent. Not
        # id(): a replaced preview is freed, and the next one often gets its address.
        self._previews: dict[int, tuple[int, bytes | memoryview]] = {}
        self._preview_sent: dict[int, int] = {}
        self._preview_count = 0
        self._preview_due: dict[int, float] = {}  # job id -> when a new thumbnail may go
        # Jobs last shown waiting in line, and running: what the budgets are shared by.
        self._waiting: set[int] = set()
        self._running: set[int] = set()
        self._ended: dict[int, None] = {}  # jobs whose end was shown (oldest first)
        self.pings = ResultPings(
            self._send_ping, lambda coro: bot.spawn(coro, name="result-ping"))
        self._results: dict[int, str] = {}  # job id -> jump URL of its result message
        self._in_place: set[int] = set()  # jobs whose status message became the result

    async def on_update(self, job: JobView, preview: bytes | memoryview | None) -> None:
        if job.message_id is None or job.channel_id is None or job.id in self._ended:
            return  # an update handled after the end: it would count the job again
        self.pings.seen(job.user_id, job.channel_id, job.id)
        if preview is not None:
            self._preview_count += 1
            self._previews[job.id] = (self._preview_count, preview)
        # A place in line changes each time a job ahead ends: with 25 jobs queued on a
        # server, most of a burst's edits were "#12 in line" becoming "#11". Shown less
        # often; a job that runs is shown every relay interval.
        if job.running:
            self._waiting.discard(job.id)
            self._running.add(job.id)
            interval = None
        else:  # waiting (again, after a failover)
            self._running.discard(job.id)
            self._waiting.add(job.id)
            interval = max(QUEUED_INTERVAL, len(self._waiting) / QUEUED_EDITS_PER_SECOND)
        self.relay.update(job.channel_id, job.message_id,
                          lambda: self._render_status(job.id), interval=interval)

    async def _render_status(self, job_id: int) -> dict[str, Any]:
        # Built when the edit is really sent: always the newest state and preview.
        job = await self.bot.services.generation.snapshot(job_id)
        # No view: an edit without components keeps the Cancel button posted with the
        # message (and building one per edit is most of an edit's garbage).
        kwargs: dict[str, Any] = {}
        number, preview = self._previews.get(job_id, (0, None))
        name = None
        if preview is not None:
            name = "preview.jpg"
            now = time.monotonic()
            if self._preview_sent.get(job_id) != number \
                    and now >= self._preview_due.get(job_id, 0.0):
                # Until the next is due the message keeps the thumbnail it has.
                self._preview_due[job_id] = now + len(self._running) / PREVIEWS_PER_SECOND
                try:
                    thumb = await asyncio.to_thread(thumbnail, preview)
                except ImageRejected as exc:
                    # An untrusted server's preview: not shown, the progress still is.
                    log.warning("preview of job %s refused: %s", job_id, exc)
                    self._previews.pop(job_id, None)
                    thumb, name = None, None
                if thumb is not None:
                    kwargs["attachments"] = [discord.File(io.BytesIO(thumb), filename=name)]
                self._preview_sent[job_id] = number
        kwargs["embed"] = status_embed(job, preview_name=name)
        return kwargs

    async def deliver(
        self, job: JobView, images: list[ImageFile], *, check_existing: bool = False
    ) -> None:
        """Show the result: the status message becomes it (one edit carrying the images,
        the final embed and the result buttons), the rest of a large batch as replies.

        One edit instead of a new post and a final-state edit: a busy channel has a budget
        of about one edit per second, and two messages per job cannot keep up with it. A
        status message that is gone or cannot be edited gets a new post instead."""
        # The result replaces the preview: not kept (~65 KB a job) through the upload.
        self._previews.pop(job.id, None)
        if job.channel_id is None:
            return
        channel = self.bot.get_partial_messageable(job.channel_id, guild_id=job.guild_id)
        existing, parts_posted = (
            await self._find_delivery(channel, job) if check_existing else (None, set())
        )
        if existing is not None and len(images) < MAX_FILES_PER_MESSAGE:
            self._delivered(job, existing)  # one message, already shown
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
            existing = await self._show_result(channel, job, messages[0], shown)
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
        self._delivered(job, existing)
        await self._notify(channel, job, existing)

    async def _show_result(
        self,
        channel: discord.PartialMessageable,
        job: JobView,
        files: list[ImageFile],
        shown: str,
    ) -> discord.PartialMessage | discord.Message:
        """The first message of the result: the status message edited into it, or a new
        post when it cannot be edited."""
        upscale = self.bot.services.generation.has_upscale_model(job.server_id)
        upscale = upscale and job.parameters.get("kind") != "upscale"
        content = f"<@{job.user_id}>"  # whose result it is (an edit never pings)
        if job.message_id is not None:

            async def result() -> dict[str, Any]:
                # Built at each try: a retried upload needs fresh file objects.
                return {
                    "content": content,
                    "embed": result_embed(job, shown),
                    "attachments": files_of(files),
                    "view": result_view(job.id, upscale=upscale),
                    "allowed_mentions": discord.AllowedMentions.none(),
                }

            # A final state of the relay: it goes before any progress edit of the channel.
            if await self.relay.finish(job.channel_id or channel.id, job.message_id, result):
                self._in_place.add(job.id)
                return channel.get_partial_message(job.message_id)
            log.info("job %s: status message not editable; posting the result", job.id)
        return await channel.send(
            content=content,
            embed=result_embed(job, shown),
            files=files_of(files),
            view=result_view(job.id, upscale=upscale),
            allowed_mentions=discord.AllowedMentions(users=True),
            # Discord drops a second message with the same nonce sent shortly after.
            nonce=f"cvjob{job.id}",
        )

    async def _notify(
        self,
        channel: discord.PartialMessageable,
        job: JobView,
        result: discord.PartialMessage | discord.Message,
    ) -> None:
        """Ping the member when a result shown by an edit took long: an edit does not
        notify, and a member who waited minutes has likely looked away; one who watched
        the status move for less than NOTIFY_AFTER sees it land. A ping per job would
        also spend the channel's message budget the results themselves need."""
        if job.id not in self._in_place or job.created_at is None:
            return
        waited = (discord.utils.utcnow() - job.created_at).total_seconds()
        if waited < NOTIFY_AFTER:
            return
        await self.pings.ready(job.user_id, channel.id, job.id, result)

    async def _send_ping(self, content: str, mention: discord.AllowedMentions,
                         result: discord.PartialMessage | discord.Message, job_id: int) -> None:
        route = self.relay.webhook_of(result.id)
        if route is not None and route.send is not None:
            # A followup of the member's interaction: the token's own bucket, not the
            # channel's message budget (a burst's results would queue behind pings).
            await route.send(content=content, allowed_mentions=mention, wait=True)
            return
        await result.channel.send(
            content=content,
            reference=result,
            mention_author=False,
            allowed_mentions=mention,
            nonce=f"cvjob{job_id}n",
        )

    def _delivered(
        self, job: JobView, message: discord.PartialMessage | discord.Message
    ) -> None:
        self._results[job.id] = message.jump_url
        if message.id == job.message_id:
            self._in_place.add(job.id)

    async def on_finished(self, job: JobView) -> None:
        """The final state of the status message: failed or cancelled; done with a link
        when the result had to be posted apart. A status message that became the result
        already shows its final state and is left alone (even if the job was cancelled
        meanwhile: the member keeps the images)."""
        link = self._results.pop(job.id, None)
        in_place = job.id in self._in_place
        self._in_place.discard(job.id)
        if not in_place and job.message_id is not None and job.channel_id is not None:
            await self.relay.finish(
                job.channel_id,
                job.message_id,
                lambda: self._render_final(job, f"Finished: {link}" if link else None),
            )
        self._forget(job.id)
        # The member's last job in flight here announces their results (bot/pings.py),
        # through this one's webhook if it is the newest result: dropped after.
        await self.pings.ended(job.user_id, job.channel_id, job.id)
        if job.message_id is not None:
            self.relay.drop_webhook(job.message_id)

    async def _render_final(self, job: JobView, link: str | None) -> dict[str, Any]:
        # The final view comes with the event: no database read for the last edit.
        embed = status_embed(job)
        if link:
            embed.add_field(name="Result", value=link, inline=False)
        return {"embed": embed, "attachments": [], "view": None}

    async def _find_delivery(
        self, channel: discord.PartialMessageable, job: JobView
    ) -> tuple[discord.Message | None, set[int]]:
        """The result already shown for this job (a restart mid-delivery): its status
        message in the final state, or a result posted apart; and the numbers of the
        batch's later parts already posted."""
        if job.message_id is None:
            return None, set()
        marker = f"Job #{job.id} "
        parts = _part_marker(job.id)
        found: discord.Message | None = None
        posted: set[int] = set()
        try:
            status = await channel.fetch_message(job.message_id)
            if status.attachments and any(
                (e.title or "").startswith(f"{STATUS_WORDS['completed']} ·")
                for e in status.embeds
            ):
                found = status  # the edit that made it the result went through
        except discord.NotFound:
            pass  # deleted: a result may have been posted apart (below)
        except discord.HTTPException as exc:
            log.warning("could not read the status message to check delivery: %s", exc)
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
        self._preview_due.pop(job_id, None)
        self._waiting.discard(job_id)
        self._running.discard(job_id)
        self._ended[job_id] = None
        if len(self._ended) > 10_000:
            del self._ended[next(iter(self._ended))]
