"""How a job ends: its images posted and the row completed, or the row failed/cancelled.

Each end is written by one guarded transition of the store; when it loses (the job had
ended meanwhile), the end that won was already shown and nothing more is said.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from core.comfy.client import OutputImage
from core.comfy.pool import ComfyConnection, ComfyPool
from core.db.models import GenerationStatus
from core.errors import ValidationFailed
from core.generation.live import LiveJobs
from core.generation.store import GenerationStore
from core.generation.types import JobView
from core.images import ImageFile, ImageRejected, inspect
from core.servers import ServerRegistry

log = logging.getLogger(__name__)

# A job asks for at most limits.max_batch (<= 16) images. A server that announces more is
# not believed, and a few fetches run at once: a hostile server cannot make the bot hold
# a hundred /view answers (each capped at 64 MiB) in memory.
MAX_OUTPUTS = 16
FETCH_CONCURRENCY = 4


class Delivery:
    """Posts a job's result and writes how it ended."""

    def __init__(
        self,
        store: GenerationStore,
        live: LiveJobs,
        registry: ServerRegistry,
        pool: ComfyPool,
        clock: Callable[[], dt.datetime],
    ) -> None:
        self._store = store
        self._live = live
        self._registry = registry
        self._pool = pool
        self._clock = clock

    async def deliver(
        self, job_id: int, conn: ComfyConnection, outputs: list[OutputImage],
        *, check_existing: bool = False,
    ) -> None:
        """Fetch the images from ComfyUI, post them, then write the end."""
        images = [o for o in outputs if o.type == "output"] or outputs
        if not images:
            await self.finish(job_id, GenerationStatus.FAILED, "ComfyUI finished without images.")
            return
        if len(images) > MAX_OUTPUTS:
            log.warning("generation %s: ComfyUI announced %d outputs; fetching the first %d",
                        job_id, len(images), MAX_OUTPUTS)
            images = images[:MAX_OUTPUTS]
        fetching = asyncio.Semaphore(FETCH_CONCURRENCY)

        async def fetch(image: OutputImage) -> bytes:
            async with fetching:
                return await conn.client.view_image(image)

        # Nothing is written between ComfyUI's success and the post: the result reaches
        # the channel as fast as a bare relay would. A restart in between never posts
        # twice: the row still says queued or running, the resumed job finds its result
        # in ComfyUI's history and looks for its own earlier post first (and the post
        # carries a nonce). So the row never says "uploading" now; older rows may.
        files, refused = checked_images(job_id, await asyncio.gather(*(fetch(o) for o in images)))
        if refused:
            log.warning("generation %s: ComfyUI sent %d output(s) that were refused: %s",
                        job_id, len(refused), "; ".join(refused))
        if not files:
            await self.finish(job_id, GenerationStatus.FAILED,
                              f"ComfyUI's output was refused: {refused[0]}.")
            return
        live = self._live.peek(job_id)
        if live is not None:
            live.current_node = None
            live.step = live.max_steps
        view = await self._live.snapshot(job_id)
        if view.server_name is None and view.server_id is not None:
            view = await self._live.refresh(job_id)
        view = replace(view, status=GenerationStatus.UPLOADING.value, progress=1.0,
                       image_count=len(files))
        await self._live.observer.deliver(view, files, check_existing=check_existing)
        final = await self.complete(job_id, len(files), [
            {"filename": o.filename, "subfolder": o.subfolder, "type": o.type} for o in images
        ])
        if final is not None:
            await self._live.finished(final)

    async def complete(self, job_id: int, count: int, image_urls: list[Any]) -> JobView | None:
        """Write a delivered job's end with plain UPDATEs (no read first: the row as last
        written is in the view cache) and return its final view; None if it had ended."""
        base = await self._live.last_written(job_id)
        live = self._live.peek(job_id)
        now = self._clock()
        started_at = base.started_at or (live.started_at if live else None)
        won = await self._store.complete(
            job_id, server_id=base.server_id, image_urls=image_urls, started_at=started_at,
            now=now,
        )
        if not won:
            log.info("generation %s ended before its delivery was written", job_id)
            return None
        return replace(
            base, status=GenerationStatus.COMPLETED.value, progress=1.0, current_node=None,
            queue_position=None, eta_seconds=None, started_at=started_at, completed_at=now,
            image_count=count,
        )

    async def finish(self, job_id: int, status: GenerationStatus, error: str | None) -> None:
        """End a job as failed or cancelled (nothing happens if it had ended already)."""
        live = self._live.peek(job_id)
        ended = await self._store.finish(
            job_id, status, error, started_at=live.started_at if live else None,
            now=self._clock(),
        )
        if ended is not None:
            await self._live.finished(self._live.view(*ended))

    async def output_images(self, job_id: int) -> list[ImageFile]:
        """Fetch a finished job's images again from its server (for upscaling)."""
        job = await self._live.get(job_id)
        if job.status != GenerationStatus.COMPLETED.value or job.server_id is None:
            raise ValidationFailed(f"Generation #{job_id} has no finished images.")
        row = await self._store.load(job_id)
        refs = list(row.image_urls or []) if row else []
        conn = await self._pool.get(await self._registry.get(job.server_id))
        blobs = [
            await conn.client.view(
                ref["filename"], ref.get("subfolder", ""), ref.get("type", "output")
            )
            for ref in refs
        ]
        files, refused = checked_images(job_id, blobs)
        if not files:
            raise ValidationFailed(f"Generation #{job_id} has no finished images.")
        return files


def checked_images(job_id: int, blobs: list[bytes]) -> tuple[list[ImageFile], list[str]]:
    """The outputs that are images, each named by the bot (``comfyvast-<job>-<n>.<ext>``,
    never ComfyUI's file name), and why the others were refused.

    Only the header is read (Pillow identifies the format and the size without decoding):
    a file is posted as what it really is, and one too large to decode is not posted."""
    files: list[ImageFile] = []
    refused: list[str] = []
    for index, data in enumerate(blobs, start=1):
        try:
            info = inspect(data)
        except ImageRejected as exc:
            refused.append(f"output {index}: {exc}")
            continue
        files.append(ImageFile(f"comfyvast-{job_id}-{index}{info.suffix}", data))
    return files, refused
