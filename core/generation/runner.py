"""Running jobs: queue the prompt, follow it, deliver it, move it once if its server fails.

Each job runs in one background task of a :class:`TaskRegistry` keyed by its id, so a job
is never run twice at once and cancelling it means cancelling that task. The row is
written before every side effect: a restarted bot resumes each unfinished job from it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.audit import Actor
from core.comfy.client import ComfyClient
from core.comfy.errors import ComfyError, ComfyUnreachable, ComfyValidationError
from core.comfy.pool import ComfyConnection, ComfyPool
from core.db.models import ComfyGeneration, ComfyWorkflow, GenerationStatus
from core.errors import GENERIC_FAILURE, ComfyVastError, PermissionDenied, ValidationFailed
from core.generation.delivery import Delivery
from core.generation.follow import Follower, QueueSnapshots, node_titles
from core.generation.inputs import InputFiles
from core.generation.live import LiveJobs, LiveState
from core.generation.placement import Placement
from core.generation.store import GenerationStore
from core.generation.types import GenerationFailed, JobView, ServerFailure
from core.generation.workflow import JobSpec, job_workflow
from core.servers import ServerRegistry, ServerView
from core.tasks import TaskRegistry

log = logging.getLogger(__name__)


class _Ended(Exception):
    """A guarded write lost: the job was ended elsewhere (cancelled, abandoned)."""


@dataclass
class FirstAttempt:
    """What submission already knows of a new job: its first attempt needs no read."""

    row: ComfyGeneration
    custom: ComfyWorkflow | None
    server: ServerView
    # Where its status message is (written after the row, by attach_message).
    channel_id: int | None = None
    message_id: int | None = None


@dataclass(frozen=True, slots=True)
class _Attempt:
    """What an attempt needs of the job's row. The row itself (an ORM object of about
    4 KB) is not kept while the job waits and runs: 2,000 jobs in flight held 8 MB."""

    prompt_id: str | None
    pending: bool  # not queued on ComfyUI yet
    spec: JobSpec


def _attempt_of(row: ComfyGeneration, custom: ComfyWorkflow | None) -> _Attempt:
    return _Attempt(
        row.comfy_prompt_id,
        row.status == GenerationStatus.PENDING,
        JobSpec(
            dict(row.parameters or {}), row.prompt, row.negative_prompt or "",
            (custom.workflow, custom.param_map or {}) if custom is not None else None,
        ),
    )


class JobRunner:
    """Starts, runs, cancels and stops the background task of each job."""

    def __init__(
        self,
        store: GenerationStore,
        live: LiveJobs,
        placement: Placement,
        delivery: Delivery,
        follower: Follower,
        queues: QueueSnapshots,
        registry: ServerRegistry,
        pool: ComfyPool,
        inputs: InputFiles,
    ) -> None:
        self._store = store
        self._inputs = inputs
        self._live = live
        self._placement = placement
        self._delivery = delivery
        self._follower = follower
        self._queues = queues
        self._registry = registry
        self._pool = pool
        self._tasks = TaskRegistry("generation")
        # What submission knew of a job about to start, until its task takes it (held
        # here, not by the task's frames: none of it is needed once the attempt began).
        self._first: dict[int, FirstAttempt] = {}

    def start(
        self, job_id: int, *, resumed: bool = False, first: FirstAttempt | None = None
    ) -> None:
        """Run the job in a tracked background task (queue, follow, deliver).

        ``resumed``: a previous process may have posted the result already. ``first``: the
        row and server as submission wrote and chose them (saves reading them again).
        """
        if job_id in self._tasks:
            return
        if first is not None:
            # Shown from this view until the next transition: no read to name its server.
            self._live.seed(first.row, first.server.name, first.channel_id, first.message_id)
            self._first[job_id] = first
        self._tasks.spawn(
            self._run(job_id, resumed), key=job_id, name=f"generation-{job_id}",
            on_done=lambda _task: self._ended(job_id),
        )

    def _ended(self, job_id: int) -> None:
        self._live.forget(job_id)
        self._first.pop(job_id, None)  # a task cancelled before it began

    async def close(self) -> None:
        await self._tasks.close(timeout=None)

    async def detach(self, job_id: int) -> None:
        """Stop following a job without ending it: it is about to move (rebalance)."""
        task = self._tasks.get(job_id)
        if task is not None:
            task.cancel()
            await asyncio.wait([task])

    async def cancel(self, job: JobView, actor: Actor) -> None:
        """Cancel a job: dequeue it if waiting, interrupt exactly it if running."""
        if actor.user_id != job.user_id and not actor.is_admin:
            raise PermissionDenied(
                "Only the person who started this job or an admin can cancel it."
            )
        if job.finished:
            raise ValidationFailed(f"Generation #{job.id} already ended ({job.status}).")
        self._live.state(job.id).cancel_requested = True
        # Stop following it first, so it cannot be queued after we looked: the runner may
        # be between "POST /prompt" and recording it.
        task = self._tasks.get(job.id)
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        row = await self._store.load(job.id)
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
                log.warning("cancel of %s could not reach the server: %s", job.id, exc)
        await self._delivery.finish(job.id, GenerationStatus.CANCELLED, None)
        await self.discard_input(job.id)

    async def _run(self, job_id: int, resumed: bool = False) -> None:
        live = self._live.state(job_id)
        try:
            await self._drive(job_id, resumed)
        except asyncio.CancelledError:
            raise
        except _Ended:
            log.info("generation %s ended elsewhere; no longer followed", job_id)
        except ComfyVastError as exc:  # GenerationFailed included
            await self._delivery.finish(job_id, GenerationStatus.FAILED, str(exc))
        except Exception:
            log.exception("generation %s failed unexpectedly", job_id)
            await self._delivery.finish(job_id, GenerationStatus.FAILED, GENERIC_FAILURE)
        # Not on cancellation: a bot shutting down leaves the job (and its input) to resume.
        if live.has_input is not False:  # a read of the row for nothing, at every end
            await self.discard_input(job_id)

    async def discard_input(self, job_id: int) -> None:
        """Delete the job's input image once the job has ended (never while it runs: a
        failover or a restart uploads it again)."""
        try:
            row = await self._store.load(job_id)
            if row is None or not GenerationStatus(row.status).finished:
                return
            await self._inputs.discard((row.parameters or {}).get("input_path"))
        except Exception:  # a leftover file is swept on the next start
            log.exception("could not discard the input of generation %s", job_id)

    async def _drive(self, job_id: int, resumed: bool = False) -> None:
        """Run attempts until the job ends; a failed server is left for another once."""
        live = self._live.state(job_id)
        live.resumed = resumed
        first = self._first.pop(job_id, None)
        moved = False
        while True:
            if first is not None and not live.cancel_requested:
                # Just recorded as pending: the row and server as submission wrote and chose
                # them. A cancel that came first set cancel_requested (it needs no task).
                attempt, server = _attempt_of(first.row, first.custom), first.server
            else:
                loaded = await self._load_attempt(job_id)
                if loaded is None:
                    return
                attempt, server = loaded
            first = None
            live.has_input = bool(attempt.spec.parameters.get("input_path"))
            try:
                await self._execute(job_id, server, live, attempt)
                return
            except ServerFailure as failure:
                if moved or live.cancel_requested:
                    raise GenerationFailed(
                        f"Server '{server.name}' failed ({failure.reason}) and the job could "
                        "not be moved."
                    ) from None
                moved = True
                await self._move(job_id, server, failure, live)

    async def _load_attempt(self, job_id: int) -> tuple[_Attempt, ServerView] | None:
        """The next attempt, from the row as stored (a resumed or moved job); None when
        the job has ended or its result was delivered here."""
        found = await self._store.load_attempt(job_id)
        if found is None or GenerationStatus(found[0].status).finished:
            return None
        row, custom = found
        server_id = row.server_id
        if row.status == GenerationStatus.UPLOADING:
            # Crashed while delivering: the images are in ComfyUI's history.
            server = await self._registry.get(server_id) if server_id else None
            if server is not None:
                conn = await self._pool.get(server)
                result = await conn.client.get_prompt_result(row.comfy_prompt_id or "")
                if result is not None and result.status == "success":
                    # It may have been posted already: the observer checks first.
                    await self._delivery.deliver(
                        job_id, conn, list(result.outputs), check_existing=True
                    )
                    return None
        if server_id is None:
            raise GenerationFailed("The server of this job was removed.")
        return _attempt_of(row, custom), await self._registry.get(server_id)

    async def _move(
        self, job_id: int, server: ServerView, failure: ServerFailure, live: LiveState
    ) -> None:
        """Queue the job again: on the same server if it only forgot it, else elsewhere."""
        target = (
            server
            if failure.retry_here
            else await self._placement.failover_target(await self._live.get(job_id), server)
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
        if not await self._store.move(job_id, target.id):
            raise _Ended
        await self._live.emit(await self._live.refresh(job_id))

    async def _execute(
        self, job_id: int, server: ServerView, live: LiveState, attempt: _Attempt
    ) -> None:
        """One attempt on ``server``: queue (or find again) the prompt, follow, end."""
        try:
            conn = await self._pool.get(server)
        except ComfyError as exc:
            raise ServerFailure(str(exc)) from None
        prompt_id = attempt.prompt_id or str(uuid.uuid4())
        spec = attempt.spec
        # Warm the cache the result's Upscale button is decided from, off the critical path.
        self._placement.prefetch(server, "upscale_models")
        # Subscribe before queueing, so no message about the prompt can be missed. The
        # follow loop shows only the newest progress and preview: no older one waits.
        sub = conn.stream.subscribe(prompt_id, latest_only=True)
        try:
            workflow = job_workflow(job_id, spec, await self._upload_input(conn.client, spec))
            if attempt.pending:
                await self._queue(job_id, conn, prompt_id, workflow)
            else:
                # Resumed after a restart: ComfyUI's queue and history tell where it is.
                await conn.stream.reconcile()
            titles = node_titles(workflow)
            del workflow  # ComfyUI has the graph now; the status needs only its titles
            done = await self._follower.follow(job_id, conn, sub, titles, live)
        finally:
            sub.close()
        if done.status == "success":
            outputs = list(done.outputs) or await conn.client.get_prompt_outputs(prompt_id)
            await self._delivery.deliver(job_id, conn, outputs, check_existing=live.resumed)
        elif done.status == "interrupted" or live.cancel_requested:
            await self._delivery.finish(job_id, GenerationStatus.CANCELLED, None)
        elif done.status == "lost":
            alive = await conn.client.check_status()
            raise ServerFailure("lost the job" if alive else "it lost the job", retry_here=alive)
        else:
            message = str(done.error) if done.error else "ComfyUI reported an error."
            await self._delivery.finish(job_id, GenerationStatus.FAILED, message)

    @staticmethod
    async def _upload_input(client: ComfyClient, spec: JobSpec) -> str | None:
        """Upload the job's input image, if any; its name on the server."""
        input_path = spec.parameters.get("input_path")
        if not input_path:
            return None
        path = Path(input_path)
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except OSError:
            raise GenerationFailed("The input image of this job is gone.") from None
        try:
            result = await client.upload_image(data, f"comfyvast-{path.name}")
        except ComfyUnreachable as exc:
            raise ServerFailure(str(exc)) from None
        return result.load_image_value

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
            queue = await self._queues.get(conn)
            position = queue.position(prompt_id)
        except ComfyError:
            pass
        self._live.state(job_id).queue_position = position
        row = await self._store.mark_queued(job_id, position)
        if row is None:
            raise _Ended
        view = self._live.remember(row)
        log.info(
            "generation %s queued on server %s as %s (#%s)",
            job_id,
            conn.server_id,
            prompt_id,
            queued.number,
        )
        await self._live.emit(view)

