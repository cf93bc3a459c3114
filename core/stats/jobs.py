"""Job statistics for /stats: pure aggregation over the few columns a report needs.

The loader selects columns, never whole generation rows (only core/generation/store.py
loads those); everything else here is a pure function of the loaded tuples, so tests feed
it rows straight from a SQLite database.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import select

from core.db.engine import SessionFactory
from core.db.models import ComfyGeneration, GenerationStatus

PERIODS: dict[str, dt.timedelta] = {
    "day": dt.timedelta(days=1),
    "week": dt.timedelta(days=7),
    "month": dt.timedelta(days=30),
}
# How many error causes and users a report keeps; the rest are summed as "other".
TOP_CAUSES = 6
TOP_USERS = 10
CAUSE_CHARS = 80

_ACTIVE = {
    GenerationStatus.PENDING.value,
    GenerationStatus.QUEUED.value,
    GenerationStatus.RUNNING.value,
    GenerationStatus.UPLOADING.value,
}


@dataclass(frozen=True, slots=True)
class JobRow:
    user_id: int
    server_id: int | None
    status: str
    error: str | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    completed_at: dt.datetime | None
    images: int

    @property
    def wait_seconds(self) -> float | None:
        """Queue wait: from the request until the server started it."""
        if self.started_at is None:
            return None
        return max((self.started_at - self.created_at).total_seconds(), 0.0)

    @property
    def run_seconds(self) -> float | None:
        """Run time of a completed job: from its start to its images."""
        if self.status != GenerationStatus.COMPLETED.value:
            return None
        if self.started_at is None or self.completed_at is None:
            return None
        return max((self.completed_at - self.started_at).total_seconds(), 0.0)


@dataclass(frozen=True, slots=True)
class JobSummary:
    total: int
    completed: int
    failed: int
    cancelled: int
    active: int
    images: int
    causes: list[tuple[str, int]]
    wait_p50: float | None
    wait_p95: float | None
    run_p50: float | None
    run_p95: float | None

    @property
    def finished(self) -> int:
        return self.completed + self.failed

    @property
    def success_rate(self) -> float | None:
        """Completed share of the jobs that ended by themselves (cancellations excluded)."""
        return self.completed / self.finished if self.finished else None

    @property
    def error_rate(self) -> float | None:
        return self.failed / self.finished if self.finished else None


@dataclass(frozen=True, slots=True)
class UserSummary:
    user_id: int
    jobs: int
    completed: int
    failed: int
    images: int


@dataclass(frozen=True, slots=True)
class Bucket:
    start: dt.datetime
    completed: int
    failed: int
    cancelled: int


async def load_jobs(
    sessions: SessionFactory, guild_id: int | None, since: dt.datetime
) -> list[JobRow]:
    """This guild's jobs requested since ``since`` (columns only)."""
    g = ComfyGeneration
    stmt = select(
        g.user_id, g.server_id, g.status, g.error_message, g.created_at, g.started_at,
        g.completed_at, g.image_urls,
    ).where(g.created_at >= since)
    stmt = stmt.where(g.guild_id == guild_id) if guild_id is not None else stmt
    async with sessions() as session:
        rows = (await session.execute(stmt)).all()
    return [
        JobRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], len(r[7] or [])) for r in rows
    ]


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100), linear between closest ranks; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


_NUMBERS = re.compile(r"\d+")


def error_cause(message: str | None) -> str:
    """A failure's cause for grouping: its first line with numbers (ids, ports, sizes)
    replaced, so the same fault on different jobs counts once."""
    if not message or not message.strip():
        return "unknown"
    line = message.strip().splitlines()[0]
    line = _NUMBERS.sub("N", line)
    return line if len(line) <= CAUSE_CHARS else line[: CAUSE_CHARS - 1] + "…"


def summarize(rows: Iterable[JobRow]) -> JobSummary:
    rows = list(rows)
    states = Counter(r.status for r in rows)
    causes = Counter(error_cause(r.error) for r in rows if r.status == "failed")
    top = causes.most_common(TOP_CAUSES)
    rest = sum(causes.values()) - sum(n for _, n in top)
    if rest:
        top.append(("other causes", rest))
    waits = [w for r in rows if (w := r.wait_seconds) is not None]
    runs = [t for r in rows if (t := r.run_seconds) is not None]
    return JobSummary(
        total=len(rows),
        completed=states["completed"],
        failed=states["failed"],
        cancelled=states["cancelled"],
        active=sum(n for s, n in states.items() if s in _ACTIVE),
        images=sum(r.images for r in rows if r.status == "completed"),
        causes=top,
        wait_p50=percentile(waits, 50),
        wait_p95=percentile(waits, 95),
        run_p50=percentile(runs, 50),
        run_p95=percentile(runs, 95),
    )


def per_user(rows: Iterable[JobRow], limit: int = TOP_USERS) -> list[UserSummary]:
    """The busiest users first (by jobs, then images)."""
    grouped: dict[int, list[JobRow]] = defaultdict(list)
    for r in rows:
        grouped[r.user_id].append(r)
    users = [
        UserSummary(
            user_id=uid,
            jobs=len(jobs),
            completed=sum(1 for j in jobs if j.status == "completed"),
            failed=sum(1 for j in jobs if j.status == "failed"),
            images=sum(j.images for j in jobs if j.status == "completed"),
        )
        for uid, jobs in grouped.items()
    ]
    users.sort(key=lambda u: (-u.jobs, -u.images, u.user_id))
    return users[:limit]


def bucket_size(period: dt.timedelta) -> dt.timedelta:
    """Hours for a day, days for longer periods."""
    return dt.timedelta(hours=1) if period <= dt.timedelta(days=1) else dt.timedelta(days=1)


def timeline(
    rows: Iterable[JobRow], since: dt.datetime, now: dt.datetime, step: dt.timedelta
) -> list[Bucket]:
    """Ended jobs per bucket of ``step`` from ``since`` to ``now`` (by request time)."""
    count = max(math.ceil((now - since) / step), 1)
    tallies = [Counter[str]() for _ in range(count)]
    for r in rows:
        index = int((r.created_at - since) / step)
        if 0 <= index < count:
            tallies[index][r.status] += 1
    return [
        Bucket(since + step * i, t["completed"], t["failed"], t["cancelled"])
        for i, t in enumerate(tallies)
    ]
