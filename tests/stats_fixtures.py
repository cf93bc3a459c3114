"""A month of servers, billing and jobs written straight into the database, for the stats
tests (unit and end to end)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from core.db.models import ComfyGeneration, Server, ServerBilling

UTC = dt.UTC
NOW = dt.datetime(2026, 3, 15, 12, 0, tzinfo=UTC)
GUILD = 111
OTHER_GUILD = 222


def at(day: int, hour: float = 0.0) -> dt.datetime:
    return dt.datetime(2026, 3, day, tzinfo=UTC) + dt.timedelta(hours=hour)


async def seed(sessions: Any, guild: int = GUILD, users: tuple[int, int] = (7, 8)) -> dict:
    """Two servers:

    - ``alpha`` ($0.50/h) loading from 10 March 00:00 for 1 h, running since (open);
    - ``beta`` ($1.00/h, Vast) running 28 Feb 00:00 to 2 March 00:00, then stopped at its
      disk rate $0.02/h (open).

    Jobs (last 24 h, all on alpha): four completed (2 images each), two failed with the same
    cause but different numbers, one cancelled, one queued; one completed job of another
    guild on alpha overlapping a guild job.
    """
    u1, u2 = users
    async with sessions.begin() as s:
        alpha = Server(provider="ssh", name="alpha", price_per_hour=0.5, status="running")
        beta = Server(provider="vast", name="beta", price_per_hour=1.0, status="stopped")
        s.add_all([alpha, beta])
        await s.flush()
        s.add_all([
            ServerBilling(server_id=alpha.id, state="loading", price_per_hour=0.5,
                          started_at=at(10), ended_at=at(10, 1)),
            ServerBilling(server_id=alpha.id, state="running", price_per_hour=0.5,
                          started_at=at(10, 1)),
            ServerBilling(server_id=beta.id, state="running", price_per_hour=1.0,
                          started_at=at(1) - dt.timedelta(days=1), ended_at=at(2)),
            ServerBilling(server_id=beta.id, state="stopped", price_per_hour=0.02,
                          started_at=at(2)),
        ])

        def job(user: int, status: str, created: dt.datetime, wait: float | None,
                run: float | None, *, error: str | None = None, images: int = 0,
                g: int = guild) -> ComfyGeneration:
            started = created + dt.timedelta(seconds=wait) if wait is not None else None
            done = started + dt.timedelta(seconds=run) if started and run is not None else None
            return ComfyGeneration(
                server_id=alpha.id, user_id=user, guild_id=g, prompt="p", status=status,
                created_at=created, started_at=started, completed_at=done,
                error_message=error, image_urls=[{"i": n} for n in range(images)],
            )

        base = at(15, 0)  # 12 h before NOW
        s.add_all([
            job(u1, "completed", base, 10, 600, images=2),
            job(u1, "completed", base + dt.timedelta(hours=1), 20, 600, images=2),
            job(u2, "completed", base + dt.timedelta(hours=2), 30, 600, images=2),
            job(u2, "completed", base + dt.timedelta(hours=3), 40, 600, images=2),
            job(u1, "failed", base + dt.timedelta(hours=4), 5, 60,
                error="ComfyUI on port 8188 refused job 17"),
            job(u1, "failed", base + dt.timedelta(hours=5), 5, 60,
                error="ComfyUI on port 9000 refused job 99\nmore detail"),
            job(u2, "cancelled", base + dt.timedelta(hours=6), None, None),
            job(u2, "queued", NOW - dt.timedelta(minutes=1), None, None),
            # Another guild: not in this guild's job counts, but alpha was busy for it.
            job(9, "completed", base + dt.timedelta(seconds=300), 0, 600, images=5,
                g=OTHER_GUILD),
            # Long ago: outside every period.
            job(u1, "completed", at(1), 1, 1, images=1),
        ])
    return {"alpha": alpha.id, "beta": beta.id}
