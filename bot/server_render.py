"""The embeds and lines of /server: offers, the rent confirmation, the list, the status."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence

import discord

from bot.rendering import BRAND_COLOUR, echo, fit_embed, human_duration, timestamp, truncate
from core.comfy.client import QueueState, SystemStats
from core.providers.vast import Offer
from core.servers import ServerView
from core.servers.billing import SpendReport
from core.servers.service import RentPlan


def offer_line(index: int, offer: Offer) -> str:
    return (
        f"`{index}` **{offer.num_gpus}× {offer.gpu_name}** ({offer.gpu_ram_mb // 1024} GB) · "
        f"${offer.price_per_hour:.3f}/h · reliability {offer.reliability:.1%} · "
        f"↓{offer.inet_down:.0f} Mbps · {offer.location or '?'} · offer {offer.id}"
    )


def offers_embed(offers: Sequence[Offer]) -> discord.Embed:
    embed = discord.Embed(
        title="Vast.ai offers",
        description="\n".join(offer_line(i, o) for i, o in enumerate(offers[:10], start=1)),
        colour=BRAND_COLOUR,
    )
    embed.set_footer(
        text="Rent one with the buttons (a confirmation follows), "
        "or /server create offer_id:<id>."
    )
    return fit_embed(embed)


def plan_embed(plan: RentPlan, name: str) -> discord.Embed:
    o = plan.offer
    embed = discord.Embed(
        title=truncate(f"Rent {o.num_gpus}× {o.gpu_name} as '{name}'?", 256),
        colour=discord.Colour.orange(),
    )
    embed.add_field(name="GPU", value=f"{o.num_gpus}× {o.gpu_name}")
    embed.add_field(name="VRAM", value=f"{o.gpu_ram_mb // 1024} GB per GPU")
    embed.add_field(
        name="Price", value=f"${o.price_per_hour:.3f}/h (≈ ${o.price_per_hour * 24:.2f}/day)"
    )
    budget = f" of ${plan.budget:.2f}" if plan.budget is not None else ""
    embed.add_field(name="This month", value=f"${plan.month_spend:.2f} spent{budget}")
    embed.add_field(name="Where", value=o.location or "?")
    embed.add_field(name="Offer", value=str(o.id))
    embed.set_footer(text="It bills until stopped or destroyed; idle servers stop by themselves.")
    return fit_embed(embed)


def servers_embed(
    servers: Sequence[ServerView], jobs: Mapping[int, int], spend: SpendReport, now: dt.datetime
) -> discord.Embed:
    """/server list: one line per server, the month's spend in the footer."""
    lines = []
    for s in servers:
        uptime = ""
        if s.running_since and s.status == "running":
            uptime = " · up " + human_duration((now - s.running_since).total_seconds())
        price = f" · ${s.price_per_hour:.3f}/h" if s.price_per_hour else ""
        spent = spend.spent(s.id)
        spent_text = f" · ${spent:.2f} spent" if spent else ""
        lines.append(
            f"**{s.name}** ({s.provider}) · {s.status} · {s.gpu or 'GPU ?'}{price}{uptime}"
            f"{spent_text} · {jobs.get(s.id, 0)} job(s) · last used {timestamp(s.last_used_at)}"
        )
    embed = discord.Embed(
        title="Servers", description=truncate("\n".join(lines), 4000), colour=BRAND_COLOUR
    )
    embed.set_footer(
        text=f"This month: ${spend.month:.2f}"
        + (f" of a ${spend.budget:.2f} budget" if spend.budget is not None else "")
    )
    return fit_embed(embed)


def status_embed(view: ServerView) -> discord.Embed:
    """/server status: what the row says; ComfyUI's fields are added when it answers."""
    embed = discord.Embed(title=f"Server {echo(view.name)}", colour=BRAND_COLOUR)
    embed.add_field(name="Provider", value=view.provider)
    embed.add_field(name="State", value=view.status)
    if view.gpu:
        embed.add_field(name="GPU", value=echo(f"{view.gpu_count}× {view.gpu}", 1024))
    return fit_embed(embed)


def add_comfy_fields(embed: discord.Embed, stats: SystemStats, queue: QueueState) -> None:
    devices = (
        ", ".join(
            f"{d.name} ({d.vram_free // 2**20} / {d.vram_total // 2**20} MiB free)"
            for d in stats.devices
        )
        or "none reported"
    )
    # Both come from the server: any length.
    embed.add_field(name="ComfyUI", value=f"{echo(stats.comfyui_version)}, answering",
                    inline=False)
    embed.add_field(name="Devices", value=truncate(devices, 1000), inline=False)
    embed.add_field(
        name="Queue", value=f"{len(queue.running)} running, {len(queue.pending)} waiting"
    )
    fit_embed(embed)
