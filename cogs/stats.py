"""/stats and /budget: what the team generated, how fast, how well, and what it cost."""

from __future__ import annotations

import io

import discord
from discord import app_commands
from discord.ext import commands

from bot.checks import admin_only, is_admin_member
from bot.context import BotContext
from bot.rendering import BRAND_COLOUR, fit_embed, human_duration, timestamp
from core.stats import BudgetReport, StatsReport
from core.stats.charts import budget_chart, render, stats_chart

PERIOD_CHOICES = [
    app_commands.Choice(name="last 24 hours", value="day"),
    app_commands.Choice(name="last 7 days", value="week"),
    app_commands.Choice(name="last 30 days", value="month"),
]
FIELD_LINES = 10  # rows per list field; the rest are summarised in one line


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f} %"


def _secs(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.1f}s" if value < 60 else human_duration(value)


def _safe(text: str) -> str:
    """Text from job rows (error messages) quoted without markdown or mentions."""
    return discord.utils.escape_mentions(discord.utils.escape_markdown(text))


def _lines(rows: list[str], empty: str) -> str:
    if not rows:
        return empty
    shown = rows[:FIELD_LINES]
    if len(rows) > FIELD_LINES:
        shown.append(f"… and {len(rows) - FIELD_LINES} more")
    return "\n".join(shown)


def stats_embed(report: StatsReport) -> discord.Embed:
    jobs = report.jobs
    embed = discord.Embed(
        title=f"Stats, last {report.period}",
        description=(
            f"Since {timestamp(report.since, 'f')}: **{jobs.total}** jobs, "
            f"{jobs.completed} completed, {jobs.failed} failed, {jobs.cancelled} cancelled, "
            f"{jobs.active} in progress; {jobs.images} images."
        ),
        colour=BRAND_COLOUR,
    )
    embed.add_field(name="Success rate", value=_pct(jobs.success_rate))
    embed.add_field(name="Error rate", value=_pct(jobs.error_rate))
    ipd = report.images_per_dollar
    embed.add_field(
        name="Images per $", value="–" if ipd is None else f"{ipd:.1f} (${report.spend:.2f})"
    )
    embed.add_field(name="Queue wait p50 / p95", value=f"{_secs(jobs.wait_p50)} / "
                    f"{_secs(jobs.wait_p95)}")
    embed.add_field(name="Run time p50 / p95", value=f"{_secs(jobs.run_p50)} / "
                    f"{_secs(jobs.run_p95)}")
    if jobs.causes:
        embed.add_field(
            name="Errors by cause",
            value=_lines([f"{n}× {_safe(c)}" for c, n in jobs.causes], "none"),
            inline=False,
        )
    embed.add_field(
        name="Server utilisation (busy share of billed time)",
        value=_lines(
            [
                f"**{_safe(s.name)}**: {_pct(s.utilisation)} of "
                f"{human_duration(s.billed_seconds)}, ${s.spend:.2f}"
                for s in report.servers
            ],
            "No server billed in this period.",
        ),
        inline=False,
    )
    if report.users is not None:
        embed.add_field(
            name="Per user",
            value=_lines(
                [
                    f"<@{u.user_id}>: {u.jobs} jobs, {u.completed} done, {u.failed} failed, "
                    f"{u.images} images"
                    for u in report.users
                ],
                "No jobs.",
            ),
            inline=False,
        )
    embed.set_footer(text="Jobs of this server (guild); spend and utilisation cover every "
                     "GPU server the bot runs.")
    return fit_embed(embed)


def budget_embed(report: BudgetReport) -> discord.Embed:
    budget = "no budget set" if report.budget is None else f"${report.budget:.2f}"
    lines = [
        f"Month to date: **${report.month_to_date:.2f}** of {budget}",
        f"Billing now: ${report.rate:.3f}/h",
        f"Forecast to month end at this rate: **${report.forecast:.2f}**",
    ]
    if report.remaining is not None:
        lines.append(f"Remaining: ${report.remaining:.2f}")
        if report.budget is not None and report.forecast > report.budget:
            runs_out = report.runs_out_at
            when = f", spent {timestamp(runs_out)}" if runs_out is not None else ""
            lines.append(f"⚠️ The forecast passes the budget{when}.")
    embed = discord.Embed(
        title=f"Budget, {report.now:%B %Y}", description="\n".join(lines), colour=BRAND_COLOUR
    )
    embed.add_field(
        name="Per server (month, rate now)",
        value=_lines(
            [f"**{_safe(s.name)}**: ${s.month:.2f}, ${s.rate:.3f}/h" for s in report.servers],
            "Nothing billed this month.",
        ),
        inline=False,
    )
    if report.pools is not None:
        embed.add_field(
            name="Per pool (month, rate now)",
            value=_lines(
                [f"**{_safe(p)}**: ${m:.2f}, ${r:.3f}/h" for p, m, r in report.pools],
                "No pools.",
            ),
            inline=False,
        )
    embed.set_footer(text="UTC month; stopped rented servers still bill their disk.")
    return fit_embed(embed)


class Stats(commands.Cog):
    def __init__(self, bot: BotContext) -> None:
        self.bot = bot

    @app_commands.command(name="stats", description="Jobs, speed, errors and server use.")
    @app_commands.describe(period="Which stretch of time (default: the last 7 days).")
    @app_commands.choices(period=PERIOD_CHOICES)
    @app_commands.guild_only()
    async def stats(
        self, interaction: discord.Interaction, period: app_commands.Choice[str] | None = None
    ) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        admin = is_admin_member(interaction, self.bot.services.settings)
        report = await self.bot.services.stats.stats(
            interaction.guild_id, period.value if period else "week", per_user_view=admin
        )
        png = await render(stats_chart, report)
        embed = stats_embed(report)
        embed.set_image(url="attachment://stats.png")
        await interaction.followup.send(
            embed=embed, file=discord.File(io.BytesIO(png), filename="stats.png"), ephemeral=True
        )

    @app_commands.command(name="budget", description="This month's spend, forecast and budget.")
    @admin_only()
    async def budget(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        report = await self.bot.services.stats.budget()
        png = await render(budget_chart, report)
        embed = budget_embed(report)
        embed.set_image(url="attachment://budget.png")
        await interaction.followup.send(
            embed=embed, file=discord.File(io.BytesIO(png), filename="budget.png"), ephemeral=True
        )


async def setup(bot: BotContext) -> None:
    await bot.add_cog(Stats(bot))


__all__ = ["Stats", "budget_embed", "stats_embed"]
