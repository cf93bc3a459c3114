"""What a generation looks like on Discord: the status embed, the result embed, and how a
result's files are split into messages within Discord's limits."""

from __future__ import annotations

import io

import discord

from bot.rendering import (
    BRAND_COLOUR,
    ERROR_COLOUR,
    FIELD_VALUE_LIMIT,
    OK_COLOUR,
    echo,
    fit_embed,
    human_duration,
    progress_bar,
    truncate,
)
from core.generation import JobView
from core.images import ImageFile, fit_for_upload, make_grid

DEFAULT_UPLOAD_LIMIT = 10 * 1024 * 1024
STATUS_WORDS = {
    "pending": "Preparing",
    "queued": "Queued",
    "running": "Generating",
    "uploading": "Uploading",
    "completed": "Done",
    "failed": "Failed",
    "cancelled": "Cancelled",
}


def status_embed(job: JobView, *, preview_name: str | None = None) -> discord.Embed:
    title = f"{STATUS_WORDS.get(job.status, job.status)} · job #{job.id}"
    colour = ERROR_COLOUR if job.status in ("failed", "cancelled") else BRAND_COLOUR
    embed = discord.Embed(title=title, description=truncate(job.prompt, 300), colour=colour)
    lines: list[str] = []
    if job.status == "queued":
        position = job.queue_position
        lines.append(
            "Waiting in the server's queue"
            + (f": position {position + 1}" if position is not None else "")
        )
    if job.status in ("running", "uploading"):
        if job.current_node:  # a node id the server sent: untrusted, any length
            lines.append(f"Node: **{echo(job.current_node, 80)}**")
        if job.max_steps:
            step = job.step or 0
            pct = int(100 * step / job.max_steps)
            eta = f" · ETA {human_duration(job.eta_seconds)}" if job.eta_seconds else ""
            lines.append(
                f"`{progress_bar(step / job.max_steps)}` {step}/{job.max_steps} ({pct}%){eta}"
            )
    if job.status == "uploading":
        lines.append("Uploading the images…")
    if job.error:
        lines.append(f"**{truncate(job.error, 600)}**")
    if job.notice:
        lines.append(f"⚠️ {truncate(job.notice, 250)}")
    if lines:
        # One field value holds at most 1024 characters (Discord's embed limits).
        embed.add_field(
            name="Progress", value=truncate("\n".join(lines), FIELD_VALUE_LIMIT), inline=False
        )
    embed.set_footer(
        text=f"Job #{job.id} · {echo(job.server_name or 'no server')} · "
        f"requested by user {job.user_id}"
    )
    if preview_name:
        embed.set_image(url=f"attachment://{preview_name}")
    return fit_embed(embed)


def result_embed(job: JobView, image_name: str) -> discord.Embed:
    """The final state of a finished job: its status message becomes the result, so the
    title is the final status ("Done · job #N") and the image and settings come with it."""
    p = job.parameters
    description = truncate(job.prompt or "Upscale", 1000)
    if job.negative:
        description += f"\nNegative: {truncate(job.negative, 500)}"
    embed = discord.Embed(
        title=f"{STATUS_WORDS['completed']} · job #{job.id}",
        colour=OK_COLOUR,
        description=description,
    )
    fields = [
        ("Seed", str(p.get("seed"))),
        ("Model", p.get("model") or p.get("workflow") or p.get("upscale_model") or "?"),
        ("Size", f"{p.get('width')}×{p.get('height')}"),
        ("Steps", str(p.get("steps"))),
        ("CFG", f"{p.get('cfg')}"),
        ("Sampler", f"{p.get('sampler')} / {p.get('scheduler')}"),
    ]
    if p.get("lora"):
        fields.append(("LoRA", f"{p['lora']} ({p.get('lora_strength')})"))
    if p.get("kind") == "upscale":
        fields = [
            ("Upscaled with", str(p.get("upscale_model"))),
            ("From job", f"#{p.get('parent_id')}"),
        ]
    for name, value in fields:
        embed.add_field(name=name, value=truncate(value, 200))
    took = ""
    if job.started_at and job.completed_at:
        took = f" · {human_duration((job.completed_at - job.started_at).total_seconds())}"
    embed.set_footer(text=f"Job #{job.id} · {echo(job.server_name or '')}{took}")
    embed.set_image(url=f"attachment://{image_name}")
    return fit_embed(embed)


# Discord refuses a message with more than 10 attachments (Message Resource, "Create
# Message": "Up to 10 attachments"), so a batch is posted over several messages.
MAX_FILES_PER_MESSAGE = 10


def plan_upload(images: list[ImageFile], limit: int) -> tuple[list[list[ImageFile]], str]:
    """The messages to post (each at most 10 files and ``limit`` bytes) and the name of the
    file the result embed shows.

    One image goes alone. A batch gets a grid: the first message carries the grid and the
    first nine images, each later message ten more. Runs in a thread (Pillow work).
    """
    if len(images) == 1:
        files = fit_for_upload(images, limit)
        return [files], files[0].filename
    first = [make_grid(images), *images[: MAX_FILES_PER_MESSAGE - 1]]
    rest = images[MAX_FILES_PER_MESSAGE - 1 :]
    groups = [first] + [
        rest[k : k + MAX_FILES_PER_MESSAGE] for k in range(0, len(rest), MAX_FILES_PER_MESSAGE)
    ]
    messages = [fit_for_upload(group, limit) for group in groups]
    return messages, messages[0][0].filename


def files_of(images: list[ImageFile]) -> list[discord.File]:
    return [discord.File(io.BytesIO(f.data), filename=f.filename) for f in images]
