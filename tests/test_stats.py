"""core/stats: the aggregation against a real (SQLite) database, the charts and the
Prometheus exposition."""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path

import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from core.errors import ValidationFailed
from core.services import Services, build_services
from core.stats.charts import budget_chart, render, stats_chart
from core.stats.jobs import error_cause, percentile
from core.stats.metrics import exposition
from core.stats.spend import busy_seconds
from tests.conftest import make_settings
from tests.stats_fixtures import GUILD, NOW, OTHER_GUILD, at, seed


async def test_the_queries_work_on_both_backends(db_url: str, tmp_path: Path) -> None:
    """The column queries and the billing windows on SQLite and PostgreSQL alike."""
    services = await build_services(make_settings(tmp_path, database={"url": db_url}))
    try:
        await seed(services.sessions)
        services.stats.clock = lambda: NOW
        report = await services.stats.stats(GUILD, "day", per_user_view=True)
        assert (report.jobs.total, report.jobs.images) == (8, 8)
        assert report.servers[0].busy_seconds == pytest.approx(2810)
        budget = await services.stats.budget()
        assert budget.month_to_date == pytest.approx(66 + 24 + 13.5 * 24 * 0.02)
        snap = await services.stats.snapshot()
        assert snap.jobs_by_state["completed"] == 6 and len(snap.runs) == 6
    finally:
        await services.close()


@pytest.fixture
async def seeded(services: Services) -> Services:
    await seed(services.sessions)
    services.stats.clock = lambda: NOW
    services.server_ops.clock = lambda: NOW
    return services


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([], 50) is None
    assert percentile([4.0], 95) == 4.0
    assert percentile([10, 20, 30, 40], 50) == 25
    assert percentile([10, 20, 30, 40], 95) == pytest.approx(38.5)


def test_error_causes_group_by_first_line_without_numbers() -> None:
    assert error_cause("refused job 17 on 8188\nstack") == error_cause("refused job 9 on 22")
    assert error_cause(None) == "unknown"
    assert len(error_cause("x" * 500)) == 80


def test_busy_time_is_the_union_of_overlapping_spans() -> None:
    t0 = at(15)
    minutes = dt.timedelta(minutes=1)
    spans = [(t0, t0 + 10 * minutes), (t0 + 5 * minutes, t0 + 20 * minutes),
             (t0 + 30 * minutes, None), (t0 - 60 * minutes, t0 - 50 * minutes)]
    # 0-20 min and 30-40 min (open until now); the span before ``since`` is clipped away.
    assert busy_seconds(spans, t0, t0 + 40 * minutes) == 30 * 60


async def test_stats_for_a_day(seeded: Services) -> None:
    report = await seeded.stats.stats(GUILD, "day", per_user_view=True)
    jobs = report.jobs
    assert (jobs.total, jobs.completed, jobs.failed, jobs.cancelled, jobs.active) == (8, 4, 2, 1, 1)
    assert jobs.images == 8
    assert jobs.success_rate == pytest.approx(4 / 6)
    assert jobs.error_rate == pytest.approx(2 / 6)
    # Both failures are one cause: the numbers differ, the fault does not.
    assert jobs.causes == [("ComfyUI on port N refused job N", 2)]
    # Waits of started jobs: 10, 20, 30, 40, 5, 5 s; runs of completed jobs: 600 s.
    assert jobs.wait_p50 == pytest.approx(15.0)
    assert jobs.wait_p95 == pytest.approx(37.5)
    assert (jobs.run_p50, jobs.run_p95) == (600, 600)
    # alpha billed the whole day at $0.50/h and was busy 3 x 600 s + 2 x 60 s, plus the first
    # job (10-610 s) merged with the other guild's (300-900 s): 890 s, counted once.
    [alpha] = report.servers[:1]
    assert alpha.name == "alpha"
    assert alpha.billed_seconds == pytest.approx(24 * 3600)
    assert alpha.busy_seconds == pytest.approx(1800 + 120 + 890)
    assert alpha.utilisation == pytest.approx(2810 / (24 * 3600))
    # beta only billed its disk (stopped): money, but no working time.
    beta = next(s for s in report.servers if s.name == "beta")
    assert beta.billed_seconds == 0 and beta.utilisation is None
    assert beta.spend == pytest.approx(0.02 * 24)
    assert report.spend == pytest.approx(0.5 * 24 + 0.02 * 24)
    assert report.images_per_dollar == pytest.approx(8 / report.spend)
    assert report.users is not None
    assert [(u.user_id, u.jobs, u.completed, u.failed, u.images) for u in report.users] == [
        (7, 4, 2, 2, 4), (8, 4, 2, 0, 4)
    ]
    assert len(report.timeline) == 24
    assert sum(b.completed for b in report.timeline) == 4


async def test_stats_are_scoped_to_the_guild_and_period(seeded: Services) -> None:
    other = await seeded.stats.stats(OTHER_GUILD, "month", per_user_view=False)
    assert (other.jobs.total, other.jobs.images) == (1, 5)
    assert other.users is None
    month = await seeded.stats.stats(GUILD, "month", per_user_view=False)
    assert month.jobs.total == 9  # the job of 1 March is within 30 days
    assert len(month.timeline) == 30
    with pytest.raises(ValidationFailed):
        await seeded.stats.stats(GUILD, "year", per_user_view=False)


