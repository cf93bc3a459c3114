"""What servers cost: billing intervals, the month's spend, one server's spend, the budget.

Every change of a server's billing state closes its open :class:`ServerBilling` interval
and opens one at the provider's rate for the new state; spend is the sum of the intervals'
hours times their rate.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from core.db.models import Server, ServerBilling
from core.errors import BudgetExceeded
from core.providers import provider_for
from core.servers.context import ServerContext
from core.servers.registry import ServerView


def month_start(now: dt.datetime) -> dt.datetime:
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def interval_cost(interval: ServerBilling, since: dt.datetime | None, now: dt.datetime) -> float:
    """$ spent in one interval after ``since`` (all of it when None), up to ``now``."""
    start = max(interval.started_at, since) if since else interval.started_at
    end = interval.ended_at or now
    hours = max((end - start).total_seconds(), 0.0) / 3600
    return hours * interval.price_per_hour


@dataclass(frozen=True, slots=True)
class SpendReport:
    """What /server list shows about money."""

    month: float
    budget: float | None
    by_server: dict[int, float]

    def spent(self, server_id: int) -> float:
        """$ spent on a server so far; 0 for servers that do not bill."""
        return self.by_server.get(server_id, 0.0)


class Billing:
    def __init__(self, ctx: ServerContext) -> None:
        self._ctx = ctx

    async def month_spend(self, now: dt.datetime | None = None) -> float:
        now = now or self._ctx.clock()
        start = month_start(now)
        async with self._ctx.sessions() as session:
            intervals = (
                await session.scalars(
                    select(ServerBilling).where(
                        (ServerBilling.ended_at.is_(None)) | (ServerBilling.ended_at > start)
                    )
                )
            ).all()
        return sum(interval_cost(i, start, now) for i in intervals)

    async def server_spend(self, server_id: int, now: dt.datetime | None = None) -> float:
        now = now or self._ctx.clock()
        async with self._ctx.sessions() as session:
            intervals = (
                await session.scalars(
                    select(ServerBilling).where(ServerBilling.server_id == server_id)
                )
            ).all()
        return sum(interval_cost(i, None, now) for i in intervals)

    async def report(self, servers: Iterable[ServerView]) -> SpendReport:
        """The month's spend, the budget, and what each server that bills has cost."""
        month = await self.month_spend()
        by_server = {s.id: await self.server_spend(s.id) for s in servers if provider_for(s).bills}
        return SpendReport(month, self._ctx.settings.costs.monthly_budget, by_server)

    async def check_budget(self, price_per_hour: float, what: str) -> float:
        """Refuse when this month's spend plus one hour at ``price_per_hour`` would pass the
        budget. Returns the month's spend so far."""
        spent = await self.month_spend()
        budget = self._ctx.settings.costs.monthly_budget
        if budget is not None and spent + price_per_hour > budget:
            raise BudgetExceeded(
                f"{what} would exceed the monthly budget: ${spent:.2f} spent of "
                f"${budget:.2f} this month, and this server costs ${price_per_hour:.3f}/h."
            )
        return spent

    async def open_interval(self, session: Any, server: Server, state: str) -> None:
        """Close the server's open billing interval and open one for ``state``."""
        now = self._ctx.clock()
        current = (
            await session.scalars(
                select(ServerBilling)
                .where(ServerBilling.server_id == server.id)
                .where(ServerBilling.ended_at.is_(None))
            )
        ).first()
        rate = provider_for(server).rate(state, server.price_per_hour)
        if current is not None:
            if current.state == state and current.price_per_hour == rate:
                return
            current.ended_at = now
        if state != "destroyed":
            session.add(
                ServerBilling(server_id=server.id, state=state, price_per_hour=rate, started_at=now)
            )
