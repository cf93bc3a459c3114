"""Money over time for /stats and /budget: per-server utilisation, the month's spend per
day and per server, the forecast at the current rate.

Every dollar figure comes from :func:`core.servers.billing.interval_cost` (the one place
that turns a billing interval into money); this module only asks it about windows.
"""

from __future__ import annotations

import calendar
import datetime as dt
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from sqlalchemy import select

from core.db.engine import SessionFactory
from core.db.models import ComfyGeneration, Server, ServerBilling
from core.servers.billing import interval_cost, month_start

# Billing states in which a server can do work; a stopped Vast instance bills its disk but
# cannot be busy, so that time is not in utilisation's denominator (it is in the spend).
WORKING_STATES = frozenset({"loading", "running"})

# Which pool each server belongs to (server id -> pool name). The pools package supplies
# it once pools exist (set StatsService.pool_of); without it, or while no server is in a
# pool, /budget shows no pool section.
PoolLookup = Callable[[], Awaitable[Mapping[int, str]]]


def window_cost(
    interval: ServerBilling, start: dt.datetime, end: dt.datetime, now: dt.datetime
) -> float:
    """$ an interval cost between ``start`` and ``end`` (``end`` <= ``now``)."""
    return max(interval_cost(interval, start, now) - interval_cost(interval, end, now), 0.0)


def billed_seconds(interval: ServerBilling, since: dt.datetime, now: dt.datetime) -> float:
    """Seconds of a working interval after ``since``: its cost over its rate."""
    if interval.state not in WORKING_STATES or interval.price_per_hour <= 0:
        return 0.0
    return interval_cost(interval, since, now) / interval.price_per_hour * 3600


def busy_seconds(
    spans: Iterable[tuple[dt.datetime, dt.datetime | None]], since: dt.datetime, now: dt.datetime
) -> float:
    """Seconds covered by at least one job span, clipped to [since, now]."""
    clipped = sorted(
        (max(start, since), min(end or now, now)) for start, end in spans
    )
    total, cur_start, cur_end = 0.0, None, None
    for start, end in clipped:
        if end <= start:
            continue
        if cur_end is None or start > cur_end:
            if cur_end is not None and cur_start is not None:
                total += (cur_end - cur_start).total_seconds()
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None and cur_start is not None:
        total += (cur_end - cur_start).total_seconds()
    return total


@dataclass(frozen=True, slots=True)
class ServerUse:
    server_id: int
    name: str
    billed_seconds: float
    busy_seconds: float
    spend: float

    @property
    def utilisation(self) -> float | None:
        """Busy share of the billed working time (None when it did not bill)."""
        if self.billed_seconds <= 0:
            return None
        return min(self.busy_seconds / self.billed_seconds, 1.0)


@dataclass(frozen=True, slots=True)
class ServerSpend:
    server_id: int
    name: str
    month: float
    rate: float  # $/h it bills right now


@dataclass(frozen=True, slots=True)
class BudgetReport:
    now: dt.datetime
    month_to_date: float
    rate: float  # $/h of everything billing now
    forecast: float  # month to date plus the current rate until the month ends
    budget: float | None
    servers: list[ServerSpend]
    pools: list[tuple[str, float, float]] | None  # (pool, month, rate); None without pools
    daily: list[tuple[dt.date, float]] = field(default_factory=list)

    @property
    def remaining(self) -> float | None:
        return None if self.budget is None else self.budget - self.month_to_date

    @property
    def runs_out_at(self) -> dt.datetime | None:
        """When the budget is spent at the current rate, if before the month ends."""
        remaining = self.remaining
        if remaining is None or self.rate <= 0:
            return None
        if remaining <= 0:
            return self.now
        when = self.now + dt.timedelta(hours=remaining / self.rate)
        return when if when < month_end(self.now) else None


def month_end(now: dt.datetime) -> dt.datetime:
    days = calendar.monthrange(now.year, now.month)[1]
    return month_start(now) + dt.timedelta(days=days)


async def load_intervals(sessions: SessionFactory, since: dt.datetime) -> list[ServerBilling]:
    """Billing intervals that were open at some time after ``since``."""
    async with sessions() as session:
        return list(
            (
                await session.scalars(
                    select(ServerBilling).where(
                        ServerBilling.ended_at.is_(None) | (ServerBilling.ended_at > since)
                    )
                )
            ).all()
        )