async def test_budget_reuses_billing_and_forecasts_at_the_current_rate(
    seeded: Services,
) -> None:
    seeded.settings.costs.monthly_budget = 200.0
    report = await seeded.stats.budget()
    # alpha: 5.5 days at $0.50/h = $66; beta: 1-2 March at $1/h = $24 plus 13.5 days of disk.
    beta_month = 24.0 + 13.5 * 24 * 0.02
    assert report.month_to_date == pytest.approx(66 + beta_month)
    # The same number as the spend arithmetic of core/servers/billing.py.
    assert report.month_to_date == pytest.approx(await seeded.server_ops.month_spend(NOW))
    assert report.rate == pytest.approx(0.52)
    hours_left = 16.5 * 24
    assert report.forecast == pytest.approx(report.month_to_date + 0.52 * hours_left)
    assert report.remaining == pytest.approx(200 - report.month_to_date)
    assert report.runs_out_at == NOW + dt.timedelta(hours=report.remaining / 0.52)
    by_name = {s.name: (s.month, s.rate) for s in report.servers}
    assert by_name["alpha"] == pytest.approx((66.0, 0.5))
    assert by_name["beta"] == pytest.approx((beta_month, 0.02))
    days = dict(report.daily)
    assert len(days) == 15
    assert days[dt.date(2026, 3, 1)] == pytest.approx(24.0)
    assert days[dt.date(2026, 3, 9)] == pytest.approx(0.48)
    assert days[dt.date(2026, 3, 10)] == pytest.approx(12.0 + 0.48)
    assert days[dt.date(2026, 3, 15)] == pytest.approx(6.0 + 0.24)
    assert sum(days.values()) == pytest.approx(report.month_to_date)
    assert report.pools is None


async def test_budget_groups_by_pool_once_a_lookup_is_plugged_in(seeded: Services) -> None:
    ids = {name: sid for sid, name in (await _names(seeded)).items()}

    async def pools() -> dict[int, str]:
        return {ids["alpha"]: "sdxl"}

    seeded.stats.pool_of = pools
    report = await seeded.stats.budget()
    assert report.pools is not None
    assert [p for p, _, _ in report.pools] == ["sdxl", "(no pool)"]
    assert report.pools[0][1:] == pytest.approx((66.0, 0.5))


async def _names(services: Services) -> dict[int, str]:
    from core.stats.spend import load_server_names

    return await load_server_names(services.sessions)


async def test_charts_are_pngs(seeded: Services) -> None:
    for period in ("day", "week"):
        report = await seeded.stats.stats(GUILD, period, per_user_view=False)
        png = await render(stats_chart, report)
        image = Image.open(io.BytesIO(png))
        assert image.format == "PNG" and image.size == (800, 450)
    seeded.settings.costs.monthly_budget = 150.0
    png = await render(budget_chart, await seeded.stats.budget())
    assert Image.open(io.BytesIO(png)).format == "PNG"


async def test_an_empty_database_still_reports_and_draws(services: Services) -> None:
    report = await services.stats.stats(GUILD, "day", per_user_view=True)
    assert report.jobs.total == 0 and report.jobs.success_rate is None
    assert report.images_per_dollar is None and report.servers == []
    assert Image.open(io.BytesIO(stats_chart(report))).format == "PNG"
    budget = await services.stats.budget()
    assert budget.month_to_date == 0 and budget.forecast == 0 and budget.runs_out_at is None
    assert Image.open(io.BytesIO(budget_chart(budget))).format == "PNG"


async def test_exposition_parses_as_prometheus_text(seeded: Services) -> None:
    seeded.settings.costs.monthly_budget = 200.0
    families = {
        f.name: f for f in text_string_to_metric_families(
            exposition(await seeded.stats.snapshot()).decode()
        )
    }
    jobs = {s.labels["state"]: s.value for s in families["comfyvast_jobs"].samples}
    assert jobs["completed"] == 6 and jobs["failed"] == 2 and jobs["queued"] == 1
    assert jobs["uploading"] == 0  # every state is present
    servers = {s.labels["state"]: s.value for s in families["comfyvast_servers"].samples}
    assert servers["running"] == 1 and servers["stopped"] == 1
    wait = {
        s.labels.get("le"): s.value
        for s in families["comfyvast_queue_wait_seconds"].samples
        if s.name.endswith("_bucket")
    }
    # Started jobs wait 10, 20, 30, 40, 5, 5, 0 (other guild) and 1 s (1 March).
    assert wait["5.0"] == 4 and wait["15.0"] == 5 and wait["+Inf"] == 8
    runs = {s.name: s.value for s in families["comfyvast_run_seconds"].samples
            if not s.name.endswith("_bucket")}
    assert runs["comfyvast_run_seconds_count"] == 6
    assert runs["comfyvast_run_seconds_sum"] == pytest.approx(5 * 600 + 1)
    spend = families["comfyvast_spend_dollars"].samples[0].value
    month = families["comfyvast_spend_month_dollars"].samples[0].value
    assert spend == pytest.approx(month + 24.0)  # beta's 28 February is not this month
    assert families["comfyvast_budget_month_dollars"].samples[0].value == 200.0


async def test_charts_render_off_the_event_loop_thread(seeded: Services) -> None:
    import threading

    report = await seeded.stats.stats(GUILD, "day", per_user_view=False)
    seen: list[int] = []

    def chart(r: object) -> bytes:
        seen.append(threading.get_ident())
        return stats_chart(r)  # type: ignore[arg-type]

    png = await render(chart, report)
    assert seen and seen[0] != threading.get_ident()
    assert png.startswith(b"\x89PNG")


def test_loading_the_bot_does_not_import_matplotlib() -> None:
    """matplotlib's first import scans the fonts (seconds on a cold cache); it happens in
    the chart worker thread, never while the bot loads its cogs on the event loop."""
    import subprocess
    import sys

    code = ("import sys, bot.bot, cogs.stats, core.stats.charts; "
            "sys.exit(3 if 'matplotlib' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
