"""Jobs waiting for a pool's server: a queue per pool, kept in the database.

A job that finds no server with room, and that a pool can run (placement.pool_for), is
recorded pending without a server (its parameters name the pool) instead of refused: the
member's status says it waits for a server of that pool, the pools' autoscaler counts it
as the pool's demand, and it is placed, first come first placed, the moment a slot frees
(a job ended) or a server is ready (the autoscaler's tick and a pool member joining call
:meth:`WaitingJobs.kick`). Placing it is the guarded ``assign`` of the store (a job
cancelled meanwhile stays cancelled), then the runner follows it like any job. A
restarted bot finds the waiting rows again (:meth:`WaitingJobs.resume`).

A job waits at most ``comfy.job_timeout`` (counted from when this process began waiting
for it): a pool that cannot get a server (its budget spent, no offer at its price, its
servers failing) fails its waiting jobs with that reason instead of leaving their members
on "waiting" for ever.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from core.audit import Actor
from core.db.models import ComfyGeneration
from core.errors import ComfyVastError
from core.generation.live import LiveJobs
from core.generation.placement import Placement
from core.generation.store import GenerationStore
from core.generation.types import GenerationRequest
from core.tasks import TaskRegistry

log = logging.getLogger(__name__)


def waiting_notice(pool: str) -> str:
    return f"Waiting for a free server of pool '{pool}'; it starts on the first one."


def waited_too_long(pool: str, timeout: float) -> str:
    minutes = max(1, round(timeout / 60))
    return (f"No server of pool '{pool}' was free within {minutes} minute"
            f"{'s' if minutes != 1 else ''}; try again later or ask an admin to check "
            "the pool (/pool status).")


@dataclass(frozen=True, slots=True)
class Waiting:
    job_id: int
    pool: str
    request: GenerationRequest  # what placement needs: model, workflow, kind, LoRA
    since: float = field(default_factory=time.monotonic)  # when it began to wait here


def waiting_request(row: ComfyGeneration) -> GenerationRequest:
    """The request placement needs, from a waiting row (after a restart)."""
    p = row.parameters or {}
    return GenerationRequest(
        actor=Actor(row.user_id, guild_id=row.guild_id, channel_id=row.channel_id),
        prompt=row.prompt, model=p.get("model"), workflow=p.get("workflow"),
        kind=p.get("kind", "generate"), lora=p.get("lora"),
    )


class WaitingJobs:
    """The jobs waiting for a pool's server, oldest first, and their placement."""

    def __init__(self, store: GenerationStore, live: LiveJobs, placement: Placement,
                 start: Callable[[int], None], clock: Callable[[], dt.datetime], *,
                 fail: Callable[[int, str], Awaitable[None]], timeout: float) -> None:
        self._store = store
        self._fail = fail  # ends a job that waited too long, with the reason
        self.timeout = timeout  # seconds of real time (monotonic)
        self._live = live
        self._placement = placement
        self._start = start
        self._clock = clock
        self._jobs: dict[int, Waiting] = {}
        self._tasks = TaskRegistry("generation-waiting")
        self._again = False
        # Told when a job begins to wait (the pools' autoscaler decides at once).
        self.on_wait: Callable[[], None] | None = None

    def __bool__(self) -> bool:
        return bool(self._jobs)

    def count(self, pool: str) -> int:
        """Jobs waiting for ``pool`` (the autoscaler's demand)."""
        return sum(1 for w in self._jobs.values() if w.pool == pool)

    def add(self, job_id: int, pool: str, request: GenerationRequest) -> None:
        self._jobs[job_id] = Waiting(job_id, pool, request)
        self._jobs = dict(sorted(self._jobs.items()))  # first come, first placed
        self._live.state(job_id).notice = waiting_notice(pool)
        self.kick()
        if self.on_wait is not None:
            self.on_wait()

    def resume(self, row: ComfyGeneration) -> bool:
        """A restart: ``row`` waits for a pool again if it was waiting for one."""
        pool = (row.parameters or {}).get("pool")
        if row.server_id is not None or not pool:
            return False
        self.add(row.id, str(pool), waiting_request(row))
        return True

    def kick(self) -> None:
        """Place what can be placed now (in the background; one pass at a time)."""
        if not self._jobs:
            return
        self._again = True
        if "dispatch" not in self._tasks:
            self._tasks.spawn(self._loop(), key="dispatch", name="generation-waiting")

    async def _loop(self) -> None:
        while self._again:
            self._again = False
            try:
                await self.dispatch()
            except Exception:  # the next kick tries again
                log.exception("placing waiting jobs failed")

    async def dispatch(self) -> list[int]:
        """Place waiting jobs on servers with room, oldest first; the ids started."""
        started: list[int] = []
        fresh = True  # the first choice reads the servers again (a slot just freed)
        now = time.monotonic()
        for job_id, waiting in list(self._jobs.items()):
            if now - waiting.since > self.timeout:
                del self._jobs[job_id]
                log.info("job %s waited %.0f s for pool %s; failed", job_id,
                         now - waiting.since, waiting.pool)
                await self._fail(job_id, waited_too_long(waiting.pool, self.timeout))
                self._live.forget(job_id)
                continue
            try:
                server = await self._placement.place(waiting.request, fresh=fresh)
            except ComfyVastError:
                continue  # nothing has room for it (others may fit elsewhere)
            fresh = False
            try:
                req = waiting.request
                model = None
                if req.workflow is None and req.kind != "upscale":
                    model = await self._placement.resolve_model(server, req.model)
                    if req.lora:
                        await self._placement.check_lora(server, req.lora)
                row = await self._store.assign(job_id, server.id, model, self._clock())
            except ComfyVastError as exc:
                # The server stopped meanwhile or lacks the model: it waits on.
                log.info("job %s not placed on %s: %s", job_id, server.name, exc)
                fresh = True
                continue
            finally:
                self._placement.release(server.id)
            del self._jobs[job_id]
            state = self._live.peek(job_id)
            if row is None:  # ended while it waited (cancelled)
                self._live.forget(job_id)
                continue
            if state is not None:
                state.notice = None
            log.info("job %s waited for pool %s; placed on %s", job_id, waiting.pool,
                     server.name)
            self._start(job_id)
            started.append(job_id)
        return started

    def forget(self, job_id: int) -> None:
        self._jobs.pop(job_id, None)

    async def close(self) -> None:
        await self._tasks.close()
