"""Scale-down: each running pool member's idle stop, from the pool's recent demand.

Placement packs jobs on the busiest server with room (core.generation.placement), so the
members that demand does not need get no work and go idle. Each autoscaler tick sets the
idle timeout of every running member: the pool's ``min`` cheapest never stop (0: else
autostop and the minimum would take turns stopping and starting the same server); as many
others as the last DEMAND_WINDOW's jobs kept busy, the most recently used first (those
placement packs on), keep the pool's idle timeout, so a server the recent rate of jobs
will need again soon is not stopped between two sessions; the surplus drains, stopping
after DRAIN_MINUTES idle.
"""

from __future__ import annotations

import datetime as dt
import math

from core.pools.store import PoolStore
from core.pools.types import PoolView
from core.servers.registry import ServerView

# A pool that has finished no job yet is assumed to take this long per job (seconds).
DEFAULT_JOB_SECONDS = 60.0
# The work of this last span says how many members demand keeps busy.
DEMAND_WINDOW = dt.timedelta(minutes=15)
# A surplus member stops after this many idle minutes (autostop's granularity).
DRAIN_MINUTES = 1


async def needed(store: PoolStore, members: list[ServerView], now: dt.datetime) -> int:
    """Servers the last DEMAND_WINDOW's jobs kept busy (at least one if any ran)."""
    ids = [s.id for s in members]
    jobs = await store.jobs_since(ids, now - DEMAND_WINDOW)
    if not jobs:
        return 0
    seconds = await store.job_seconds(ids, now) or DEFAULT_JOB_SECONDS
    return max(1, math.ceil(jobs * seconds / DEMAND_WINDOW.total_seconds()))


async def set_idle_stops(store: PoolStore, pool: PoolView, members: list[ServerView],
                         now: dt.datetime) -> None:
    ready = [s for s in members if s.is_ready]
    keep = sorted(ready, key=lambda s: (s.price_per_hour, s.id))[:pool.min_servers]
    busy = await needed(store, members, now)
    others = sorted((s for s in ready if s not in keep), key=_recency)
    warm = others[:max(busy - len(keep), 0)]
    for server in ready:
        minutes = (0 if server in keep else pool.idle_timeout if server in warm
                   else min(DRAIN_MINUTES, pool.idle_timeout))
        if server.idle_timeout != minutes:
            await store.set_idle(server.id, minutes)


def _recency(server: ServerView) -> tuple[float, float, int]:
    """The most recently used first, then the cheapest."""
    used = server.last_used_at or server.running_since
    return (-(used.timestamp() if used else 0.0), server.price_per_hour, server.id)
