"""Scale-down: each running pool member's idle stop, from the pool's recent demand.

Placement packs jobs on the busiest server with room (core.generation.placement), so the
members that demand does not need get no work and go idle. Each autoscaler tick sets the
idle timeout of every running member:

- the pool's ``min`` cheapest never stop (0: else autostop and the minimum would take
  turns stopping and starting the same server);
- as many others as the last DEMAND_WINDOW's jobs kept busy, the most recently used first
  (those placement packs on), are warm: they stop after the pool's idle timeout; one of
  them (none if the ``min`` keeps one) waits longer while sessions keep coming (the
  hysteresis): when the last hour's sessions (jobs after a pause of SESSION_GAP) say the
  next one comes within HOLD_CAP with 95 % probability (three mean gaps), it waits that
  long, so a busy hour's short pauses do not stop the pool and make the next member wait
  a cold start;
- the surplus drains, stopping after DRAIN_MINUTES idle.
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
DRAIN_MINUTES = 2
# Sessions: a job submitted this long after the one before starts one.
SESSION_GAP = dt.timedelta(seconds=60)
SESSION_WINDOW = dt.timedelta(hours=1)
# The longest idle stop the session rate may ask of a warm member (minutes).
HOLD_CAP = 20


async def set_idle_stops(store: PoolStore, pool: PoolView, members: list[ServerView],
                         now: dt.datetime) -> None:
    ids = [s.id for s in members]
    times = await store.job_times(ids, now - SESSION_WINDOW)
    seconds = await store.job_seconds(ids, now) or DEFAULT_JOB_SECONDS
    plan = idle_stops(pool, members, needed(times, seconds, now), hold_minutes(times, now))
    for server in members:
        minutes = plan.get(server.id)
        if minutes is not None and server.idle_timeout != minutes:
            await store.set_idle(server.id, minutes)


def idle_stops(pool: PoolView, members: list[ServerView], busy: int,
               hold: int) -> dict[int, int]:
    """Each ready member's idle stop (minutes; 0 never) given the servers recent work
    kept ``busy`` and the session rate's ``hold``.

    The hold goes to one member only, the most recently used warm one, and to none when
    the pool's ``min`` keeps one running anyway: the next session (a few jobs) needs one
    server, and one warm server spares it the cold start. Its other warm members were
    there for sessions that overlapped; a gap that long means the overlap is over, and an
    overlap to come is the scale-up's (a start from stopped bills only ComfyUI's start-up).
    Held, each of them billed the whole gap (bench.costsim: the largest idle cost).
    """
    ready = [s for s in members if s.is_ready]
    keep = sorted(ready, key=lambda s: (s.price_per_hour, s.id))[:pool.min_servers]
    others = sorted((s for s in ready if s not in keep), key=_recency)
    warm = others[:max(busy - len(keep), 0)]
    held = warm[:1] if not keep else []
    plan: dict[int, int] = {}
    for server in ready:
        plan[server.id] = (0 if server in keep
                           else max(pool.idle_timeout, hold) if server in held
                           else pool.idle_timeout if server in warm
                           else min(DRAIN_MINUTES, pool.idle_timeout))
    return plan


def needed(times: list[dt.datetime], job_seconds: float, now: dt.datetime) -> int:
    """Servers the last DEMAND_WINDOW's jobs kept busy (at least one if any ran)."""
    jobs = sum(1 for t in times if t > now - DEMAND_WINDOW)
    if not jobs:
        return 0
    return max(1, math.ceil(jobs * job_seconds / DEMAND_WINDOW.total_seconds()))


def hold_minutes(times: list[dt.datetime], now: dt.datetime) -> int:
    """Minutes within which the next session comes with 95 % probability at the last
    hour's session rate (three mean gaps); 0 when that passes HOLD_CAP or too few."""
    sessions = sum(1 for before, t in zip([None, *times], times, strict=False)
                   if before is None or t - before >= SESSION_GAP)
    if sessions < 3:
        return 0
    minutes = math.ceil(3 * SESSION_WINDOW.total_seconds() / 60 / sessions)
    return minutes if minutes <= HOLD_CAP else 0


def _recency(server: ServerView) -> tuple[float, float, int]:
    """The most recently used first, then the cheapest."""
    seen = [t.timestamp() for t in (server.last_used_at, server.running_since) if t]
    return (-max(seen, default=0.0), server.price_per_hour, server.id)
