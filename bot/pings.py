"""One ping for a member's run of long jobs, not one per job.

A result shown by editing the status message does not notify anyone, so a member whose job
took long is pinged when it lands (bot/job_observer.py). A member who sent ten jobs at
once would get ten pings a few seconds apart, and each is a request the bot makes: the
ping of a result waits while the same member has other jobs in progress (the database's
count, so jobs not shown yet count too), and the last of them to end pings once for all
of them, in each channel they were sent from. It waits at most PING_HOLD, so a job stuck
in line never holds back the news of the ones that are done.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import discord

log = logging.getLogger(__name__)

# The longest a ready result waits for the member's other jobs before it is announced.
PING_HOLD = 60.0
# Jobs named in one ping; the rest are counted.
MAX_NAMED = 10

# Sends the ping: (content, allowed mentions, newest result message, its job id).
Sender = Callable[[str, discord.AllowedMentions, Any, int], Awaitable[None]]
Key = tuple[int, int]  # (member id, channel id)


@dataclass
class _Ready:
    jobs: list[int] = field(default_factory=list)
    result: Any = None  # the newest result's message: the ping goes with it
    timer: asyncio.TimerHandle | None = None


class ResultPings:
    """Which jobs each member has in flight per channel, and the results not announced."""

    def __init__(
        self, send: Sender, spawn: Callable[[Coroutine[Any, Any, None]], object]
    ) -> None:
        self._send = send
        self._spawn = spawn
        self._in_flight: dict[Key, set[int]] = {}
        self._ready: dict[Key, _Ready] = {}
        # Jobs that ended: an update that comes after the end (a progress event handled
        # late) must not count the job in flight again and hold its member's pings.
        self._ended: dict[int, None] = {}

    def seen(self, user_id: int, channel_id: int, job_id: int) -> None:
        """The job is in flight (called with every update it gets: kept cheap)."""
        if job_id in self._ended:
            return
        jobs = self._in_flight.get((user_id, channel_id))
        if jobs is None:
            self._in_flight[(user_id, channel_id)] = {job_id}
        else:
            jobs.add(job_id)

    async def ready(self, user_id: int, channel_id: int, job_id: int, result: Any) -> None:
        """A long job's result is shown: ping now, or with the member's last job."""
        key = (user_id, channel_id)
        entry = self._ready.get(key)
        if entry is None:
            entry = self._ready[key] = _Ready()
            loop = asyncio.get_running_loop()
            entry.timer = loop.call_later(PING_HOLD, lambda: self._spawn(self._flush(key)))
        entry.jobs.append(job_id)
        entry.result = result
        if not self._in_flight.get(key, set()) - {job_id}:
            await self._flush(key)

    async def ended(self, user_id: int, channel_id: int | None, job_id: int) -> None:
        """The job ended (any way): the member's last job in flight sends the ping."""
        self._ended[job_id] = None
        if len(self._ended) > 10_000:
            del self._ended[next(iter(self._ended))]
        if channel_id is None:
            return
        key = (user_id, channel_id)
        jobs = self._in_flight.get(key)
        if jobs is not None:
            jobs.discard(job_id)
            if not jobs:
                del self._in_flight[key]
        if key in self._ready and key not in self._in_flight:
            await self._flush(key)

    def close(self) -> None:
        """The bot is closing: what was not announced stays so (its timers would fire on a
        closed session)."""
        for entry in self._ready.values():
            if entry.timer is not None:
                entry.timer.cancel()
        self._ready.clear()

    async def _flush(self, key: Key) -> None:
        entry = self._ready.pop(key, None)
        if entry is None or not entry.jobs:
            return
        if entry.timer is not None:
            entry.timer.cancel()
        user_id = key[0]
        named = [f"#{n}" for n in entry.jobs[:MAX_NAMED]]
        if len(entry.jobs) == 1:
            content = f"<@{user_id}> job {named[0]} is ready."
        else:
            more = len(entry.jobs) - len(named)
            listed = ", ".join(named[:-1]) + f" and {named[-1]}" if not more else \
                ", ".join(named) + f" and {more} more"
            content = f"<@{user_id}> jobs {listed} are ready."
        mention = discord.AllowedMentions(users=[discord.Object(id=user_id)])
        try:
            await self._send(content, mention, entry.result, entry.jobs[-1])
        except discord.HTTPException as exc:  # the results are shown; the ping is a courtesy
            log.warning("could not notify member %s of jobs %s: %s", user_id, named, exc)
        except Exception:  # never the job's failure: its result is shown
            log.exception("notifying member %s of jobs %s failed", user_id, named)
