"""Moving jobs that wait in one server's ComfyUI queue to a server that just came up.

Used by the pools' autoscaler (core.pools): a burst queued on the running servers shares
the new one. Only jobs still waiting move (never one ComfyUI has started), the last
queued first, up to an even share; a job pinned to its server or whose model the new
server lacks stays. Each move stops following the job, removes its prompt from the old
queue, checks it did not start meanwhile, then moves the row (the guarded write in the
store) and follows it again: on the new server, or where it was if anything went wrong.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Hashable

from core.comfy.pool import ComfyPool
from core.db.models import GenerationStatus
from core.errors import ComfyVastError
from core.generation.placement import Placement, PoolChoice
from core.generation.runner import JobRunner
from core.generation.store import GenerationStore
from core.servers import ServerView

log = logging.getLogger(__name__)


class Rebalancer:
    def __init__(self, store: GenerationStore, runner: JobRunner, pool: ComfyPool,
                 placement: Placement) -> None:
        self._store = store
        self._runner = runner
        self._pool = pool
        self._placement = placement

    def on_unplaced(self, callback: Callable[[Hashable], None]) -> None:
        """Call ``callback`` whenever a job finds no server with room (pools' demand),
        with the job's identity (the same member's same request is one job)."""
        self._placement.on_unplaced = callback

    def pools_from(self, pools: Callable[[], Awaitable[list[PoolChoice]]]) -> None:
        """Where a job that finds no room may wait (core.generation.waiting): the pools
        ``pools`` lists, instead of being refused."""
        self._placement.pools = pools

    async def to(self, target: ServerView, sources: list[ServerView]) -> list[int]:
        """Move an even share of the jobs waiting on ``sources`` to ``target``; the ids."""
        by_id = {s.id: s for s in sources if s.id != target.id}
        try:
            models = set(await self._placement.catalog.models(target, "checkpoints",
                                                              fresh=True))
        except ComfyVastError as exc:
            log.warning("not moving jobs to %s: %s", target.name, exc)
            return []
        waiting: list[tuple[int, ServerView, str]] = []
        for job_id in await self._store.active_ids():
            row = await self._store.load(job_id)
            if (row is None or row.server_id not in by_id or not row.comfy_prompt_id
                    or row.status != GenerationStatus.QUEUED.value):
                continue
            params = row.parameters or {}
            model = params.get("model")
            if params.get("explicit_server") or (model and model not in models):
                continue
            waiting.append((job_id, by_id[row.server_id], row.comfy_prompt_id))
        share = len(waiting) // (len(by_id) + 1)
        moved: list[int] = []
        for job_id, source, prompt_id in sorted(waiting, key=lambda w: -w[0])[:share]:
            if await self._move(job_id, source, prompt_id, target):
                moved.append(job_id)
        if moved:
            log.info("moved jobs %s to %s", moved, target.name)
        return moved

    async def _move(self, job_id: int, source: ServerView, prompt_id: str,
                    target: ServerView) -> bool:
        await self._runner.detach(job_id)
        moved = False
        try:
            client = (await self._pool.get(source)).client
            if prompt_id in (await client.get_queue()).pending_ids:
                # ComfyUI deletes only pending prompts; one that started meanwhile stays.
                await client.delete_from_queue([prompt_id])
                after = await client.get_queue()
                started = prompt_id in after.running_ids or prompt_id in after.pending_ids
                if not started and await client.get_prompt_result(prompt_id) is None:
                    moved = await self._store.move(job_id, target.id)
        except ComfyVastError as exc:
            log.warning("job %s stays on %s: %s", job_id, source.name, exc)
        finally:
            # Followed again either way: queued anew on the target, or found where it was.
            self._runner.start(job_id, resumed=not moved)
        return moved
