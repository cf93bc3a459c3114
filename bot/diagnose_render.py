"""The embed for /server diagnose: one field per check, pass/fail, and what to do."""

from __future__ import annotations

import discord

from bot.rendering import ERROR_COLOUR, OK_COLOUR, echo, fit_embed, truncate
from core.diagnostics import DiagnosticReport

ICONS = {True: "✅", False: "❌", None: "➖"}


def diagnosis_embed(report: DiagnosticReport) -> discord.Embed:
    """One field per check (at most 25), each value within 1024 characters and the whole
    embed within Discord's 6000: details come from the server and may be of any length."""
    failed = len(report.failed)
    if failed:
        title = f"{echo(report.server)}: {failed} problem{'s' if failed != 1 else ''} found"
    else:
        title = f"{echo(report.server)}: all checks passed"
    embed = discord.Embed(title=truncate(title, 256),
                          colour=ERROR_COLOUR if failed else OK_COLOUR)
    for check in report.checks[:25]:
        value = check.detail
        if check.hint and check.ok is not True:
            value += f"\n→ {check.hint}"
        embed.add_field(name=truncate(f"{ICONS[check.ok]} {check.name}", 256),
                        value=truncate(value, 1024) or "-", inline=False)
    embed.set_footer(text=f"{report.provider} server · checked in {report.seconds:.1f} s")
    return fit_embed(embed)
