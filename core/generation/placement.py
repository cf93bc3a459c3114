"""Where a job runs: the model catalog, server choice, failover targets.

A server is chosen for a request among the ready ones that have its model, packed: the
busiest one that still starts the job within one job's time (fewer than PACK_DEPTH jobs),
else the least loaded; a slot on it is held from the choice until the job's row exists, so
concurrent submissions see each other. Packing leaves the servers that demand does not
need without work, so their idle stop ends their billing (spreading kept every server
a little busy and none ever stopped). When no server has room and a pool can run the job,
it waits for the pool's next free server (core.generation.waiting) instead of a refusal.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass

from core.audit import Actor
from core.comfy.errors import ComfyError
from core.comfy.pool import ComfyPool
from core.config import Settings
from core.errors import ComfyVastError, ResourceBusy, ValidationFailed
from core.generation.types import GenerationRequest, JobView
from core.servers import ServerRegistry, ServerView
from core.shared_read import SharedReads
from core.tasks import TaskRegistry

log = logging.getLogger(__name__)


CATALOG_TTL = 60.0
# How long a read of the servers and their loads serves new choices (see Placement._view).
VIEW_TTL = 0.25
# Jobs a server holds before packing looks past it: the one running and the next, which
# ComfyUI starts the moment the first ends (a third would wait two jobs' time).
PACK_DEPTH = 2


@dataclass(frozen=True, slots=True)
class PoolChoice:
    """A pool whose servers may take a job that found no room: its name, its members'
    ids and the models its template downloads (the wiring asks core.pools)."""

    name: str
    server_ids: tuple[int, ...]
    models: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class WaitFor:
    """No server has room now: the job waits for a server of this pool."""

    pool: str


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
        # The last read of the servers and their loads (see _view), when it began, and the
        # jobs recorded since it began (its counts may miss them).
        self._snapshot: tuple[float, list[ServerView], dict[int, int]] | None = None
        self._placed: dict[int, int] = {}
        self._next_view: asyncio.Future[None] | None = None
        self._prefetches = TaskRegistry("generation-prefetch")
        # Told when a job finds no server (none running, or every one full): the pools'
        # autoscaler counts it as demand (core.pools), so a pool at zero can start one.
        # Given the request's identity: a member sending the same job again is one job.
        self.on_unplaced: Callable[[Hashable], None] | None = None
        # The pools a job that finds no room may wait for (set by the wiring); None or an
        # empty list: such a job is refused as before.
        self.pools: Callable[[], Awaitable[list[PoolChoice]]] | None = None
        # Read at most once per VIEW_TTL, shared by the submissions of a burst (each
        # read on its own held a pooled connection, and opened new ones past the pool).
        self._pool_choices: SharedReads[None, list[PoolChoice]] = SharedReads(VIEW_TTL)

    def _unplaced(self, req: GenerationRequest, final: bool) -> None:
        """A refusal after a fresh read (``final``) is demand for the pools."""
        if final and self.on_unplaced is not None:
            a = req.actor
            self.on_unplaced((a.user_id, a.channel_id, req.kind, req.prompt, req.model,
                              req.workflow, req.parent_id))

    async def pool_for(self, req: GenerationRequest) -> str | None:
        """The pool a job may wait for: not pinned to a server nor an upscale of one
        server's image; a named checkpoint must be one the pool's servers were seen to
        have or its template downloads. None: no pool fits (the job is refused)."""
        if self.pools is None or req.server or req.kind == "upscale":
            return None
        for pool in await self._pool_choices.get(None, self.pools):
            if req.model is None or req.workflow or req.model in pool.models or any(
                req.model in (self.catalog.peek(s, "checkpoints") or ())
                for s in pool.server_ids
            ):
                return pool.name
        return None

    async def choose_or_wait(
        self, req: GenerationRequest, *, exclude: set[int], waiting: bool = False
    ) -> ServerView | WaitFor:
        """:meth:`choose`, or which pool to wait for when no server has room. ``waiting``:
        jobs wait for a pool already, so a new one that a pool can run joins them (first
        come, first placed) instead of taking the next free slot before them.

        A job a pool can run takes a server only while it holds fewer than PACK_DEPTH jobs
        (not comfy.max_generations): the rest wait in the pool's queue and go to whichever
        server frees first. Queued in one ComfyUI, a job waited for that server even when
        another was idle (and the idle one, without work, was stopped)."""
        pool = await self.pool_for(req)
        if pool is not None and waiting:
            return WaitFor(pool)
        cap = PACK_DEPTH if pool is not None else None
        try:
            return await self._choose(req, exclude, None, fresh=False, notify=False, cap=cap)
        except (ValidationFailed, ResourceBusy):
            try:
                return await self._choose(req, exclude, None, fresh=True, notify=False,
                                          cap=cap)
            except (ValidationFailed, ResourceBusy):
                if pool is None:
                    if self.on_unplaced is not None:
                        self._unplaced(req, True)
                    raise
                return WaitFor(pool)

    async def place(self, req: GenerationRequest, *, fresh: bool) -> ServerView:
        """A server with room for a job waiting for a pool (no demand is noted: the
        autoscaler counts waiting jobs apart). The caller must :meth:`release` it."""
        return await self._choose(req, set(), None, fresh=fresh, notify=False, cap=PACK_DEPTH)

    async def choose(
        self, req: GenerationRequest, *, exclude: set[int], model: str | None = None
    ) -> ServerView:
        """Explicit server if given; else a ready one with the model and fewest jobs.

        Chosen from a read of the servers at most VIEW_TTL old; a refusal is only given
        after a fresh read agrees (a server added a moment ago is found).
        The caller must :meth:`release` the slot reserved on the server returned.
        """
        try:
            return await self._choose(req, exclude, model, fresh=False)
        except (ValidationFailed, ResourceBusy):
            return await self._choose(req, exclude, model, fresh=True)

    async def _choose(
        self, req: GenerationRequest, exclude: set[int], model: str | None, *, fresh: bool,
        notify: bool = True, cap: int | None = None,
    ) -> ServerView:
        wanted_model = model or req.model
        cap = min(cap or self._settings.comfy.max_generations,
                  self._settings.comfy.max_generations)
        if req.server:
            server = await self._registry.get(req.server)
            if not server.is_ready:
                raise ValidationFailed(
                    f"Server '{server.name}' is {server.status}; it must be running."
                )
            _, busy = await self._view(fresh)
            return self._reserve([server], cap, busy, explicit=True, final=fresh)
        servers, busy = await self._view(fresh)
        candidates = [s for s in servers if s.is_ready and s.id not in exclude]
        if not candidates:
            self._unplaced(req, fresh and notify)
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
        return self._reserve(usable, cap, busy, final=fresh and notify, req=req)

    async def _view(self, fresh: bool) -> tuple[list[ServerView], dict[int, int]]:
        """The servers and their active jobs (those recorded since the read included).

        Submission runs this per job, and a burst of them would read the same rows many
        times a second: a read serves the choices of the next VIEW_TTL seconds, and the
        choices that ask while none has begun share one. ``fresh``: a read that began
        after this call (nothing written before it is missed)."""
        snapshot = self._snapshot
        if fresh or snapshot is None or time.monotonic() - snapshot[0] >= VIEW_TTL:
            await self._read()
            snapshot = self._snapshot
            assert snapshot is not None
        _, servers, busy = snapshot
        loads = dict(busy)
        for server_id, placed in self._placed.items():
            loads[server_id] = loads.get(server_id, 0) + placed
        return servers, loads

    async def _read(self) -> None:
        """Read the servers and their loads, or wait for the read no one had begun yet."""
        shared = self._next_view
        if shared is not None:
            try:
                return await asyncio.shield(shared)
            except asyncio.CancelledError:
                if not shared.cancelled():
                    raise  # this caller was cancelled
                return await self._read()  # the reader was: read again
        shared = self._next_view = asyncio.get_running_loop().create_future()
        # A failure nobody else waited for is not "never retrieved".
        shared.add_done_callback(lambda f: f.cancelled() or f.exception())
        placed = self._placed
        try:
            await asyncio.sleep(0)  # let the choices of this moment join
            self._next_view = None  # later callers need a read that begins later
            # Rows recorded from here on may be missed by the read: counted apart.
            self._placed = {}
            began = time.monotonic()
            servers = await self._registry.list()
            busy = await self._registry.active_jobs()
        except BaseException as exc:
            self._next_view = None if self._next_view is shared else self._next_view
            for server_id, count in placed.items():  # still not counted by any read
                self._placed[server_id] = self._placed.get(server_id, 0) + count
            if isinstance(exc, asyncio.CancelledError):
                shared.cancel()
            else:
                shared.set_exception(exc)
            raise
        self._snapshot = (began, servers, busy)
        shared.set_result(None)

    def _reserve(
        self, usable: list[ServerView], cap: int, busy: dict[int, int], *,
        explicit: bool = False, final: bool = True, req: GenerationRequest | None = None,
    ) -> ServerView:
        """Pick a server (packed, see the module) and hold a slot on it until the row is
        written.

        Counting and reserving happen without a pause in between (no await): concurrent
        submissions see each other's slots before any of their rows exists.
        """
        load = {s.id: busy.get(s.id, 0) + self._reserved.get(s.id, 0) for s in usable}
        free = [s for s in usable if load[s.id] < cap]
        if not free:
            if explicit:
                raise ResourceBusy(
                    f"Server '{usable[0].name}' already has {cap} jobs queued; "
                    "try again shortly."
                )
            if req is not None:
                self._unplaced(req, final)
            raise ResourceBusy("Every server is busy; try again in a moment.")
        if explicit:
            chosen = free[0]
        else:
            # The busiest that starts the job within a job's time; else the least loaded.
            # Ties: the cheapest (the one the pool keeps warm longest), then the oldest.
            packed = [s for s in free if load[s.id] < PACK_DEPTH]
            chosen = (max(packed, key=lambda s: (load[s.id], -s.price_per_hour, -s.id))
                      if packed else
                      min(free, key=lambda s: (load[s.id], s.price_per_hour, s.id)))
        self._reserved[chosen.id] = self._reserved.get(chosen.id, 0) + 1
        return chosen

    def release(self, server_id: int) -> None:
        """Give back a slot held by :meth:`choose`: its row now exists (or never will),
        and counts among the jobs recorded since the last read until the next one."""
        left = self._reserved.get(server_id, 0) - 1
        if left > 0:
            self._reserved[server_id] = left
        else:
            self._reserved.pop(server_id, None)
        self._placed[server_id] = self._placed.get(server_id, 0) + 1

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
