"""Reading and writing pool rows: pools, members, decisions (no policy here)."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import delete, select

from core.db.engine import SessionFactory
from core.db.models import ComfyGeneration, GenerationStatus, Server
from core.errors import NotFound
from core.pools.models import PLANNED, PoolDecision, PoolMember, ServerPool
from core.pools.types import DecisionView, PoolView

# How many finished jobs measure a pool's job time, and how far back they may lie.
SAMPLE_JOBS = 50
SAMPLE_WINDOW = dt.timedelta(days=1)


class PoolStore:
    def __init__(self, sessions: SessionFactory) -> None:
        self._sessions = sessions

    async def pools(self) -> list[PoolView]:
        async with self._sessions() as session:
            rows = (await session.scalars(select(ServerPool).order_by(ServerPool.name))).all()
            return [PoolView.of(r) for r in rows]

    async def get(self, name: str) -> PoolView:
        async with self._sessions() as session:
            row = (
                await session.scalars(select(ServerPool).where(ServerPool.name == name.lower()))
            ).first()
            if row is None:
                raise NotFound(f"No pool is called '{name}'.")
            return PoolView.of(row)

    async def member_ids(self, pool_id: int) -> list[int]:
        async with self._sessions() as session:
            return list(
                (
                    await session.scalars(
                        select(PoolMember.server_id).where(PoolMember.pool_id == pool_id)
                    )
                ).all()
            )

    async def pool_of(self, server_id: int) -> int | None:
        async with self._sessions() as session:
            member = await session.get(PoolMember, server_id)
            return member.pool_id if member else None

    async def add_member(self, pool_id: int, server_id: int, idle_timeout: int) -> None:
        """Join (or move to) a pool; the member's idle autostop becomes the pool's."""
        async with self._sessions.begin() as session:
            member = await session.get(PoolMember, server_id)
            if member is None:
                session.add(PoolMember(server_id=server_id, pool_id=pool_id))
            else:
                member.pool_id = pool_id
            server = await session.get(Server, server_id)
            if server is not None:
                server.idle_timeout = idle_timeout

    async def set_idle(self, server_id: int, minutes: int) -> None:
        async with self._sessions.begin() as session:
            server = await session.get(Server, server_id)
            if server is not None and server.idle_timeout != minutes:
                server.idle_timeout = minutes

    async def job_times(self, server_ids: list[int], since: dt.datetime) -> list[dt.datetime]:
        """When the jobs placed on these servers since ``since`` were submitted, oldest
        first (the pool's recent demand)."""
        if not server_ids:
            return []
        async with self._sessions() as session:
            return list(
                (
                    await session.scalars(
                        select(ComfyGeneration.created_at)
                        .where(ComfyGeneration.server_id.in_(server_ids))
                        .where(ComfyGeneration.created_at > since)
                        .order_by(ComfyGeneration.created_at)
                    )
                ).all()
            )

    async def job_seconds(self, server_ids: list[int], now: dt.datetime) -> float | None:
        """Mean run time of the latest finished jobs on these servers; None without any."""
        if not server_ids:
            return None
        async with self._sessions() as session:
            rows = (
                await session.execute(
                    select(ComfyGeneration.started_at, ComfyGeneration.completed_at)
                    .where(ComfyGeneration.server_id.in_(server_ids))
                    .where(ComfyGeneration.status == GenerationStatus.COMPLETED.value)
                    .where(ComfyGeneration.completed_at > now - SAMPLE_WINDOW)
                    .order_by(ComfyGeneration.completed_at.desc())
                    .limit(SAMPLE_JOBS)
                )
            ).all()
        spans = [
            (done - started).total_seconds() for started, done in rows if started and done
        ]
        spans = [s for s in spans if s > 0]
        return sum(spans) / len(spans) if spans else None

    # ------------------------------------------------------------------ decisions

    async def plan(self, pool_id: int, action: str, reason: str, server_name: str | None,
                   now: dt.datetime, *, state: str = PLANNED) -> DecisionView:
        """Write a decision before acting on it; a rent's server is named after its id."""
        async with self._sessions.begin() as session:
            row = PoolDecision(
                pool_id=pool_id, action=action, reason=reason, state=state,
                server_name=server_name, created_at=now,
            )
            session.add(row)
            await session.flush()
            if action == "rent" and server_name is None:
                pool = await session.get(ServerPool, pool_id)
                assert pool is not None
                row.server_name = f"{pool.name}-{row.id}"
            return _view(row)

    async def settle(self, decision_id: int, state: str, detail: str | None = None) -> bool:
        """Move a planned decision to ``state``; False when it was settled already."""
        async with self._sessions.begin() as session:
            row = await session.get(PoolDecision, decision_id)
            if row is None or row.state != PLANNED:
                return False
            row.state, row.detail = state, detail[:500] if detail else None
            return True

    async def planned(self) -> list[tuple[int, DecisionView]]:
        async with self._sessions() as session:
            rows = (
                await session.scalars(select(PoolDecision).where(PoolDecision.state == PLANNED))
            ).all()
            return [(r.pool_id, _view(r)) for r in rows]

    async def decisions(self, pool_id: int, limit: int = 10) -> list[DecisionView]:
        async with self._sessions() as session:
            rows = (
                await session.scalars(
                    select(PoolDecision)
                    .where(PoolDecision.pool_id == pool_id)
                    .order_by(PoolDecision.id.desc())
                    .limit(limit)
                )
            ).all()
            return [_view(r) for r in rows]

    async def remove(self, pool_id: int) -> None:
        async with self._sessions.begin() as session:
            await session.execute(delete(PoolMember).where(PoolMember.pool_id == pool_id))
            await session.execute(delete(PoolDecision).where(PoolDecision.pool_id == pool_id))
            await session.execute(delete(ServerPool).where(ServerPool.id == pool_id))


def _view(row: PoolDecision) -> DecisionView:
    return DecisionView(
        row.id, row.action, row.server_name, row.reason, row.state, row.created_at
    )