async def load_server_names(sessions: SessionFactory) -> dict[int, str]:
    async with sessions() as session:
        return {sid: name for sid, name in (await session.execute(select(Server.id, Server.name)))}


async def load_busy_spans(
    sessions: SessionFactory, since: dt.datetime
) -> dict[int, list[tuple[dt.datetime, dt.datetime | None]]]:
    """Every guild's job spans per server (a server bills for all of them)."""
    g = ComfyGeneration
    stmt = select(g.server_id, g.started_at, g.completed_at).where(
        g.server_id.is_not(None),
        g.started_at.is_not(None),
        g.completed_at.is_(None) | (g.completed_at > since),
    )
    async with sessions() as session:
        rows = (await session.execute(stmt)).all()
    spans: dict[int, list[tuple[dt.datetime, dt.datetime | None]]] = defaultdict(list)
    for server_id, started, completed in rows:
        spans[server_id].append((started, completed))
    return spans


def utilisation(
    intervals: Sequence[ServerBilling],
    spans: Mapping[int, Sequence[tuple[dt.datetime, dt.datetime | None]]],
    names: Mapping[int, str],
    since: dt.datetime,
    now: dt.datetime,
) -> list[ServerUse]:
    """Per server that billed in the period: billed working time, busy time, spend."""
    billed: dict[int, float] = defaultdict(float)
    spent: dict[int, float] = defaultdict(float)
    for i in intervals:
        billed[i.server_id] += billed_seconds(i, since, now)
        spent[i.server_id] += interval_cost(i, since, now)
    uses = [
        ServerUse(
            server_id=sid,
            name=names.get(sid, f"#{sid}"),
            billed_seconds=billed[sid],
            busy_seconds=busy_seconds(spans.get(sid, ()), since, now),
            spend=spent[sid],
        )
        for sid in spent
        if spent[sid] > 0 or billed[sid] > 0
    ]
    uses.sort(key=lambda u: (-u.spend, u.name))
    return uses


def daily_spend(
    intervals: Sequence[ServerBilling], start: dt.datetime, now: dt.datetime
) -> list[tuple[dt.date, float]]:
    """$ per UTC day from ``start`` (a midnight) to today."""
    days: list[tuple[dt.date, float]] = []
    day = start
    while day < now:
        end = min(day + dt.timedelta(days=1), now)
        days.append((day.date(), sum(window_cost(i, day, end, now) for i in intervals)))
        day += dt.timedelta(days=1)
    return days


def budget_report(
    intervals: Sequence[ServerBilling],
    names: Mapping[int, str],
    budget: float | None,
    now: dt.datetime,
    pools: Mapping[int, str] | None = None,
) -> BudgetReport:
    start = month_start(now)
    month: dict[int, float] = defaultdict(float)
    rate: dict[int, float] = defaultdict(float)
    for i in intervals:
        month[i.server_id] += interval_cost(i, start, now)
        if i.ended_at is None:
            rate[i.server_id] += i.price_per_hour
    servers = [
        ServerSpend(sid, names.get(sid, f"#{sid}"), month[sid], rate[sid])
        for sid in set(month) | set(rate)
        if month[sid] > 0 or rate[sid] > 0
    ]
    servers.sort(key=lambda s: (-s.month, s.name))
    mtd = sum(month.values())
    now_rate = sum(rate.values())
    hours_left = max((month_end(now) - now).total_seconds(), 0.0) / 3600
    by_pool: list[tuple[str, float, float]] | None = None
    if pools:  # no section while no server is in a pool
        grouped: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for s in servers:
            entry = grouped[pools.get(s.server_id, "(no pool)")]
            entry[0] += s.month
            entry[1] += s.rate
        by_pool = sorted(((p, m, r) for p, (m, r) in grouped.items()), key=lambda x: -x[1])
    return BudgetReport(
        now=now,
        month_to_date=mtd,
        rate=now_rate,
        forecast=mtd + now_rate * hours_left,
        budget=budget,
        servers=servers,
        pools=by_pool,
        daily=daily_spend(intervals, start, now),
    )
