"""The facade /stats, /budget and the metrics endpoint call."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import func, select

from core.config import Settings
from core.db.engine import SessionFactory
from core.db.models import ComfyGeneration, Server, ServerBilling
from core.errors import ValidationFailed
from core.servers.billing import interval_cost, month_start
from core.stats.jobs import (
    PERIODS,
    Bucket,
    JobSummary,
    UserSummary,
    bucket_size,
    load_jobs,
    per_user,
    summarize,
    timeline,
)
from core.stats.spend import (
    BudgetReport,
    PoolLookup,
    ServerUse,
    budget_report,
    load_busy_spans,
    load_intervals,
    load_server_names,
    utilisation,
)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, slots=True)
class StatsReport:
    period: str
    since: dt.datetime
    now: dt.datetime
    jobs: JobSummary
    servers: list[ServerUse]
    spend: float  # every server's spend in the period
    users: list[UserSummary] | None  # admins only
    timeline: list[Bucket]

    @property
    def images_per_dollar(self) -> float | None:
        return self.jobs.images / self.spend if self.spend > 0 else None


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    jobs_by_state: dict[str, int]
    servers_by_state: dict[str, int]
    waits: list[float]  # queue wait of every job that started
    runs: list[float]  # run time of every completed job
    spend_total: float  # all time
    spend_month: float
    rate: float
    budget: float | None


class StatsService:
    def __init__(
        self, settings: Settings, sessions: SessionFactory,
        clock: Callable[[], dt.datetime] = _utcnow,
    ) -> None:
        self._settings = settings
        self._sessions = sessions
        self.clock = clock
        # Extension point for pools: a lookup of each server's pool, set by the wiring.
        self.pool_of: PoolLookup | None = None

    async def stats(self, guild_id: int | None, period: str, *, per_user_view: bool) -> StatsReport:
        if period not in PERIODS:
            raise ValidationFailed(f"Unknown period {period!r}; use one of {', '.join(PERIODS)}.")
        now = self.clock()
        since = now - PERIODS[period]
        rows = await load_jobs(self._sessions, guild_id, since)
        intervals = await load_intervals(self._sessions, since)
        spans = await load_busy_spans(self._sessions, since)
        names = await load_server_names(self._sessions)
        servers = utilisation(intervals, spans, names, since, now)
        return StatsReport(
            period=period,
            since=since,
            now=now,
            jobs=summarize(rows),
            servers=servers,
            spend=sum(s.spend for s in servers),
            users=per_user(rows) if per_user_view else None,
            timeline=timeline(rows, since, now, bucket_size(PERIODS[period])),
        )

    async def budget(self) -> BudgetReport:
        now = self.clock()
        intervals = await load_intervals(self._sessions, month_start(now))
        names = await load_server_names(self._sessions)
        pools = await self.pool_of() if self.pool_of is not None else None
        return budget_report(
            intervals, names, self._settings.costs.monthly_budget, now, pools=pools
        )

    async def snapshot(self) -> MetricsSnapshot:
        """Everything the Prometheus endpoint exposes, read in one go."""
        now = self.clock()
        g = ComfyGeneration
        async with self._sessions() as session:
            jobs = dict(
                (await session.execute(select(g.status, func.count()).group_by(g.status))).all()
            )
            by_state = select(Server.status, func.count()).group_by(Server.status)
            servers = dict((await session.execute(by_state)).all())
            times = (
                await session.execute(
                    select(g.status, g.created_at, g.started_at, g.completed_at).where(
                        g.started_at.is_not(None)
                    )
                )
            ).all()
            intervals = list((await session.scalars(select(ServerBilling))).all())
        waits = [max((s - c).total_seconds(), 0.0) for _, c, s, _ in times]
        runs = [
            max((e - s).total_seconds(), 0.0)
            for st, _, s, e in times
            if st == "completed" and e is not None
        ]
        start = month_start(now)
        return MetricsSnapshot(
            jobs_by_state={str(k): int(v) for k, v in jobs.items()},
            servers_by_state={str(k): int(v) for k, v in servers.items()},
            waits=waits,
            runs=runs,
            spend_total=sum(interval_cost(i, None, now) for i in intervals),
            spend_month=sum(interval_cost(i, start, now) for i in intervals),
            rate=sum(i.price_per_hour for i in intervals if i.ended_at is None),
            budget=self._settings.costs.monthly_budget,
        )
