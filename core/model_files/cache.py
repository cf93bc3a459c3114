"""The per-server model cache: the models folder stays under ``comfy.model_cache_size``.

Before a download starts, :meth:`ModelCache.make_room` adds up the model files on the
server (sizes read over SSH) and the downloads already under way there; when the new file
would pass the limit it deletes the least recently used models until it fits. Last use is
the newest generation that named the model on that server, or the file's arrival (its
mtime) when that is later, so a model fetched a minute ago is not the first to go. Never
evicted: a model a queued or running job needs, a pinned model, a file being downloaded.
When not enough can be freed the download is refused with a sentence naming what is in
use or pinned, and nothing is deleted.

"Needs" reads the generation rows: the models a job's parameters name (checkpoint, LoRA,
upscale model) and, for a saved workflow, every model file its nodes name (in any folder).
The jobs are read again right before deleting; a job submitted during the few
milliseconds of the ``rm`` itself could still name an evicted model, and then fails with
"model not on server" like any missing model.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import posixpath
import shlex
from collections.abc import Callable
from dataclasses import dataclass

from core.audit import OUTCOME_OK, Actor, AuditService
from core.config import Settings
from core.db.engine import SessionFactory
from core.errors import NotFound, ResourceBusy, ValidationFailed
from core.model_files.names import validate_folder, validate_model_path
from core.model_files.planning import Plan
from core.model_files.shell import COMMAND_TIMEOUT, MARK, ServerShell
from core.model_files.types import DiskFull, format_size
from core.model_files.usage import (
    ModelFile,
    ModelKey,
    PinStore,
    UsageReader,
    needs,
    read_files,
)
from core.servers import ServerRegistry, ServerView

log = logging.getLogger(__name__)

# How many names a refusal lists before "and N more" (it must stay one readable sentence).
NAMES_IN_MESSAGE = 5


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """One model file as /models list shows it."""

    folder: str
    name: str
    size: int
    last_used: dt.datetime | None  # newest generation that named it; None: never
    pinned: bool
    in_use: bool


@dataclass(frozen=True, slots=True)
class CacheReport:
    server_id: int
    server_name: str
    limit: int
    entries: tuple[CacheEntry, ...]

    @property
    def used(self) -> int:
        return sum(e.size for e in self.entries)


def _names(keys: list[ModelKey]) -> str:
    shown = ", ".join(f"{f}/{n}" for f, n in keys[:NAMES_IN_MESSAGE])
    more = len(keys) - NAMES_IN_MESSAGE
    return shown + (f" and {more} more" if more > 0 else "")


class ModelCache:
    """Keeps each server's models folder under the configured size."""

    def __init__(
        self, settings: Settings, sessions: SessionFactory, registry: ServerRegistry,
        shell: ServerShell, audit: AuditService, *,
        is_busy: Callable[[int, str, str], bool], on_change: Callable[[int], None],
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._shell = shell
        self._audit = audit
        self._is_busy = is_busy
        self._on_change = on_change
        self.usage = UsageReader(sessions)
        self.pins = PinStore(sessions)
        # Bytes promised to downloads under way, per (server id, folder, name).
        self._reserved: dict[tuple[int, str, str], int] = {}
        # One decision at a time per server, so two downloads cannot both count the same
        # free space.
        self._locks: dict[int, asyncio.Lock] = {}

    @property
    def limit(self) -> int:
        return int(self._settings.comfy.model_cache_size)

    def release(self, key: tuple[int, str, str]) -> None:
        """The download ended: its file is on disk (and counted there) or gone."""
        self._reserved.pop(key, None)

    def _reserved_on(self, server_id: int, files: list[ModelFile]) -> int:
        # A finished download's file is on disk (and counted there) a moment before its
        # reservation is released: count it once.
        present = {f.key for f in files}
        return sum(size for (sid, folder, name), size in self._reserved.items()
                   if sid == server_id and (folder, name) not in present)

    async def make_room(self, plan: Plan, actor: Actor) -> list[str]:
        """Evict least recently used models so ``plan``'s file fits; the evicted paths.

        Raises :class:`DiskFull` (nothing deleted) when the limit cannot be kept."""
        server = plan.server
        limit = self.limit
        need = max(plan.bytes_total or 0, 0)
        if need > limit:
            raise DiskFull(
                f"{plan.filename} ({format_size(need)}) is larger than the whole model cache "
                f"of '{server.name}' ({format_size(limit)}, comfy.model_cache_size)."
            )
        lock = self._locks.setdefault(server.id, asyncio.Lock())
        async with lock:
            files = await read_files(self._shell, server)
            used = sum(f.size for f in files) + self._reserved_on(server.id, files)
            excess = used + need - limit
            victims: list[ModelFile] = []
            if excess > 0:
                victims = await self._choose(server, files, excess, need, used)
                await self._evict_all(server, victims, actor, plan.filename)
            self._reserved[plan.key] = need
        return [f"{v.folder}/{v.name}" for v in victims]

    async def trim(self, server: ServerView, keep: tuple[str, str], actor: Actor) -> list[str]:
        """After a download whose size was not known in advance: evict until the folder is
        under the limit again (never ``keep``, the new file). When that cannot be done the
        file stays and the cache is over its limit until the next download; logged."""
        lock = self._locks.setdefault(server.id, asyncio.Lock())
        async with lock:
            files = await read_files(self._shell, server)
            used = sum(f.size for f in files) + self._reserved_on(server.id, files)
            excess = used - self.limit
            if excess <= 0:
                return []
            try:
                victims = await self._choose(server, [f for f in files if f.key != keep],
                                             excess, 0, used)
                await self._evict_all(server, victims, actor, keep[1])
            except (DiskFull, ResourceBusy) as exc:
                log.warning("cache of %s stays over its limit after %s/%s: %s", server.name,
                            keep[0], keep[1], exc)
                return []
        return [f"{v.folder}/{v.name}" for v in victims]

    async def _evict_all(self, server: ServerView, victims: list[ModelFile], actor: Actor,
                         reason: str) -> None:
        # A job may have asked for a victim while we chose: look once more, right before
        # anything is deleted.
        needed = await self.usage.in_use(server.id)
        wanted = [v for v in victims if needs(needed, v.key)]
        if wanted:
            raise ResourceBusy(
                f"A job just asked for {wanted[0].folder}/{wanted[0].name} on "
                f"'{server.name}'; try the download again in a moment.")
        for victim in victims:
            await self._evict(server, victim, actor, reason)

    async def _choose(self, server: ServerView, files: list[ModelFile], excess: int,
                      need: int, used: int) -> list[ModelFile]:
        pinned = await self.pins.pins(server.id)
        needed = await self.usage.in_use(server.id)
        last = await self.usage.last_used(server.id)
        kept_pinned = sorted(f.key for f in files if f.key in pinned)
        kept_in_use = sorted(f.key for f in files
                             if needs(needed, f.key) and f.key not in pinned)
        candidates = [
            f for f in files
            if f.key not in pinned and not needs(needed, f.key)
            and not self._is_busy(server.id, f.folder, f.name)
        ]

        def recency(f: ModelFile) -> tuple[dt.datetime, str, str]:
            used_at = last.get(f.key)
            when = max(used_at, f.modified) if used_at else f.modified
            return (when, f.folder, f.name)

        candidates.sort(key=recency)
        victims: list[ModelFile] = []
        freed = 0
        for f in candidates:
            if freed >= excess:
                break
            victims.append(f)
            freed += f.size
        if freed < excess:
            held = []
            if kept_in_use:
                held.append(f"in use by queued or running jobs: {_names(kept_in_use)}")
            if kept_pinned:
                held.append(f"pinned: {_names(kept_pinned)}")
            why = "; ".join(held) if held else "downloads under way hold the rest"
            raise DiskFull(
                f"Not enough room in the model cache of '{server.name}': the file needs "
                f"{format_size(need)}, {format_size(used)} of {format_size(self.limit)} is "
                f"taken and only {format_size(freed)} can be freed ({why})."
            )
        return victims

    async def _evict(self, server: ServerView, victim: ModelFile, actor: Actor,
                     reason: str) -> None:
        path = posixpath.join(await self._shell.models_dir(server), victim.folder, victim.name)
        script = f'p={shlex.quote(path)}; rm -f -- "$p" && echo {MARK}deleted'
        await self._shell.run(server, script, timeout=COMMAND_TIMEOUT)
        self._on_change(server.id)
        log.info("cache: evicted %s/%s (%d bytes) on %s for %s", victim.folder, victim.name,
                 victim.size, server.name, reason)
        await self._audit.record(
            actor, "models evict", outcome=OUTCOME_OK,
            resource=f"{server.name}/{victim.folder}/{victim.name}",
            details={"bytes": victim.size, "for": reason},
        )

    # -- /models list, pin, unpin

    async def report(self, server: ServerView) -> CacheReport:
        files = await read_files(self._shell, server)
        pinned = await self.pins.pins(server.id)
        needed = await self.usage.in_use(server.id)
        last = await self.usage.last_used(server.id)
        entries = tuple(
            CacheEntry(f.folder, f.name, f.size, last.get(f.key), f.key in pinned,
                       needs(needed, f.key))
            for f in sorted(files, key=lambda f: (f.folder, f.name.lower()))
        )
        return CacheReport(server.id, server.name, self.limit, entries)

    async def pin(self, actor: Actor, server: str, folder: str, filename: str) -> str:
        view, key = await self._target(server, folder, filename)
        self._shell.target(view)  # a direct ComfyUI URL has no files the cache manages
        # A typo must not pin nothing while the intended model stays evictable; a stopped
        # server cannot be looked at, so its pins are taken as given.
        if view.is_ready and key not in {f.key for f in await read_files(self._shell, view)}:
            raise NotFound(f"There is no {key[0]}/{key[1]} on '{view.name}'.")
        if not await self.pins.pin(view.id, key, actor.user_id):
            raise ValidationFailed(f"{key[0]}/{key[1]} is already pinned on '{view.name}'.")
        await self._audit.record(actor, "models pin", outcome=OUTCOME_OK,
                                 resource=f"{view.name}/{key[0]}/{key[1]}")
        return f"{key[0]}/{key[1]}"

    async def unpin(self, actor: Actor, server: str, folder: str, filename: str) -> str:
        view, key = await self._target(server, folder, filename)
        if not await self.pins.unpin(view.id, key):
            raise ValidationFailed(f"{key[0]}/{key[1]} is not pinned on '{view.name}'.")
        await self._audit.record(actor, "models unpin", outcome=OUTCOME_OK,
                                 resource=f"{view.name}/{key[0]}/{key[1]}")
        return f"{key[0]}/{key[1]}"

    async def _target(self, server: str, folder: str,
                      filename: str) -> tuple[ServerView, ModelKey]:
        key = (validate_folder(folder), validate_model_path(filename))
        view = await self._registry.get(server)
        return view, key

