"""Discord-side rendering helpers: embeds, durations, progress bars, and Discord's limits.

Whatever the bot sends goes through these limits first: Discord refuses a whole message
(400, code 50035) when one part is too long, and a refused reply leaves the member on
"thinking..." for ever. So text is clipped where it is put together (``clip``, ``echo``) and
every message is fitted once more just before it is sent (``fit_content``, ``fit_embed``,
``fit_message``).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import discord

BRAND_COLOUR = discord.Colour(0x5865F2)
OK_COLOUR = discord.Colour.green()
ERROR_COLOUR = discord.Colour.red()

# Discord's limits, in characters (Message Resource: "Create Message" content 2000;
# "Embed Limits": title 256, description 4096, 25 fields, field name 256, field value
# 1024, footer text 2048, author name 256, 6000 in all over a message's embeds).
CONTENT_LIMIT = 2000
TITLE_LIMIT = 256
DESCRIPTION_LIMIT = 4096
FIELD_COUNT_LIMIT = 25
FIELD_NAME_LIMIT = 256
FIELD_VALUE_LIMIT = 1024
FOOTER_LIMIT = 2048
AUTHOR_LIMIT = 256
EMBED_TOTAL_LIMIT = 6000
# Autocomplete choices: name 1-100, value at most 100 (Application Command Option Choice).
CHOICE_LIMIT = 100
# How much of one value a member typed is quoted back in a sentence.
ECHO_LIMIT = 100

ELLIPSIS = "…"


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
    """``text`` in at most ``limit`` characters (an ellipsis marks a cut)."""
    if len(text) <= limit:
        return text
    return text[: max(limit - 1, 0)] + ELLIPSIS if limit > 0 else ""


clip = truncate


def echo(value: object, limit: int = ECHO_LIMIT) -> str:
    """A value a member typed (or a remote server sent), fit to be quoted in a reply."""
    return truncate(str(value), limit)


def fit_content(text: str | None) -> str | None:
    """Message content within Discord's 2000 characters."""
    return None if text is None else truncate(text, CONTENT_LIMIT)


def _text_size(embed: discord.Embed) -> int:
    size = len(embed.title or "") + len(embed.description or "")
    size += len(embed.footer.text or "") + len(embed.author.name or "")
    return size + sum(len(f.name or "") + len(f.value or "") for f in embed.fields)


def fit_embed(embed: discord.Embed, budget: int = EMBED_TOTAL_LIMIT) -> discord.Embed:
    """Clip every part of ``embed`` to Discord's limits, in place, and return it.

    Fields past 25 are dropped; an empty field name or value (Discord requires both) gets a
    dash. When the total passes ``budget`` (6000, shared by a message's embeds), the
    description, then the longest field values are shortened, and fields are dropped from
    the end as a last resort.
    """
    if embed.title:
        embed.title = truncate(embed.title, TITLE_LIMIT)
    if embed.description:
        embed.description = truncate(embed.description, DESCRIPTION_LIMIT)
    if embed.footer.text:
        embed.set_footer(text=truncate(embed.footer.text, FOOTER_LIMIT),
                         icon_url=embed.footer.icon_url)
    if embed.author.name:
        embed.set_author(name=truncate(embed.author.name, AUTHOR_LIMIT), url=embed.author.url,
                         icon_url=embed.author.icon_url)
    fields = [(truncate(f.name or "-", FIELD_NAME_LIMIT) or "-",
               truncate(f.value or "-", FIELD_VALUE_LIMIT) or "-", bool(f.inline))
              for f in embed.fields[:FIELD_COUNT_LIMIT]]
    embed.clear_fields()
    for name, value, inline in fields:
        embed.add_field(name=name, value=value, inline=inline)
    excess = _text_size(embed) - budget
    if excess > 0 and embed.description:
        keep = max(len(embed.description) - excess, 0)
        embed.description = truncate(embed.description, keep) or None
        excess = _text_size(embed) - budget
    while excess > 0 and embed.fields:
        index, longest = max(enumerate(embed.fields), key=lambda p: len(p[1].value or ""))
        value = longest.value or ""
        if len(value) > 64:
            embed.set_field_at(index, name=longest.name or "-",
                               value=truncate(value, max(len(value) - excess, 64)),
                               inline=bool(longest.inline))
        else:
            embed.remove_field(len(embed.fields) - 1)
        excess = _text_size(embed) - budget
    if excess > 0 and embed.title:
        embed.title = truncate(embed.title, max(len(embed.title) - excess, 1))
        excess = _text_size(embed) - budget
    if excess > 0 and embed.footer.text:
        embed.set_footer(text=truncate(embed.footer.text, max(len(embed.footer.text) - excess, 1)),
                         icon_url=embed.footer.icon_url)
    return embed


def fit_message(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of a send or edit, with content and embeds within limits."""
    if isinstance(kwargs.get("content"), str):
        kwargs["content"] = fit_content(kwargs["content"])
    embeds = [kwargs["embed"]] if kwargs.get("embed") is not None else kwargs.get("embeds")
    if embeds:
        share = EMBED_TOTAL_LIMIT // len(embeds)
        for embed in embeds:
            fit_embed(embed, share)
    return kwargs


def status_post_refused(exc: discord.HTTPException) -> str:
    """What to tell a member whose status message Discord refused, by why it did."""
    if isinstance(exc, discord.Forbidden):
        return ("I can't post in this channel; check my Send Messages and Embed Links "
                "permissions.")
    if exc.status == 429:
        # discord.py gave up after its retries: the channel (or the bot) is over Discord's
        # rate limits, typically a burst of jobs; nothing is wrong with the permissions.
        return ("Discord is limiting how fast I can post in this channel right now; "
                "nothing was queued. Try again in a minute.")
    return f"Discord refused my status message (HTTP {exc.status}); nothing was queued."
