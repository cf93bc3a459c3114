"""Discord-side rendering helpers: embeds, durations, progress bars."""

from __future__ import annotations

import datetime as dt

import discord

BRAND_COLOUR = discord.Colour(0x5865F2)
OK_COLOUR = discord.Colour.green()
ERROR_COLOUR = discord.Colour.red()


def human_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    days, rem = divmod(seconds, 86400)
    hours, rem = divmod(rem, 3600)
    minutes, secs = divmod(rem, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def progress_bar(fraction: float, width: int = 20) -> str:
    fraction = min(max(fraction, 0.0), 1.0)
    filled = round(fraction * width)
    return "█" * filled + "░" * (width - filled)


def timestamp(value: dt.datetime | None, style: str = "R") -> str:
    return discord.utils.format_dt(value, style) if value else "never"


def truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
