"""Where a job runs: the model catalog, server choice under a lock, failover targets.

A server is chosen for a request among the ready ones that have its model, the least
loaded first; a slot on it is held from the choice until the job's row exists, so
concurrent submissions spread instead of all seeing the same least-busy server.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable

from core.audit import Actor
from core.comfy.errors import ComfyError
from core.comfy.pool import ComfyPool
from core.config import Settings
from core.errors import ComfyVastError, ResourceBusy, ValidationFailed
from core.generation.types import GenerationRequest, JobView
from core.servers import ServerRegistry, ServerView
from core.tasks import TaskRegistry

log = logging.getLogger(__name__)

CATALOG_TTL = 60.0


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


class Placement:
    """Chooses servers for jobs and knows which models each server has."""

    def __init__(self, settings: Settings, registry: ServerRegistry, pool: ComfyPool) -> None:
        self._settings = settings
        self._registry = registry
        self.catalog = ModelCatalog(pool)
        # Jobs chosen for a server but not inserted yet, so concurrent submissions spread.
        self._reserved: dict[int, int] = {}
        self._choose_lock = asyncio.Lock()
        self._prefetches = TaskRegistry("generation-prefetch")
        # Told when a job finds no server (none running, or every one full): the pools'
        # autoscaler counts it as demand (core.pools), so a pool at zero can start one.
        # Given the request's identity: a member sending the same job again is one job.
        self.on_unplaced: Callable[[Hashable], None] | None = None

    def _unplaced(self, req: GenerationRequest) -> None:
        if self.on_unplaced is not None:
            a = req.actor
            self.on_unplaced((a.user_id, a.channel_id, req.kind, req.prompt, req.model,
                              req.workflow, req.parent_id))

    async def choose(
        self, req: GenerationRequest, *, exclude: set[int], model: str | None = None
    ) -> ServerView:
        """Explicit server if given; else a ready one with the model and fewest jobs.

        The caller must :meth:`release` the slot reserved on the server returned.
        """
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
            self._unplaced(req)
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
        return await self._reserve(usable, cap, req=req)

    async def _reserve(
        self, usable: list[ServerView], cap: int, *, explicit: bool = False,
        req: GenerationRequest | None = None,
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
                if req is not None:
                    self._unplaced(req)
                raise ResourceBusy("Every server is busy; try again in a moment.")
            chosen = min(free, key=lambda s: (load[s.id], s.id))
            self._reserved[chosen.id] = self._reserved.get(chosen.id, 0) + 1
        return chosen

    def release(self, server_id: int) -> None:
        """Give back a slot held by :meth:`choose` (the row now counts instead)."""
        left = self._reserved.get(server_id, 0) - 1
        if left > 0:
            self._reserved[server_id] = left
        else:
            self._reserved.pop(server_id, None)

    async def failover_target(self, job: JobView, failed: ServerView) -> ServerView | None:
        """Another server that can take ``job``; None if it was pinned or none can."""
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
            target = await self.choose(req, exclude={failed.id})
        except ComfyVastError:
            return None
        self.release(target.id)  # the row moves to it right away
        return target

    async def resolve_model(self, server: ServerView, model: str | None) -> str:
        """The checkpoint a job uses on ``server``: the one asked for, or the first."""
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

    async def check_lora(self, server: ServerView, lora: str) -> None:
        loras = await self.catalog.models(server, "loras")
        if lora not in loras:
            raise ValidationFailed(f"The LoRA '{lora}' is not on server '{server.name}'.")

    def prefetch(self, server: ServerView, folder: str) -> None:
        """List ``folder`` on ``server`` in the background unless it was listed before."""
        if self.catalog.peek(server.id, folder) is not None:
            return

        async def fetch() -> None:
            try:
                await self.catalog.models(server, folder)
            except ComfyVastError as exc:
                log.info("listing %s on %s failed: %s", folder, server.name, exc)

        self._prefetches.spawn(
            fetch(), key=(server.id, folder), name=f"prefetch-{server.id}-{folder}"
        )

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

    async def close(self) -> None:
        await self._prefetches.close()
