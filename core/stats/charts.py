"""PNG charts for /stats and /budget, drawn with matplotlib's Agg canvas.

Each chart builds its own ``Figure`` (no pyplot, whose global state is not thread-safe) so
it can be rendered in a worker thread; :func:`render` does that, keeping the event loop
free while matplotlib works (a chart takes tens of milliseconds). matplotlib itself is
imported on first use, in that worker thread too: its first import scans the system fonts,
which can take seconds, and must not stall the bot's start or its event loop.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from core.stats.service import StatsReport
from core.stats.spend import BudgetReport, month_end

if TYPE_CHECKING:
    from matplotlib.figure import Figure

T = TypeVar("T")
SIZE = (8.0, 4.5)  # inches; at 100 dpi an 800x450 PNG, well under Discord's upload limit
DPI = 100


def _figure() -> Figure:
    import matplotlib

    matplotlib.use("Agg")  # no display: never pick an interactive backend
    from matplotlib.figure import Figure

    return Figure(figsize=SIZE, layout="constrained")


def _integer_ticks() -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _png(fig: Figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=DPI)
    return out.getvalue()


def stats_chart(report: StatsReport) -> bytes:
    """Jobs per bucket (completed/failed/cancelled, stacked) and per-server utilisation."""
    fig = _figure()
    jobs_ax, use_ax = fig.subplots(1, 2, width_ratios=[2, 1])
    hourly = report.period == "day"
    labels = [b.start.strftime("%H:00" if hourly else "%m-%d") for b in report.timeline]
    xs = range(len(labels))
    done = [b.completed for b in report.timeline]
    failed = [b.failed for b in report.timeline]
    cancelled = [b.cancelled for b in report.timeline]
    jobs_ax.bar(xs, done, label="completed", color="#3ba55d")
    jobs_ax.bar(xs, failed, bottom=done, label="failed", color="#ed4245")
    jobs_ax.bar(
        xs, cancelled, bottom=[d + f for d, f in zip(done, failed, strict=True)],
        label="cancelled", color="#99aab5",
    )
    step = max(len(labels) // 8, 1)
    jobs_ax.set_xticks(list(xs)[::step], labels[::step], rotation=45, fontsize=8)
    jobs_ax.yaxis.set_major_locator(_integer_ticks())  # jobs come whole
    jobs_ax.set_title(f"Jobs per {'hour' if hourly else 'day'} (UTC)")
    jobs_ax.legend(fontsize=8)
    names = [s.name for s in report.servers[:8]]
    shares = [100 * (s.utilisation or 0.0) for s in report.servers[:8]]
    use_ax.barh(names or ["(none)"], shares or [0], color="#5865f2")
    use_ax.set_xlim(0, 100)
    use_ax.set_xlabel("% of billed time busy")
    use_ax.set_title("Server utilisation")
    return _png(fig)


def budget_chart(report: BudgetReport) -> bytes:
    """Spend per day this month, the running total, the forecast and the budget."""
    fig = _figure()
    ax = fig.subplots()
    days = [d.day for d, _ in report.daily]
    spend = [s for _, s in report.daily]
    ax.bar(days, spend, color="#5865f2", label="spend per day")
    ax.set_xlim(0.5, (month_end(report.now) - dt.timedelta(days=1)).day + 0.5)
    ax.set_xlabel(f"day of {report.now:%B %Y} (UTC)")
    ax.set_ylabel("$ per day")
    total = ax.twinx()
    running, cumulative = 0.0, []
    for s in spend:
        running += s
        cumulative.append(running)
    total.plot(days, cumulative, color="#3ba55d", marker="o", label="month to date")
    if days:
        last_day = (month_end(report.now) - report.now).days + days[-1]
        total.plot(
            [days[-1], last_day], [report.month_to_date, report.forecast],
            color="#faa61a", linestyle="--", label="forecast",
        )
    if report.budget is not None:
        total.axhline(report.budget, color="#ed4245", linestyle=":", label="budget")
    total.set_ylabel("$ this month")
    total.set_ylim(bottom=0)
    handles = ax.get_legend_handles_labels()
    more = total.get_legend_handles_labels()
    ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize=8, loc="upper left")
    ax.set_title("Spend this month")
    return _png(fig)


# matplotlib does not promise thread safety (shared font and text caches), so charts are
# drawn one at a time; each takes tens of milliseconds.
_DRAWING = threading.Lock()


def _draw(chart: Callable[[T], bytes], report: T) -> bytes:
    with _DRAWING:
        return chart(report)


async def render(chart: Callable[[T], bytes], report: T) -> bytes:
    """Draw in a worker thread so the event loop keeps serving Discord meanwhile."""
    return await asyncio.to_thread(_draw, chart, report)
