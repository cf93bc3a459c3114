"""GenerationService: validate, record, pick a server, queue, track, deliver.

The row is written before every side effect, so a restarted bot resumes each unfinished
job: it is tracked again, or delivered from ComfyUI's history if it finished while the
bot was away. The Discord side observes jobs through :class:`JobObserver`; it never
touches the database or ComfyUI.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import func, select, update

from core.audit import Actor
from core.comfy.client import ComfyClient, OutputImage
from core.comfy.errors import ComfyError, ComfyUnreachable, ComfyValidationError
from core.comfy.events import (
    Disconnected,
    Executing,
    ExecutionCached,
    ExecutionStart,
    PreviewEvent,
    Progress,
    PromptDone,
)
from core.comfy.pool import ComfyConnection, ComfyPool
from core.comfy.workflows import GenerationParams, LoraSpec, apply_param_map, build_workflow
from core.config import Settings
from core.db.engine import SessionFactory
from core.db.models import ComfyGeneration, ComfyWorkflow, GenerationStatus, Server, utcnow
from core.errors import (
    ComfyVastError,
    NotFound,
    PermissionDenied,
    RateLimited,
    ResourceBusy,
    ValidationFailed,
)
from core.images import ImageFile
from core.overview import ACTIVE_JOB_STATES
from core.servers import ServerRegistry, ServerView

log = logging.getLogger(__name__)

INPUT_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp"}
MAX_INPUT_BYTES = 20 * 1024 * 1024
CATALOG_TTL = 60.0
QUEUE_SNAPSHOT_TTL = 2.0
PROGRESS_DB_INTERVAL = 5.0


def check_input_size(size: int) -> None:
    """Refuse an input image over MAX_INPUT_BYTES (the cog checks before downloading it)."""
    if size > MAX_INPUT_BYTES:
        raise ValidationFailed("The input image is larger than 20 MB.")


class GenerationFailed(ComfyVastError):
    """A job ended in failure; ``str()`` is the sentence shown to the user."""


@dataclass(frozen=True, slots=True)
class InputImage:
    filename: str
    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    actor: Actor
    prompt: str
    negative: str = ""
    model: str | None = None
    width: int = 1024
    height: int = 1024
    steps: int = 25
    cfg: float = 7.0
    seed: int | None = None
    sampler: str = "euler"
    scheduler: str = "normal"
    batch: int = 1
    lora: str | None = None
    lora_strength: float = 1.0
    image: InputImage | None = None
    denoise: float = 0.75
    workflow: str | None = None
    server: str | None = None
    parent_id: int | None = None
    kind: str = "generate"  # generate | reroll | variation | upscale
    upscale_model: str | None = None


@dataclass(frozen=True, slots=True)
class JobView:
    """What the Discord side renders: a snapshot of one job."""

    id: int
    user_id: int
    guild_id: int | None
    channel_id: int | None
    message_id: int | None
    server_id: int | None
    server_name: str | None
    status: str
    prompt: str
    negative: str | None
    parameters: dict[str, Any]
    queue_position: int | None = None
    current_node: str | None = None
    step: int | None = None
    max_steps: int | None = None
    progress: float = 0.0
    eta_seconds: float | None = None
    error: str | None = None
    notice: str | None = None
    created_at: dt.datetime | None = None
    started_at: dt.datetime | None = None
    completed_at: dt.datetime | None = None
    image_count: int = 0

    @property
    def finished(self) -> bool:
        return GenerationStatus(self.status).finished

    @property
    def seed(self) -> int | None:
        seed = self.parameters.get("seed")
        return seed if isinstance(seed, int) else None


class JobObserver(Protocol):
    """Implemented by the Discord side; every method must tolerate being called again."""

    async def on_update(self, job: JobView, preview: bytes | None) -> None:
        """The job changed. For live progress ``job`` may lack the newest step: read
        :meth:`GenerationService.snapshot` when rendering."""

    async def deliver(
        self, job: JobView, images: list[ImageFile], *, check_existing: bool = False
    ) -> None:
        """Post the result; with ``check_existing`` (a delivery interrupted by a restart)
        first look for a result message already posted."""

    async def on_finished(self, job: JobView) -> None: ...


class _NullObserver:
    async def on_update(self, job: JobView, preview: bytes | None) -> None:
        return None

    async def deliver(
        self, job: JobView, images: list[ImageFile], *, check_existing: bool = False
    ) -> None:
        return None

    async def on_finished(self, job: JobView) -> None:
        return None


class ServerFailure(Exception):
    """The server under a job went away; the job may move to another server once.

    ``retry_here`` is set when the server answers again but forgot the job (ComfyUI was
    restarted): then the job is queued again on the same server.
    """

    def __init__(self, reason: str, *, retry_here: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_here = retry_here


@dataclass
class _Live:
    """In-memory progress of a running job (the DB gets transitions, not every step)."""

    queue_position: int | None = None
    current_node: str | None = None
    step: int | None = None
    max_steps: int | None = None
    first_step_at: float | None = None
    notice: str | None = None
    last_db_write: float = 0.0
    cancel_requested: bool = False
    resumed: bool = False
    started: bool = False  # ComfyUI began executing it (no more queue positions)
    started_at: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class _JobSpec:
    """What the workflow of a job is built from, read once per attempt."""

    parameters: dict[str, Any]
    prompt: str
    negative: str
    custom: tuple[dict[str, Any], dict[str, Any]] | None  # (workflow, param map)


class ModelCatalog:
    """Model names per server and folder from ComfyUI, cached briefly."""

    def __init__(self, pool: ComfyPool, ttl: float = CATALOG_TTL) -> None:
        self._pool = pool
        self._ttl = ttl
        self._cache: dict[tuple[int, str], tuple[float, list[str]]] = {}

    async def models(self, server: ServerView, folder: str, *, fresh: bool = False) -> list[str]:
        key = (server.id, folder)
        hit = self._cache.get(key)
        if hit and not fresh and time.monotonic() - hit[0] < self._ttl:
            return hit[1]
        conn = await self._pool.get(server)
        names = sorted(await conn.client.list_models(folder))
        self._cache[key] = (time.monotonic(), names)
        return names

    def peek(self, server_id: int, folder: str) -> list[str] | None:
        """The cached names, even if stale; None when never listed."""
        hit = self._cache.get((server_id, folder))
        return hit[1] if hit else None

    def cached(self, folder: str) -> list[str]:
        """Every name seen in ``folder`` on any server (for autocomplete, no I/O)."""
        seen: set[str] = set()
        for (_, cached_folder), (_, names) in self._cache.items():
            if cached_folder == folder:
                seen.update(names)
        return sorted(seen)

    def invalidate(self, server_id: int) -> None:
        for key in [k for k in self._cache if k[0] == server_id]:
            del self._cache[key]


class GenerationService:
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
        self._sessions = sessions
        self._registry = registry
        self._pool = pool
        self._clock = clock
        self.catalog = ModelCatalog(pool)
        self.observer: JobObserver = _NullObserver()
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._live: dict[int, _Live] = {}
        self._views: dict[int, JobView] = {}  # row snapshots of running jobs
        # Jobs chosen for a server but not inserted yet, so concurrent submissions spread.
        self._reserved: dict[int, int] = {}
        self._choose_lock = asyncio.Lock()
        self._prefetches: set[asyncio.Task[None]] = set()
        self._queue_cache: dict[int, tuple[float, Any]] = {}
        self._inputs_dir = settings.data_dir / "inputs"

    # ------------------------------------------------------------------ submit

    async def submit(self, req: GenerationRequest) -> JobView:
        """Validate and record a job (status pending). Nothing is queued yet."""
        self._validate(req)
        await self._check_rate_limits(req.actor)
        workflow_row = await self._custom_workflow(req.workflow) if req.workflow else None
        server = await self._choose_server(req, exclude=set())
        try:
            return await self._record(req, server, workflow_row)
        finally:
            self._release(server.id)

    async def _record(
        self, req: GenerationRequest, server: ServerView, workflow_row: ComfyWorkflow | None
    ) -> JobView:
        model = req.model
        if workflow_row is None and req.kind != "upscale":
            model = await self._resolve_model(server, req.model)
            if req.lora:
                loras = await self.catalog.models(server, "loras")
                if req.lora not in loras:
                    raise ValidationFailed(
                        f"The LoRA '{req.lora}' is not on server '{server.name}'."
                    )
        seed = req.seed if req.seed is not None else secrets.randbelow(2**32)
        params: dict[str, Any] = {
            "kind": req.kind,
            "model": model,
            "width": req.width,
            "height": req.height,
            "steps": req.steps,
            "cfg": req.cfg,
            "seed": seed,
            "sampler": req.sampler,
            "scheduler": req.scheduler,
            "batch": req.batch,
            "lora": req.lora,
            "lora_strength": req.lora_strength,
            "denoise": req.denoise if req.image else 1.0,
            "workflow": req.workflow,
            "explicit_server": req.server is not None,
            "upscale_model": req.upscale_model,
            "parent_id": req.parent_id,
        }
        async with self._sessions.begin() as session:
            row = ComfyGeneration(
                server_id=server.id,
                workflow_id=workflow_row.id if workflow_row else None,
                user_id=req.actor.user_id or 0,
                guild_id=req.actor.guild_id,
                channel_id=req.actor.channel_id,
                prompt=req.prompt,
                negative_prompt=req.negative or None,
                parameters=params,
                status=GenerationStatus.PENDING.value,
                # Our own prompt id, known before queueing: a restart can find the prompt.
                comfy_prompt_id=str(uuid.uuid4()),
            )
            session.add(row)
            await session.flush()
            if req.image is not None:
                params = {**params, "input_path": self._save_input(row.id, req.image)}
                row.parameters = params
            # A new job is activity on its server (idle autostop counts from here), in the
            # same transaction as the row.
            server_row = await session.get(Server, server.id)
            if server_row is not None:
                server_row.last_used_at = self._clock()
                if req.actor.channel_id is not None:
                    server_row.last_channel_id = req.actor.channel_id
            await session.flush()
            return self._base_view(row, server.name)

    def _validate(self, req: GenerationRequest) -> None:
        limits = self._settings.limits
        prompt = req.prompt.strip()
        if not prompt and req.kind != "upscale":
            raise ValidationFailed("The prompt must not be empty.")
        if len(req.prompt) > limits.max_prompt_length:
            raise ValidationFailed(
                f"The prompt is {len(req.prompt)} characters; the limit is "
                f"{limits.max_prompt_length}."
            )
        if len(req.negative) > limits.max_prompt_length:
            raise ValidationFailed(
                f"The negative prompt is longer than {limits.max_prompt_length} characters."
            )
        for label, value, maximum in (
            ("Width", req.width, limits.max_width),
            ("Height", req.height, limits.max_height),
        ):
            if value % 8 or not limits.min_size <= value <= maximum:
                raise ValidationFailed(
                    f"{label} must be a multiple of 8 between {limits.min_size} and {maximum}."
                )
        if not 1 <= req.steps <= limits.max_steps:
            raise ValidationFailed(f"Steps must be between 1 and {limits.max_steps}.")
        if not 0 < req.cfg <= limits.max_cfg:
            raise ValidationFailed(f"CFG must be above 0 and at most {limits.max_cfg:g}.")
        if not 1 <= req.batch <= limits.max_batch:
            raise ValidationFailed(f"Batch must be between 1 and {limits.max_batch}.")
        if req.seed is not None and not 0 <= req.seed < 2**64:
            raise ValidationFailed("The seed must be between 0 and 18446744073709551615.")
        if not 0.0 < req.denoise <= 1.0:
            raise ValidationFailed("Denoise must be above 0 and at most 1.")
        if not -10.0 <= req.lora_strength <= 10.0:
            raise ValidationFailed("LoRA strength must be between -10 and 10.")
        if req.image is not None:
            suffix = Path(req.image.filename).suffix.lower()
            if suffix not in INPUT_EXTENSIONS:
                raise ValidationFailed("The input image must be a PNG, JPEG or WebP file.")
            check_input_size(len(req.image.data))
        if req.kind == "upscale" and (req.image is None or not req.upscale_model):
            raise ValidationFailed("Upscaling needs an image and an upscale model.")

    async def check_limits(self, actor: Actor, count: int = 1) -> None:
        """Refuse before anything starts when ``count`` more jobs would pass the limits."""
        await self._check_rate_limits(actor, count)

    async def _check_rate_limits(self, actor: Actor, count: int = 1) -> None:
        limits = self._settings.limits
        since = self._clock() - dt.timedelta(minutes=1)
        async with self._sessions() as session:
            recent = await session.scalar(
                select(func.count())
                .select_from(ComfyGeneration)
                .where(ComfyGeneration.user_id == actor.user_id)
                .where(ComfyGeneration.created_at >= since)
            )
            active = await session.scalar(
                select(func.count())
                .select_from(ComfyGeneration)
                .where(ComfyGeneration.user_id == actor.user_id)
                .where(ComfyGeneration.status.in_(ACTIVE_JOB_STATES))
            )
        if (active or 0) + count > limits.user_concurrent_jobs:
            if count > 1:
                raise RateLimited(
                    f"That needs {count} job slots and you have {active} job(s) in progress "
                    f"(the limit is {limits.user_concurrent_jobs})."
                )
            raise RateLimited(
                f"You already have {active} job(s) in progress (the limit is "
                f"{limits.user_concurrent_jobs}); wait for one to finish or cancel it."
            )
        if (recent or 0) + count > limits.user_jobs_per_minute:
            raise RateLimited(
                f"You can start {limits.user_jobs_per_minute} jobs a minute; "
                "try again in a minute.",
                retry_after=60.0,
            )

    async def _custom_workflow(self, name: str) -> ComfyWorkflow:
        async with self._sessions() as session:
            row = (
                await session.scalars(select(ComfyWorkflow).where(ComfyWorkflow.name == name))
            ).first()
        if row is None:
            raise NotFound(f"There is no workflow named '{name}'; see /workflow list.")
        return row

    async def _choose_server(
        self, req: GenerationRequest, *, exclude: set[int], model: str | None = None
    ) -> ServerView:
        """Explicit server if given; else a ready one with the model and fewest jobs."""
        wanted_model = model or req.model
        cap = self._settings.comfy.max_generations
        if req.server:
            server = await self._registry.get(req.server)
            if not server.is_ready:
                raise ValidationFailed(
                    f"Server '{server.name}' is {server.status}; it must be running."
                )
            return await self._reserve([server], cap, explicit=True)
        candidates = [s for s in await self._registry.list() if s.is_ready and s.id not in exclude]
        if not candidates:
            raise ValidationFailed(
                "No server is running. An admin can add one with /server add-direct, "
                "/server add-ssh or /server create."
            )
        usable: list[ServerView] = []
        for server in candidates:
            if wanted_model and req.kind != "upscale" and not req.workflow:
                try:
                    if wanted_model not in await self.catalog.models(server, "checkpoints"):
                        continue
                except ComfyVastError as exc:
                    log.warning("server %s unusable: %s", server.name, exc)
                    continue
            usable.append(server)
        if not usable and wanted_model:
            raise ValidationFailed(f"No running server has the model '{wanted_model}'.")
        return await self._reserve(usable, cap)

    async def _reserve(
        self, usable: list[ServerView], cap: int, *, explicit: bool = False
    ) -> ServerView:
        """Pick the least loaded server and hold a slot on it until the row is written.

        Counting and reserving happen under one lock: concurrent submissions must not all
        see the same least-busy server before any of their rows exists.
        """
        async with self._choose_lock:
            busy = await self._registry.active_jobs()
            load = {s.id: busy.get(s.id, 0) + self._reserved.get(s.id, 0) for s in usable}
            free = [s for s in usable if load[s.id] < cap]
            if not free:
                if explicit:
                    raise ResourceBusy(
                        f"Server '{usable[0].name}' already has {cap} jobs queued; "
                        "try again shortly."
                    )
                raise ResourceBusy("Every server is busy; try again in a moment.")
            chosen = min(free, key=lambda s: (load[s.id], s.id))
            self._reserved[chosen.id] = self._reserved.get(chosen.id, 0) + 1
        return chosen

    def _release(self, server_id: int) -> None:
        left = self._reserved.get(server_id, 0) - 1
        if left > 0:
            self._reserved[server_id] = left
        else:
            self._reserved.pop(server_id, None)

    async def _resolve_model(self, server: ServerView, model: str | None) -> str:
        try:
            names = await self.catalog.models(server, "checkpoints")
        except ComfyVastError as exc:
            raise ValidationFailed(f"Server '{server.name}' is not answering: {exc}") from None
        if model is None:
            if not names:
                raise ValidationFailed(f"Server '{server.name}' has no checkpoint models.")
            return names[0]
        if model not in names:
            raise ValidationFailed(f"The model '{model}' is not on server '{server.name}'.")
        return model

    def _save_input(self, job_id: int, image: InputImage) -> str:
        self._inputs_dir.mkdir(parents=True, exist_ok=True)
        suffix = Path(image.filename).suffix.lower()
        path = self._inputs_dir / f"job-{job_id}{suffix}"
        path.write_bytes(image.data)
        return str(path)

    # ------------------------------------------------------------------ lifecycle

    async def attach_message(self, job_id: int, channel_id: int, message_id: int) -> None:
        async with self._sessions.begin() as session:
            row = await session.get(ComfyGeneration, job_id)
            if row is not None:
                row.channel_id, row.message_id = channel_id, message_id

    def start(self, job_id: int, *, resumed: bool = False) -> None:
        """Run the job in a tracked background task (queue, follow, deliver).

        ``resumed``: a previous process may have posted the result already.
        """
        if job_id in self._tasks and not self._tasks[job_id].done():
            return
        task = asyncio.create_task(self._run(job_id, resumed), name=f"generation-{job_id}")
        self._tasks[job_id] = task
        task.add_done_callback(lambda t, j=job_id: self._task_done(j, t))

    def _task_done(self, job_id: int, task: asyncio.Task[None]) -> None:
        if self._tasks.get(job_id) is task:
            del self._tasks[job_id]
        self._live.pop(job_id, None)
        self._views.pop(job_id, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("generation %s crashed", job_id, exc_info=task.exception())

    async def resume_unfinished(self) -> list[int]:
        """On start-up: follow again every job a previous run left unfinished."""
        async with self._sessions() as session:
            ids = list(
                (
                    await session.scalars(
                        select(ComfyGeneration.id)
                        .where(ComfyGeneration.status.in_(ACTIVE_JOB_STATES))
                        .order_by(ComfyGeneration.id)
                    )
                ).all()
            )
        for job_id in ids:
            log.info("resuming generation %s", job_id)
            self.start(job_id, resumed=True)
        return ids

    async def abandon(self, job_id: int, reason: str) -> None:
        """End a job that could not be started (e.g. its status message failed)."""
        await self._finish(job_id, GenerationStatus.FAILED, reason)

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------ queries

    async def get(self, job_id: int) -> JobView:
        async with self._sessions() as session:
            row = await session.get(ComfyGeneration, job_id)
            if row is None:
                raise NotFound(f"There is no generation #{job_id}.")
            server_name = None
            if row.server_id is not None:
                server = await session.get(Server, row.server_id)
                server_name = server.name if server else None
            return self._view(row, server_name)

    async def snapshot(self, job_id: int) -> JobView:
        """The job as shown while it runs: the row as last read plus live progress.

        Progress and previews arrive many times a second per job; reading the database
        for each would dominate the bot's CPU, so the row is re-read only on transitions.
        """
        base = self._views.get(job_id)
        if base is None:
            return await self._refresh_view(job_id)
        return self._overlay(base)

    async def _refresh_view(self, job_id: int) -> JobView:
        view = await self.get(job_id)
        if job_id in self._live:
            self._views[job_id] = view
        return view

    async def _last_written(self, job_id: int) -> JobView:
        """The row as last written (cached for running jobs, read otherwise)."""
        return self._views.get(job_id) or await self._refresh_view(job_id)

    def _remember(self, row: ComfyGeneration) -> JobView:
        """A view of a row just written in the caller's session; kept for running jobs.

        Saves a second database read on every transition: the server name (which never
        changes under a job, except on failover, which re-reads) comes from the cache.
        """
        cached = self._views.get(row.id)
        name = cached.server_name if cached and cached.server_id == row.server_id else None
        view = self._base_view(row, name)
        if row.id in self._live and name is not None:
            self._views[row.id] = view
        return self._overlay(view)

    def _overlay(self, view: JobView) -> JobView:
        live = self._live.get(view.id)
        if live is None:
            return view
        progress, eta = view.progress, None
        if live.step is not None and live.max_steps:
            progress = live.step / live.max_steps
            if live.first_step_at is not None and live.step > 0:
                elapsed = time.monotonic() - live.first_step_at
                eta = elapsed / live.step * (live.max_steps - live.step)
        status, started_at = view.status, view.started_at
        if live.started_at is not None and status in ("pending", "queued"):
            status = GenerationStatus.RUNNING.value
        started_at = started_at or live.started_at
        return replace(
            view, status=status, started_at=started_at, queue_position=live.queue_position,
            current_node=live.current_node, step=live.step, max_steps=live.max_steps,
            progress=progress, eta_seconds=eta, notice=live.notice,
        )

    def _view(self, row: ComfyGeneration, server_name: str | None) -> JobView:
        return self._overlay(self._base_view(row, server_name))

    def _base_view(self, row: ComfyGeneration, server_name: str | None) -> JobView:
        return JobView(
            id=row.id,
            user_id=row.user_id,
            guild_id=row.guild_id,
            channel_id=row.channel_id,
            message_id=row.message_id,
            server_id=row.server_id,
            server_name=server_name,
            status=row.status,
            prompt=row.prompt,
            negative=row.negative_prompt,
            parameters=dict(row.parameters or {}),
            queue_position=row.queue_position,
            current_node=row.current_node,
            progress=row.progress,
            error=row.error_message,
            created_at=row.created_at,
            started_at=row.started_at,
            completed_at=row.completed_at,
            image_count=len(row.image_urls or []),
        )

    async def history(self, *, user_id: int | None = None, limit: int = 10) -> list[JobView]:
        stmt = select(ComfyGeneration).order_by(ComfyGeneration.id.desc()).limit(limit)
        if user_id is not None:
            stmt = stmt.where(ComfyGeneration.user_id == user_id)
        async with self._sessions() as session:
            rows = (await session.scalars(stmt)).all()
        return [self._view(r, None) for r in rows]

    def request_from(self, job: JobView, actor: Actor, **changes: Any) -> GenerationRequest:
        """A new request with a finished job's settings (re-roll, variations)."""
        p = job.parameters
        req = GenerationRequest(
            actor=actor,
            prompt=job.prompt,
            negative=job.negative or "",
            model=p.get("model"),
            width=p.get("width", 1024),
            height=p.get("height", 1024),
            steps=p.get("steps", 25),
            cfg=p.get("cfg", 7.0),
            sampler=p.get("sampler", "euler"),
            scheduler=p.get("scheduler", "normal"),
            batch=p.get("batch", 1),
            lora=p.get("lora"),
            lora_strength=p.get("lora_strength", 1.0),
            workflow=p.get("workflow"),
            parent_id=job.id,
        )
        input_path = p.get("input_path")
        if input_path and Path(input_path).exists():
            req = replace(
                req,
                image=InputImage(Path(input_path).name, Path(input_path).read_bytes()),
                denoise=p.get("denoise", 0.75),
            )
        return replace(req, **changes)

    async def output_images(self, job_id: int) -> list[ImageFile]:
        """Fetch a finished job's images again from its server (for upscaling)."""
        job = await self.get(job_id)
        if job.status != GenerationStatus.COMPLETED.value or job.server_id is None:
            raise ValidationFailed(f"Generation #{job_id} has no finished images.")
        async with self._sessions() as session:
            row = await session.get(ComfyGeneration, job_id)
            refs = list(row.image_urls or []) if row else []
        conn = await self._pool.get(await self._registry.get(job.server_id))
        return [
            ImageFile(
                ref["filename"],
                await conn.client.view(
                    ref["filename"], ref.get("subfolder", ""), ref.get("type", "output")
                ),
            )
            for ref in refs
        ]

    def _prefetch(self, server: ServerView, folder: str) -> None:
        if self.catalog.peek(server.id, folder) is not None:
            return

        async def fetch() -> None:
            try:
                await self.catalog.models(server, folder)
            except ComfyVastError as exc:
                log.info("listing %s on %s failed: %s", folder, server.name, exc)

        task = asyncio.create_task(fetch(), name=f"prefetch-{server.id}-{folder}")
        self._prefetches.add(task)
        task.add_done_callback(self._prefetches.discard)

    def has_upscale_model(self, server_id: int | None) -> bool:
        """From the cache only (no I/O): does this server have an upscale model?"""
        return server_id is not None and bool(self.catalog.peek(server_id, "upscale_models"))

    async def upscale_models(self, server_id: int | None = None) -> dict[int, list[str]]:
        """Upscale models per ready server (only servers that have some)."""
        found: dict[int, list[str]] = {}
        for server in await self._registry.list():
            if not server.is_ready or (server_id is not None and server.id != server_id):
                continue
            try:
                names = await self.catalog.models(server, "upscale_models")
            except ComfyError:
                continue
            if names:
                found[server.id] = names
        return found

    # ------------------------------------------------------------------ cancel

    async def cancel(self, job_id: int, actor: Actor) -> JobView:
        """Cancel a job: dequeue it if waiting, interrupt exactly it if running."""
        job = await self.get(job_id)
        if actor.user_id != job.user_id and not actor.is_admin:
            raise PermissionDenied(
                "Only the person who started this job or an admin can cancel it."
            )
        if job.finished:
            raise ValidationFailed(f"Generation #{job_id} already ended ({job.status}).")
        live = self._live.setdefault(job_id, _Live())
        live.cancel_requested = True
        # Stop following it first, so it cannot be queued after we looked: the runner may
        # be between "POST /prompt" and recording it.
        task = self._tasks.get(job_id)
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])
        async with self._sessions() as session:
            row = await session.get(ComfyGeneration, job_id)
            prompt_id = row.comfy_prompt_id if row else None
            server_id = row.server_id if row else None
        if server_id is not None and prompt_id:
            try:
                conn = await self._pool.get(await self._registry.get(server_id))
                queue = await conn.client.get_queue()
                if prompt_id in queue.pending_ids:
                    await conn.client.delete_from_queue([prompt_id])
                elif prompt_id in queue.running_ids:
                    # Targeted: interrupts only if this prompt is the one running.
                    await conn.client.interrupt(prompt_id)
            except ComfyVastError as exc:
                log.warning("cancel of %s could not reach the server: %s", job_id, exc)
        await self._finish(job_id, GenerationStatus.CANCELLED, None)
        return await self.get(job_id)

    # ------------------------------------------------------------------ running

    async def _run(self, job_id: int, resumed: bool = False) -> None:
        try:
            await self._drive(job_id, resumed)
        except asyncio.CancelledError:
            raise
        except GenerationFailed as exc:
            await self._finish(job_id, GenerationStatus.FAILED, str(exc))
        except ComfyVastError as exc:
            await self._finish(job_id, GenerationStatus.FAILED, str(exc))
        except Exception:
            log.exception("generation %s failed unexpectedly", job_id)
            await self._finish(
                job_id, GenerationStatus.FAILED, "Something went wrong; it has been logged."
            )

    async def _drive(self, job_id: int, resumed: bool = False) -> None:
        live = self._live.setdefault(job_id, _Live())
        live.resumed = resumed
        moved = False
        while True:
            async with self._sessions() as session:
                row = await session.get(ComfyGeneration, job_id)
                if row is None or GenerationStatus(row.status).finished:
                    return
                status = GenerationStatus(row.status)
                server_id = row.server_id
            if status == GenerationStatus.UPLOADING:
                # Crashed while delivering: the images are in ComfyUI's history.
                server = await self._registry.get(server_id) if server_id else None
                if server is not None:
                    conn = await self._pool.get(server)
                    result = await conn.client.get_prompt_result(row.comfy_prompt_id or "")
                    if result is not None and result.status == "success":
                        # It may have been posted already: the observer checks first.
                        await self._deliver(
                            job_id, conn, list(result.outputs), check_existing=True
                        )
                        return
            if server_id is None:
                raise GenerationFailed("The server of this job was removed.")
            server = await self._registry.get(server_id)
            try:
                await self._execute(job_id, server, live)
                return
            except ServerFailure as failure:
                if moved or live.cancel_requested:
                    raise GenerationFailed(
                        f"Server '{server.name}' failed ({failure.reason}) and the job could "
                        "not be moved."
                    ) from None
                moved = True
                target = (
                    server if failure.retry_here else await self._failover_target(job_id, server)
                )
                if target is None:
                    raise GenerationFailed(
                        f"Server '{server.name}' failed ({failure.reason}) and no other server "
                        "can take the job."
                    ) from None
                live.notice = (
                    f"Server '{server.name}' {failure.reason}; queued again."
                    if target.id == server.id
                    else f"Server '{server.name}' failed ({failure.reason}); "
                    f"moved to '{target.name}'."
                )
                log.warning("generation %s: %s", job_id, live.notice)
                async with self._sessions.begin() as session:
                    row = await session.get(ComfyGeneration, job_id)
                    assert row is not None
                    row.server_id = target.id
                    row.status = GenerationStatus.PENDING.value
                    row.comfy_prompt_id = str(uuid.uuid4())
                    row.attempts += 1
                await self._emit(await self._refresh_view(job_id))

    async def _failover_target(self, job_id: int, failed: ServerView) -> ServerView | None:
        job = await self.get(job_id)
        p = job.parameters
        if p.get("explicit_server"):
            return None
        req = GenerationRequest(
            actor=Actor(job.user_id),
            prompt=job.prompt,
            model=p.get("model"),
            workflow=p.get("workflow"),
            kind=p.get("kind", "generate"),
        )
        try:
            target = await self._choose_server(req, exclude={failed.id})
        except ComfyVastError:
            return None
        self._release(target.id)  # the row moves to it right away
        return target

    async def _execute(self, job_id: int, server: ServerView, live: _Live) -> None:
        try:
            conn = await self._pool.get(server)
        except ComfyError as exc:
            raise ServerFailure(str(exc)) from None
        async with self._sessions() as session:
            row = await session.get(ComfyGeneration, job_id)
            assert row is not None
            prompt_id = row.comfy_prompt_id or str(uuid.uuid4())
            status = GenerationStatus(row.status)
            custom = await session.get(ComfyWorkflow, row.workflow_id) if row.workflow_id else None
            spec = _JobSpec(
                dict(row.parameters or {}), row.prompt, row.negative_prompt or "",
                (custom.workflow, custom.param_map or {}) if custom is not None else None,
            )
        # Warm the cache the result's Upscale button is decided from, off the critical path.
        self._prefetch(server, "upscale_models")
        # Subscribe before queueing, so no message about the prompt can be missed.
        sub = conn.stream.subscribe(prompt_id)
        try:
            workflow = await self._workflow_for(job_id, conn.client, spec)
            if status == GenerationStatus.PENDING:
                await self._queue(job_id, conn, prompt_id, workflow)
            else:
                # Resumed after a restart: ComfyUI's queue and history tell where it is.
                await conn.stream.reconcile()
            done = await self._follow(job_id, conn, sub, workflow, live)
        finally:
            sub.close()
        if done.status == "success":
            outputs = list(done.outputs) or await conn.client.get_prompt_outputs(prompt_id)
            await self._deliver(job_id, conn, outputs, check_existing=live.resumed)
        elif done.status == "interrupted" or live.cancel_requested:
            await self._finish(job_id, GenerationStatus.CANCELLED, None)
        elif done.status == "lost":
            alive = await conn.client.check_status()
            raise ServerFailure("lost the job" if alive else "it lost the job", retry_here=alive)
        else:
            message = str(done.error) if done.error else "ComfyUI reported an error."
            await self._finish(job_id, GenerationStatus.FAILED, message)

    async def _queue(
        self, job_id: int, conn: ComfyConnection, prompt_id: str, workflow: dict[str, Any]
    ) -> None:
        try:
            queued = await conn.client.queue_prompt(workflow, prompt_id=prompt_id)
        except ComfyValidationError as exc:
            raise GenerationFailed(str(exc)) from None
        except ComfyUnreachable as exc:
            raise ServerFailure(str(exc)) from None
        position = None
        try:
            # Shared and at most a couple of seconds old: the follow loop refreshes it.
            queue = await self._queue_snapshot(conn)
            position = queue.position(prompt_id)
        except ComfyError:
            pass
        self._live[job_id].queue_position = position
        async with self._sessions.begin() as session:
            row = await session.get(ComfyGeneration, job_id)
            assert row is not None
            row.status = GenerationStatus.QUEUED.value
            row.queue_position = position
            row.attempts = max(row.attempts, 1)
            await session.flush()
            view = self._remember(row)
        log.info(
            "generation %s queued on server %s as %s (#%s)",
            job_id,
            conn.server_id,
            prompt_id,
            queued.number,
        )
        await self._emit(view)

    async def _queue_snapshot(self, conn: ComfyConnection, *, fresh: bool = False) -> Any:
        """ComfyUI's queue, shared by all jobs on a server for a couple of seconds."""
        hit = self._queue_cache.get(conn.server_id)
        if hit and not fresh and time.monotonic() - hit[0] < QUEUE_SNAPSHOT_TTL:
            return hit[1]
        queue = await conn.client.get_queue()
        self._queue_cache[conn.server_id] = (time.monotonic(), queue)
        return queue

    async def _follow(
        self, job_id: int, conn: ComfyConnection, sub: Any, workflow: dict[str, Any], live: _Live
    ) -> PromptDone:
        deadline = time.monotonic() + self._settings.comfy.job_timeout
        down_since: float | None = None
        next_position_check = 0.0
        prompt_id = sub.prompt_id
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                await self._try_interrupt(conn, prompt_id)
                raise GenerationFailed("The job took too long and was stopped.")
            try:
                # Jobs far back in a queue wake rarely; running ones often enough to notice
                # a dead server within failover_after.
                far = not live.started and (live.queue_position or 0) > 5
                event = await sub.get(timeout=min(left, 8.0 if far else 2.0))
            except TimeoutError:
                event = None
            except StopAsyncIteration:
                raise ServerFailure("the connection to it closed") from None
            if not conn.stream.connected:
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > self._settings.comfy.failover_after:
                    raise ServerFailure("it stopped answering")
            else:
                down_since = None
            if event is None:
                if not live.started and time.monotonic() >= next_position_check:
                    await self._refresh_position(job_id, conn, prompt_id, live)
                    # Far back in the line, the position changes slowly: look less often.
                    far = (live.queue_position or 0) > 5
                    next_position_check = time.monotonic() + (8.0 if far else 0.0)
                continue
            # Take everything already waiting: only the newest progress and preview
            # matter, and the end of the prompt must not wait behind stale frames.
            batch = [event, *sub.drain()]
            done = next((e for e in batch if isinstance(e, PromptDone)), None)
            if done is not None:
                return done
            last_progress = max(
                (i for i, e in enumerate(batch) if isinstance(e, Progress)), default=-1
            )
            last_preview = max(
                (i for i, e in enumerate(batch) if isinstance(e, PreviewEvent)), default=-1
            )
            for index, item in enumerate(batch):
                if isinstance(item, Progress) and index != last_progress:
                    continue
                if isinstance(item, PreviewEvent) and index != last_preview:
                    continue
                await self._on_event(job_id, item, workflow, live)

    async def _refresh_position(
        self, job_id: int, conn: ComfyConnection, prompt_id: str, live: _Live
    ) -> None:
        try:
            queue = await self._queue_snapshot(conn)
        except ComfyError:
            return
        position = queue.position(prompt_id)
        if position != live.queue_position and position is not None:
            live.queue_position = position
            await self._publish(job_id)

    async def _on_event(
        self, job_id: int, event: Any, workflow: dict[str, Any], live: _Live
    ) -> None:
        if isinstance(event, ExecutionStart | Executing | Progress):
            live.started = True
        if isinstance(event, ExecutionStart):
            # Shown at once from memory; the row learns it with the next write (progress
            # or the end): a restart resumes queued and running jobs alike.
            live.queue_position = None
            live.started_at = live.started_at or self._clock()
            await self._publish(job_id)
        elif isinstance(event, Executing) and event.node is not None:
            live.queue_position = None
            node = workflow.get(event.node, {})
            title = node.get("_meta", {}).get("title") or node.get("class_type") or event.node
            live.current_node = str(title)
            await self._publish(job_id)
        elif isinstance(event, Progress):
            live.queue_position = None
            if live.first_step_at is None or event.value <= 1:
                live.first_step_at = time.monotonic()
            live.step, live.max_steps = event.value, event.max
            now = time.monotonic()
            if not live.last_db_write:
                # The row learns the progress of a short job at its end: the first save
                # comes one interval into the run.
                live.last_db_write = now
            elif now - live.last_db_write > PROGRESS_DB_INTERVAL:
                live.last_db_write = now
                await self._save_progress(job_id, event.value / max(event.max, 1), live)
            await self._publish(job_id)
        elif isinstance(event, PreviewEvent):
            await self._publish(job_id, preview=event.image_bytes)
        elif isinstance(event, ExecutionCached | Disconnected):
            return

    async def _workflow_for(
        self, job_id: int, client: ComfyClient, spec: _JobSpec
    ) -> dict[str, Any]:
        p, prompt, negative = spec.parameters, spec.prompt, spec.negative
        uploaded: str | None = None
        if p.get("input_path"):
            path = Path(p["input_path"])
            try:
                data = await asyncio.to_thread(path.read_bytes)
            except OSError:
                raise GenerationFailed("The input image of this job is gone.") from None
            try:
                result = await client.upload_image(data, f"comfyvast-{path.name}")
            except ComfyUnreachable as exc:
                raise ServerFailure(str(exc)) from None
            uploaded = result.load_image_value
        if p.get("kind") == "upscale":
            if uploaded is None:
                raise GenerationFailed("Nothing to upscale.")
            return upscale_workflow(uploaded, p["upscale_model"], job_id)
        if spec.custom is not None:
            custom_workflow, mapping = spec.custom
            values: dict[str, Any] = {}
            for key, value in (
                ("prompt", prompt),
                ("negative", negative),
                ("seed", p.get("seed")),
                ("steps", p.get("steps")),
                ("cfg", p.get("cfg")),
                ("width", p.get("width")),
                ("height", p.get("height")),
                ("model", p.get("model")),
                ("sampler", p.get("sampler")),
                ("scheduler", p.get("scheduler")),
                ("batch", p.get("batch")),
                ("image", uploaded),
            ):
                if key in mapping and value is not None:
                    values[key] = value
            return apply_param_map(
                custom_workflow, {k: [tuple(t) for t in v] for k, v in mapping.items()}, values
            )
        loras = (LoraSpec(p["lora"], float(p.get("lora_strength", 1.0))),) if p.get("lora") else ()
        params = GenerationParams(
            prompt=prompt,
            negative=negative,
            model=p["model"],
            width=p["width"],
            height=p["height"],
            steps=p["steps"],
            cfg=p["cfg"],
            seed=p["seed"],
            sampler=p["sampler"],
            scheduler=p["scheduler"],
            batch=p["batch"],
            loras=loras,
            init_image=uploaded,
            denoise=float(p.get("denoise", 1.0)),
            filename_prefix=f"comfyvast/job-{job_id}",
        )
        return build_workflow(params)

    async def _deliver(
        self, job_id: int, conn: ComfyConnection, outputs: list[OutputImage],
        *, check_existing: bool = False,
    ) -> None:
        images = [o for o in outputs if o.type == "output"] or outputs
        if not images:
            await self._finish(job_id, GenerationStatus.FAILED, "ComfyUI finished without images.")
            return

        async def fetch(image: OutputImage) -> ImageFile:
            return ImageFile(image.filename.rsplit("/", 1)[-1], await conn.client.view_image(image))

        # Nothing is written between ComfyUI's success and the post: the result reaches
        # the channel as fast as a bare relay would. A restart in between never posts
        # twice: the row still says queued or running, the resumed job finds its result
        # in ComfyUI's history and looks for its own earlier post first (and the post
        # carries a nonce). So the row never says "uploading" now; older rows may.
        files = await asyncio.gather(*(fetch(o) for o in images))
        live = self._live.get(job_id)
        if live is not None:
            live.current_node = None
            live.step = live.max_steps
        view = await self.snapshot(job_id)
        if view.server_name is None and view.server_id is not None:
            view = await self._refresh_view(job_id)
        view = replace(view, status=GenerationStatus.UPLOADING.value, progress=1.0,
                       image_count=len(images))
        await self.observer.deliver(view, list(files), check_existing=check_existing)
        final = await self._complete(job_id, len(images), [
            {"filename": o.filename, "subfolder": o.subfolder, "type": o.type} for o in images
        ])
        try:
            await self.observer.on_finished(final)
        except Exception:
            log.exception("could not show the end of generation %s", job_id)

    async def _complete(self, job_id: int, count: int, image_urls: list[Any]) -> JobView:
        """Write a delivered job's end with plain UPDATEs (no read first: the row as last
        written is in the view cache) and return its final view."""
        base = await self._last_written(job_id)
        live = self._live.get(job_id)
        now = self._clock()
        started_at = base.started_at or (live.started_at if live else None)
        values: dict[str, Any] = {
            "status": GenerationStatus.COMPLETED.value, "progress": 1.0, "current_node": None,
            "queue_position": None, "image_urls": image_urls, "started_at": started_at,
            "completed_at": now, "delivered_at": now,
        }
        async with self._sessions.begin() as session:
            await session.execute(
                update(ComfyGeneration).where(ComfyGeneration.id == job_id).values(values),
                execution_options={"synchronize_session": False},
            )
            if base.server_id is not None:
                # A finished job is activity: idle autostop counts from here.
                await session.execute(
                    update(Server).where(Server.id == base.server_id).values(last_used_at=now),
                    execution_options={"synchronize_session": False},
                )
        return replace(
            base, status=GenerationStatus.COMPLETED.value, progress=1.0, current_node=None,
            queue_position=None, eta_seconds=None, started_at=started_at, completed_at=now,
            image_count=count,
        )

    async def _try_interrupt(self, conn: ComfyConnection, prompt_id: str) -> None:
        try:
            await conn.client.interrupt(prompt_id)
        except ComfyError:
            pass

    @staticmethod
    def _apply_start(row: ComfyGeneration, live: _Live | None) -> None:
        """Write the start that was kept in memory (see _on_event)."""
        if live is None or live.started_at is None:
            return
        if row.status in (GenerationStatus.PENDING.value, GenerationStatus.QUEUED.value):
            row.status = GenerationStatus.RUNNING.value
            row.queue_position = None
        if row.started_at is None:
            row.started_at = live.started_at

    async def _save_progress(self, job_id: int, progress: float, live: _Live) -> None:
        async with self._sessions.begin() as session:
            row = await session.get(ComfyGeneration, job_id)
            if row is not None:
                row.progress = progress
                row.current_node = live.current_node
                self._apply_start(row, live)

    async def _finish(self, job_id: int, status: GenerationStatus, error: str | None) -> None:
        async with self._sessions.begin() as session:
            row = await session.get(ComfyGeneration, job_id)
            if row is None or GenerationStatus(row.status).finished:
                return
            self._apply_start(row, self._live.get(job_id))
            row.status = status.value
            row.error_message = error
            row.completed_at = self._clock()
            row.queue_position = None
            await session.flush()
            server = await session.get(Server, row.server_id) if row.server_id else None
            final = self._overlay(self._base_view(row, server.name if server else None))
        try:
            await self.observer.on_finished(final)
        except Exception:
            log.exception("could not show the end of generation %s", job_id)

    async def _emit(self, view: JobView) -> None:
        """Tell the observer about a transition whose row the caller just wrote."""
        if view.server_name is None and view.server_id is not None:
            view = await self._refresh_view(view.id)  # nothing cached yet: read it once
        try:
            await self.observer.on_update(view, None)
        except Exception:
            log.exception("progress update for generation %s failed", view.id)

    async def _publish(self, job_id: int, preview: bytes | None = None) -> None:
        """Tell the observer about live progress (no database read while the job runs).

        This runs for every step and preview, so the view passed is the row as last
        written, without live progress: the observer reads :meth:`snapshot` when it
        renders, which happens far less often.
        """
        try:
            view = await self._last_written(job_id)
            await self.observer.on_update(view, preview)
        except Exception:
            log.exception("progress update for generation %s failed", job_id)


def upscale_workflow(image: str, model: str, job_id: int) -> dict[str, Any]:
    """LoadImage -> UpscaleModelLoader + ImageUpscaleWithModel -> SaveImage."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": model}},
        "3": {
            "class_type": "ImageUpscaleWithModel",
            "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]},
        },
        "4": {
            "class_type": "SaveImage",
            "inputs": {"images": ["3", 0], "filename_prefix": f"comfyvast/upscale-{job_id}"},
        },
    }

