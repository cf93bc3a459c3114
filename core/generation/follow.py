"""Following one queued prompt on ComfyUI until it ends.

The follow loop turns ComfyUI's events into live progress (shown at once) and, now and
then, a progress save; it watches the connection, so a server that stops answering
becomes a :class:`ServerFailure` the runner can move the job away from.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from typing import Any

from core.comfy.errors import ComfyError
from core.comfy.events import (
    Disconnected,
    Executing,
    ExecutionCached,
    ExecutionStart,
    PreviewEvent,
    Progress,
    PromptDone,
)
from core.comfy.pool import ComfyConnection
from core.config import ComfySettings
from core.generation.live import LiveJobs, LiveState
from core.generation.store import GenerationStore
from core.generation.types import GenerationFailed, ServerFailure
from core.shared_read import SharedReads

QUEUE_SNAPSHOT_TTL = 2.0
PROGRESS_DB_INTERVAL = 5.0
# A running job's loop handles its events at most this often while only progress and
# previews come (the newest of each is kept meanwhile; anything else wakes it at once).
# Its status is edited about once a second, so a step shown up to 0.2 s later is not seen,
# and the loop wakes a few times a second instead of for every step and preview
# (bench.relay --scale, py-spy: the follow loops went from 11-14 % of the bot's CPU to 8 %).
PROGRESS_SETTLE = 0.2


class QueueSnapshots:
    """ComfyUI's queue per server, shared by all jobs on it for a couple of seconds.

    Jobs queued together look at the queue together: one request per server answers all
    of them (the queue holds every waiting prompt's whole graph, so each copy costs)."""

    def __init__(self) -> None:
        self._reads: SharedReads[int, Any] = SharedReads(QUEUE_SNAPSHOT_TTL)

    async def get(self, conn: ComfyConnection, *, fresh: bool = False) -> Any:
        return await self._reads.get(conn.server_id, conn.client.get_queue, fresh=fresh)


def node_titles(workflow: dict[str, Any]) -> dict[str, str]:
    """What the status shows for each node of a workflow: its title, else its class.

    The follow loop keeps only this, not the graph (about 3.6 KB per job for the built-in
    txt2img, more for a custom workflow; with 2,000 jobs in flight, the graphs were
    several MB that nothing read after the prompt was queued)."""
    titles: dict[str, str] = {}
    for node_id, node in workflow.items():
        if isinstance(node, dict):
            meta = node.get("_meta")
            title = (meta.get("title") if isinstance(meta, dict) else None) or node.get(
                "class_type")
            if title:
                titles[str(node_id)] = str(title)
    return titles


async def try_interrupt(conn: ComfyConnection, prompt_id: str) -> None:
    try:
        await conn.client.interrupt(prompt_id)
    except ComfyError:
        pass


class Follower:
    """Turns a prompt's ComfyUI events into live progress until the prompt ends."""

    def __init__(
        self,
        settings: ComfySettings,
        store: GenerationStore,
        live: LiveJobs,
        queues: QueueSnapshots,
        clock: Callable[[], dt.datetime],
    ) -> None:
        self._settings = settings
        self._store = store
        self._live = live
        self._queues = queues
        self._clock = clock

    async def follow(
        self, job_id: int, conn: ComfyConnection, sub: Any, titles: dict[str, str],
        live: LiveState,
    ) -> PromptDone:
        """Wait for the prompt's end, showing its progress on the way (``titles``: the
        workflow's :func:`node_titles`)."""
        deadline = time.monotonic() + self._settings.job_timeout
        down_since: float | None = None
        next_position_check = 0.0
        prompt_id = sub.prompt_id
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                await try_interrupt(conn, prompt_id)
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
                if time.monotonic() - down_since > self._settings.failover_after:
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
                await self.on_event(job_id, item, titles, live)
            if live.started:
                await sub.settle(min(PROGRESS_SETTLE, max(0.0, deadline - time.monotonic())))

    async def _refresh_position(
        self, job_id: int, conn: ComfyConnection, prompt_id: str, live: LiveState
    ) -> None:
        try:
            queue = await self._queues.get(conn)
        except ComfyError:
            return
        position = queue.position(prompt_id)
        if position != live.queue_position and position is not None:
            live.queue_position = position
            await self._live.publish(job_id)

    async def on_event(
        self, job_id: int, event: Any, titles: dict[str, str], live: LiveState
    ) -> None:
        if isinstance(event, ExecutionStart | Executing | Progress):
            live.started = True
        if isinstance(event, ExecutionStart):
            # Shown at once from memory; the row learns it with the next write (progress
            # or the end): a restart resumes queued and running jobs alike.
            live.queue_position = None
            live.started_at = live.started_at or self._clock()
            await self._live.publish(job_id)
        elif isinstance(event, Executing) and event.node is not None:
            live.queue_position = None
            live.current_node = titles.get(event.node) or event.node
            await self._live.publish(job_id)
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
                await self._store.save_progress(
                    job_id, event.value / max(event.max, 1), live.current_node, live.started_at
                )
            await self._live.publish(job_id)
        elif isinstance(event, PreviewEvent):
            await self._live.publish(job_id, preview=event.image_bytes)
        elif isinstance(event, ExecutionCached | Disconnected):
            return
