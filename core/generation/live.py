"""What the Discord side sees of running jobs: views, live progress, notifications.

The database gets transitions, not every step: a running job's progress lives in a
:class:`LiveState` in memory, and the row as last written is cached as a view, so the
many progress events and previews per second never read the database. Views are built
here, above the store, from the rows it returns.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from core.db.models import ComfyGeneration, GenerationStatus
from core.errors import NotFound
from core.generation.store import GenerationStore
from core.generation.types import JobObserver, JobView

log = logging.getLogger(__name__)


@dataclass
class LiveState:
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
    # The last written view and that view marked running (publish, once per written row).
    running_view: tuple[JobView, JobView] | None = None
    # Whether the job has an input image to delete at its end (None: not known yet).
    has_input: bool | None = None


def job_view(row: ComfyGeneration, server_name: str | None) -> JobView:
    """The row as a view, without live progress."""
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


class LiveJobs:
    """Live state and cached views of running jobs, and the observer they are shown to."""

    def __init__(self, store: GenerationStore) -> None:
        self._store = store
        self.observer: JobObserver = JobObserver()
        self._states: dict[int, LiveState] = {}
        self._views: dict[int, JobView] = {}  # row snapshots of running jobs
        # Told when a job ended (a slot freed): jobs waiting for a pool's server are placed
        # (core.generation.waiting).
        self.on_end: Callable[[], None] | None = None

    def state(self, job_id: int) -> LiveState:
        """The live state of a job, created on first use."""
        return self._states.setdefault(job_id, LiveState())

    def peek(self, job_id: int) -> LiveState | None:
        return self._states.get(job_id)

    def seed(
        self, row: ComfyGeneration, server_name: str | None,
        channel_id: int | None, message_id: int | None,
    ) -> None:
        """A job about to run from a row just written (and its status message attached
        since): cache its view, so its first transitions read nothing back."""
        self.state(row.id)
        view = job_view(row, server_name)
        self._views[row.id] = replace(
            view, channel_id=channel_id or view.channel_id, message_id=message_id
        )

    def forget(self, job_id: int) -> None:
        """The job's task ended: drop its live state and cached view."""
        self._states.pop(job_id, None)
        self._views.pop(job_id, None)

    # ------------------------------------------------------------------ views

    async def get(self, job_id: int) -> JobView:
        found = await self._store.load_named(job_id)
        if found is None:
            raise NotFound(f"There is no generation #{job_id}.")
        return self.view(*found)

    async def snapshot(self, job_id: int) -> JobView:
        """The job as shown while it runs: the row as last read plus live progress.

        Progress and previews arrive many times a second per job; reading the database
        for each would dominate the bot's CPU, so the row is re-read only on transitions.
        """
        base = self._views.get(job_id)
        if base is None:
            return await self.refresh(job_id)
        return self.overlay(base)

    async def refresh(self, job_id: int) -> JobView:
        """Read the row again (and cache it while the job runs)."""
        view = await self.get(job_id)
        if job_id in self._states:
            self._views[job_id] = view
        return view

    async def last_written(self, job_id: int) -> JobView:
        """The row as last written (cached for running jobs, read otherwise)."""
        return self._views.get(job_id) or await self.refresh(job_id)

    def remember(self, row: ComfyGeneration) -> JobView:
        """A view of a row just written; kept for running jobs.

        Saves a second database read on every transition: the server name (which never
        changes under a job, except on failover, which re-reads) comes from the cache.
        """
        cached = self._views.get(row.id)
        name = cached.server_name if cached and cached.server_id == row.server_id else None
        view = job_view(row, name)
        if row.id in self._states and name is not None:
            self._views[row.id] = view
        return self.overlay(view)

    def view(self, row: ComfyGeneration, server_name: str | None) -> JobView:
        return self.overlay(job_view(row, server_name))

    def overlay(self, view: JobView) -> JobView:
        """``view`` with the job's live progress, if it runs."""
        live = self._states.get(view.id)
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

    # ------------------------------------------------------------------ notifications

    async def emit(self, view: JobView) -> None:
        """Tell the observer about a transition whose row the caller just wrote."""
        if view.server_name is None and view.server_id is not None:
            view = await self.refresh(view.id)  # nothing cached yet: read it once
        try:
            await self.observer.on_update(view, None)
        except Exception:
            log.exception("progress update for generation %s failed", view.id)

    async def publish(self, job_id: int, preview: bytes | memoryview | None = None) -> None:
        """Tell the observer about live progress (no database read while the job runs).

        This runs for every step and preview, so the view passed is the row as last
        written, without live progress: the observer reads :meth:`snapshot` when it
        renders, which happens far less often.
        """
        try:
            view = await self.last_written(job_id)
            live = self._states.get(job_id)
            if live is not None and live.started_at is not None \
                    and view.status in ("pending", "queued"):
                # It runs, though the row does not say so yet: the observer paces a
                # running job's status differently from a waiting one's. (Made once per
                # written row: this runs for every step.)
                if live.running_view is None or live.running_view[0] is not view:
                    marked = replace(view, status=GenerationStatus.RUNNING.value)
                    live.running_view = (view, marked)
                view = live.running_view[1]
            await self.observer.on_update(view, preview)
        except Exception:
            log.exception("progress update for generation %s failed", job_id)

    async def finished(self, view: JobView) -> None:
        """Tell the observer a job ended; a failure to show it is only logged."""
        if self.on_end is not None:
            self.on_end()
        try:
            await self.observer.on_finished(view)
        except Exception:
            log.exception("could not show the end of generation %s", view.id)
