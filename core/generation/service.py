"""GenerationService: validate, record, pick a server, queue, track, deliver.

A small facade over the package: the public names the bot, the cogs and the tests use,
each handing over to the module that holds the work. Submitting is done here because it
joins the pieces in one order: check the request, reserve a server, resolve the model on
it, then record the row (the store gets everything resolved; it never asks placement).
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
from collections.abc import Callable
from typing import Any

from core.audit import Actor
from core.comfy.pool import ComfyPool
from core.config import Settings
from core.db.engine import SessionFactory
from core.db.models import ComfyGeneration, ComfyWorkflow, GenerationStatus, utcnow
from core.errors import NotFound, RateLimited, ResourceBusy
from core.generation.delivery import Delivery
from core.generation.follow import Follower, QueueSnapshots
from core.generation.inputs import InputFiles
from core.generation.live import LiveJobs, job_view
from core.generation.placement import ModelCatalog, Placement, WaitFor
from core.generation.rebalance import Rebalancer
from core.generation.runner import FirstAttempt, JobRunner
from core.generation.store import GenerationStore, Quota
from core.generation.types import (
    MAX_JOB_ID,
    GenerationRequest,
    JobObserver,
    JobView,
    Viewer,
    job_parameters,
    request_from,
)
from core.generation.validation import check_rate_limits, validate
from core.generation.waiting import WaitingJobs, waiting_notice
from core.images import ImageFile
from core.servers import ServerRegistry, ServerView

log = logging.getLogger(__name__)

# Submitted jobs whose first attempt is kept ready (see GenerationService.start).
MAX_FRESH = 1000


class GenerationService:
    """Generation jobs as the bot and the cogs see them; the work is in the modules."""

    def __init__(
        self,
        settings: Settings,
        sessions: SessionFactory,
        registry: ServerRegistry,
        pool: ComfyPool,
        *,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._store = GenerationStore(sessions)
        self._live = LiveJobs(self._store)
        self._placement = Placement(settings, registry, pool)
        self.catalog: ModelCatalog = self._placement.catalog
        self._delivery = Delivery(self._store, self._live, registry, pool, clock)
        queues = QueueSnapshots()
        follower = Follower(settings.comfy, self._store, self._live, queues, clock)
        self._inputs = InputFiles(settings.data_dir / "inputs")
        self._runner = JobRunner(
            self._store, self._live, self._placement, self._delivery, follower, queues,
            registry, pool, self._inputs,
        )
        # Pools (core.pools): queued jobs share a server that just came up.
        self.rebalancer = Rebalancer(self._store, self._runner, pool, self._placement)
        # Jobs submitted and not started yet: their row and server, for the first attempt.
        self._fresh: dict[int, FirstAttempt] = {}
        # Jobs waiting for a pool's server (core.generation.waiting), and those submitted
        # to wait and not started yet (their pool and request).
        self.waiting = WaitingJobs(self._store, self._live, self._placement,
                                   lambda job_id: self._runner.start(job_id), clock,
                                   fail=self._expire, timeout=settings.comfy.job_timeout)
        self._live.on_end = self.waiting.kick
        self._held: dict[int, tuple[str, GenerationRequest]] = {}

    @property
    def observer(self) -> JobObserver:
        """How the Discord side watches jobs (a no-op observer until it sets one)."""
        return self._live.observer

    @observer.setter
    def observer(self, observer: JobObserver) -> None:
        self._live.observer = observer

    # ------------------------------------------------------------------ submit

    async def submit(self, req: GenerationRequest, *, message_id: int | None = None) -> JobView:
        """Validate and record a job (status pending). Nothing is queued yet.

        No server with room and a pool can run it: recorded without a server, to wait for
        the pool's next free one (core.generation.waiting). ``message_id``: its status
        message in the member's channel, when known already (else see attach_message)."""
        validate(req, self._settings.limits)
        workflow_row = await self._custom_workflow(req.workflow) if req.workflow else None
        exclude: set[int] = set()
        while True:
            choice = await self._placement.choose_or_wait(
                req, exclude=exclude, waiting=bool(self.waiting))
            if isinstance(choice, WaitFor):
                row = await self._record_within(req, None, workflow_row, choice.pool,
                                                message_id)
                if len(self._held) >= MAX_FRESH:
                    del self._held[next(iter(self._held))]
                self._held[row.id] = (choice.pool, req)
                self._live.state(row.id).notice = waiting_notice(choice.pool)
                return self._live.view(row, None)
            server = choice
            try:
                row = await self._record_within(req, server, workflow_row, None, message_id)
            except ResourceBusy:
                if req.server or server.id in exclude:
                    raise
                exclude.add(server.id)  # its stop began after the choice: choose again
                continue
            finally:
                self._placement.release(server.id)
            break
        if len(self._fresh) >= MAX_FRESH:  # submitted and never started: forget the oldest
            del self._fresh[next(iter(self._fresh))]
        self._fresh[row.id] = FirstAttempt(
            row, workflow_row, server, row.channel_id if message_id else None, message_id)
        return job_view(row, server.name)

    async def _record_within(
        self, req: GenerationRequest, server: ServerView | None,
        workflow_row: ComfyWorkflow | None, pool: str | None, message_id: int | None,
    ) -> ComfyGeneration:
        row = await self._record(req, server, workflow_row, pool, message_id)
        if row is None:  # over the member's limits: say which, from the counts
            await self.check_limits(req.actor)
            row = await self._record(req, server, workflow_row, pool, message_id)  # freed
            if row is None:
                await self.check_limits(req.actor)
                raise RateLimited("You have too many jobs right now; try again shortly.")
        return row

    async def _record(
        self, req: GenerationRequest, server: ServerView | None,
        workflow_row: ComfyWorkflow | None, pool: str | None = None,
        message_id: int | None = None,
    ) -> ComfyGeneration | None:
        """Record the job, unless its member is over their limits (None). Without a
        server it waits for ``pool``'s: its checkpoint is resolved when it is placed."""
        model = req.model
        if server is not None and workflow_row is None and req.kind != "upscale":
            model = await self._placement.resolve_model(server, req.model)
            if req.lora:
                await self._placement.check_lora(server, req.lora)
        seed = req.seed if req.seed is not None else secrets.randbelow(2**32)
        parameters = job_parameters(req, model, seed)
        if pool is not None:
            parameters["pool"] = pool
        image = req.image
        now, limits = self._clock(), self._settings.limits
        return await self._store.record(
            fields={
                "server_id": server.id if server is not None else None,
                "workflow_id": workflow_row.id if workflow_row else None,
                "user_id": req.actor.user_id or 0,
                "guild_id": req.actor.guild_id,
                "channel_id": req.actor.channel_id,
                "message_id": message_id,
                "prompt": req.prompt,
                "negative_prompt": req.negative or None,
                "parameters": parameters,
                # The services' clock (a compressed one in bench.costsim), as every other
                # time of the row: the pools' demand is read from it.
                "created_at": now,
            },
            now=now,
            input_path=(lambda job_id: self._inputs.save(job_id, image)) if image else None,
            quota=Quota(
                user_id=req.actor.user_id or 0,
                since=now - dt.timedelta(minutes=1),
                max_active=limits.user_concurrent_jobs,
                max_recent=limits.user_jobs_per_minute,
            ),
        )

    async def check_limits(self, actor: Actor, count: int = 1) -> None:
        """Refuse before anything starts when ``count`` more jobs would pass the limits."""
        since = self._clock() - dt.timedelta(minutes=1)
        recent, active = await self._store.counts(actor.user_id, since)
        check_rate_limits(self._settings.limits, active=active, recent=recent, count=count)

    async def _custom_workflow(self, name: str) -> ComfyWorkflow:
        row = await self._store.workflow_named(name)
        if row is None:
            raise NotFound(f"There is no workflow named '{name}'; see /workflow list.")
        return row

    # ------------------------------------------------------------------ lifecycle

    async def attach_message(self, job_id: int, channel_id: int, message_id: int) -> None:
        await self._store.attach_message(job_id, channel_id, message_id)
        fresh = self._fresh.get(job_id)
        if fresh is not None:  # what the row now says, for the job's first view
            fresh.channel_id, fresh.message_id = channel_id, message_id

    def start(self, job_id: int, *, resumed: bool = False) -> None:
        """Run the job in a tracked background task (queue, follow, deliver).

        ``resumed``: a previous process may have posted the result already.
        """
        held = self._held.pop(job_id, None)
        if held is not None:  # waits for its pool's server; the runner follows it then
            self.waiting.add(job_id, *held)
            return
        self._runner.start(job_id, resumed=resumed, first=self._fresh.pop(job_id, None))

    async def resume_unfinished(self) -> list[int]:
        """On start-up: follow again every job a previous run left unfinished."""
        ids = await self._store.active_ids()
        # Inputs of jobs that ended while no one could delete them (a crash, a kill).
        await self._inputs.sweep(ids)
        for job_id in ids:
            row = await self._store.load(job_id)
            if row is not None and self.waiting.resume(row):
                log.info("generation %s waits for its pool again", job_id)
                continue
            log.info("resuming generation %s", job_id)
            self._runner.start(job_id, resumed=True)
        return ids

    async def abandon(self, job_id: int, reason: str) -> None:
        """End a job that could not be started (e.g. its status message failed)."""
        self._fresh.pop(job_id, None)
        self._held.pop(job_id, None)
        # Recorded with the reply that was to show its status: that reply is removed (or
        # shows the error), it is not the job's to edit.
        await self._store.attach_message(job_id, None, None)
        await self._delivery.finish(job_id, GenerationStatus.FAILED, reason)
        await self._runner.discard_input(job_id)

    async def _expire(self, job_id: int, reason: str) -> None:
        """End a job that waited too long for its pool (core.generation.waiting)."""
        await self._delivery.finish(job_id, GenerationStatus.FAILED, reason)
        await self._runner.discard_input(job_id)

    async def cancel(self, job_id: int, actor: Actor) -> JobView:
        """Cancel a job: dequeue it if waiting, interrupt exactly it if running."""
        await self._runner.cancel(await self.get(job_id), actor)
        self._held.pop(job_id, None)
        self.waiting.forget(job_id)
        return await self.get(job_id)

    async def close(self) -> None:
        await self.waiting.close()
        await self._runner.close()
        await self._placement.close()

    # ------------------------------------------------------------------ queries

    async def get(self, job_id: int) -> JobView:
        if not 1 <= job_id <= MAX_JOB_ID:  # e.g. a forged button id of thirty digits
            raise NotFound(f"There is no generation #{job_id}.")
        return await self._live.get(job_id)

    async def get_visible(self, job_id: int, viewer: Viewer) -> JobView:
        """The job if ``viewer`` may see it; otherwise the same answer as for no job, so
        that ids from other guilds and hidden channels reveal nothing."""
        job = await self.get(job_id)
        if not viewer.can_see(job):
            raise NotFound(f"There is no generation #{job_id}.")
        return job

    async def snapshot(self, job_id: int) -> JobView:
        """The job as shown while it runs: the row as last read plus live progress."""
        return await self._live.snapshot(job_id)

    async def history(
        self, viewer: Viewer, *, user_id: int | None = None, limit: int = 10
    ) -> list[JobView]:
        """The newest jobs ``viewer`` may see (see Viewer), optionally of one member."""
        rows = await self._store.recent(
            user_id=user_id,
            limit=limit,
            guild_id=viewer.guild_id,
            viewer_id=viewer.user_id,
            channel_ids=viewer.channel_ids,
        )
        return [self._live.view(r, None) for r in rows]

    def request_from(self, job: JobView, actor: Actor, **changes: Any) -> GenerationRequest:
        """A new request with a finished job's settings (re-roll, variations)."""
        return request_from(job, actor, **changes)

    async def output_images(self, job_id: int) -> list[ImageFile]:
        """Fetch a finished job's images again from its server (for upscaling)."""
        return await self._delivery.output_images(job_id)

    def has_upscale_model(self, server_id: int | None) -> bool:
        """From the cache only (no I/O): does this server have an upscale model?"""
        return self._placement.has_upscale_model(server_id)

    async def upscale_models(self, server_id: int | None = None) -> dict[int, list[str]]:
        """Upscale models per ready server (only servers that have some)."""
        return await self._placement.upscale_models(server_id)
