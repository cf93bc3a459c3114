"""DownloadService: starting a download, running it in the background, reporting it.

Downloads run **on the server** with curl over SSH; model files never pass through the
bot. A download is planned (every check) before its row exists, runs in a task keyed by
its id, keeps a live view for the status message, and always ends its row: completed,
failed, or failed because the bot stopped (its partial file stays, so the next run
resumes it). On start-up :meth:`DownloadService.recover` ends the rows a previous process
left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace

from core.audit import OUTCOME_ERROR, OUTCOME_OK, Actor, AuditService
from core.config import Settings
from core.db.engine import SessionFactory
from core.db.models import utcnow
from core.errors import GENERIC_FAILURE, ComfyVastError, ResourceBusy
from core.model_files.cache import ModelCache
from core.model_files.curl import CurlProgress
from core.model_files.planning import DEFAULT_RESERVE_BYTES, Plan, Planner
from core.model_files.shell import ServerShell
from core.model_files.store import DownloadStore
from core.model_files.transfer import Transfer
from core.model_files.types import DownloadObserver, DownloadRequest, DownloadView
from core.redact import redact_url
from core.servers import ServerRegistry
from core.tasks import TaskRegistry

log = logging.getLogger(__name__)

DEFAULT_DOWNLOAD_TIMEOUT = 6 * 3600.0


class DownloadService:
    """Downloads model files onto servers, one task per download."""

    def __init__(
        self,
        settings: Settings,
        sessions: SessionFactory,
        registry: ServerRegistry,
        shell: ServerShell,
        audit: AuditService,
        *,
        on_change: Callable[[int], None],
        reserve_bytes: int = DEFAULT_RESERVE_BYTES,
        download_timeout: float = DEFAULT_DOWNLOAD_TIMEOUT,
    ) -> None:
        self._registry = registry
        self._shell = shell
        self._audit = audit
        # Called with the server id once a file arrived (its listings are stale).
        self._on_change = on_change
        self.planner = Planner(settings, registry, shell, reserve_bytes=reserve_bytes)
        self.store = DownloadStore(sessions, registry)
        self.download_timeout = download_timeout
        # (server id, folder, file name) of the downloads being planned or running.
        self._busy: set[tuple[int, str, str]] = set()
        self._tasks = TaskRegistry("model-downloads")
        self._live: dict[int, DownloadView] = {}
        # Keeps each server's models under comfy.model_cache_size (set by ModelService).
        self.cache: ModelCache | None = None

    def is_busy(self, server_id: int, folder: str, filename: str) -> bool:
        return (server_id, folder, filename) in self._busy

    async def start(
        self, request: DownloadRequest, observer: DownloadObserver | None = None
    ) -> DownloadView:
        """Check everything, record the download and start it in the background.

        Raises (before anything is written on the server) for a bad URL, folder or name, a
        file that exists, a download of the same file in progress, a source that refuses
        or lacks the file, or too little disk. ``observer.on_started`` posts the status
        message; progress and the end are reported to the observer too.
        """
        observer = observer or DownloadObserver()
        plan = await self.planner.propose(request)
        key = plan.key
        if key in self._busy:
            raise ResourceBusy(
                f"{plan.filename} is already being downloaded to {plan.folder} on "
                f"'{plan.server.name}'."
            )
        self._busy.add(key)
        try:
            plan = await self.planner.confirm(plan)
            if self.cache is not None:
                # Evicts least recently used models, or refuses (nothing deleted then).
                await self.cache.make_room(plan, request.actor)
            view = await self._insert(request.actor, plan)
            try:
                ids = await observer.on_started(view)
                if ids is not None:
                    view = await self._set_message(view, *ids)
            except BaseException:
                # No status message, no download: the row must not stay "pending".
                await self.store.save(replace(
                    view, status="failed", completed_at=utcnow(),
                    error="The status message could not be posted.",
                ))
                self._live.pop(view.id, None)
                raise
        except BaseException:
            self._busy.discard(key)
            if self.cache is not None:
                self.cache.release(key)
            raise
        # Activity keeps the idle autostop away while the server downloads.
        await self._registry.touch(plan.server.id, channel_id=request.actor.channel_id)
        log.info("download %d: %s -> %s:%s (%s bytes)", view.id, redact_url(plan.url),
                 plan.server.name, plan.final_path, plan.bytes_total)
        self._tasks.spawn(
            self._download(view, plan, request.actor, observer), key=view.id,
            name=f"model-download-{view.id}",
            on_done=lambda _task, key=key, vid=view.id: self._forget(key, vid),
        )
        return view

    def _forget(self, key: tuple[int, str, str], download_id: int) -> None:
        self._busy.discard(key)
        self._live.pop(download_id, None)
        if self.cache is not None:
            self.cache.release(key)

    async def download(
        self, request: DownloadRequest, observer: DownloadObserver | None = None
    ) -> DownloadView:
        """:meth:`start` and wait for the end (CLI and tests)."""
        view = await self.start(request, observer)
        return await self.wait(view.id)

    async def wait(self, download_id: int) -> DownloadView:
        task = self._tasks.get(download_id)
        if task is not None:
            return await asyncio.shield(task)
        return await self.get(download_id)

    async def get(self, download_id: int) -> DownloadView:
        live = self._live.get(download_id)
        if live is not None:
            return live
        return await self.store.get(download_id)

    async def recover(self) -> int:
        """Mark downloads a previous process left running as failed (call at start-up).

        Their partial files stay on the server, so downloading again resumes them.
        """
        return await self.store.fail_unfinished(
            "The bot restarted during the download; start it again to resume."
        )

    async def close(self) -> None:
        """Stop running downloads (their remote curl is killed; partial files stay)."""
        # No timeout: each download records its end before it lets go.
        await self._tasks.close(timeout=None)

    # -- the live view and the row

    async def _insert(self, actor: Actor, plan: Plan) -> DownloadView:
        view = await self.store.insert(actor, plan)
        self._live[view.id] = view
        return view

    async def _set_message(
        self, view: DownloadView, channel_id: int, message_id: int
    ) -> DownloadView:
        await self.store.set_message(view.id, channel_id, message_id)
        view = replace(view, channel_id=channel_id, message_id=message_id)
        self._live[view.id] = view
        return view

    # -- the download itself

    async def _download(
        self, view: DownloadView, plan: Plan, actor: Actor, observer: DownloadObserver
    ) -> DownloadView:
        view = replace(view, status="downloading", started_at=utcnow())
        self._live[view.id] = view
        await self.store.save(view)
        transfer = self._transfer(view, plan, observer)
        try:
            await self._safe(observer.on_progress, view)
            await transfer.fetch()
            view = self._live.get(view.id, view)
            view = replace(view, status="verifying")
            self._live[view.id] = view
            await self.store.save(view)
            await self._safe(observer.on_progress, view)
            size, digest = await transfer.verify_and_rename()
            view = replace(view, bytes_done=size, bytes_total=size, sha256=digest)
            view = replace(view, status="completed", completed_at=utcnow(), eta_seconds=0.0)
        except asyncio.CancelledError:
            view = replace(view, status="failed", completed_at=utcnow(),
                           error="The download was stopped because the bot shut down; start "
                                 "it again to resume.")
            await self._finish(view, plan, actor, observer, shielded=True)
            raise
        except ComfyVastError as exc:
            view = replace(view, status="failed", completed_at=utcnow(), error=str(exc))
        except Exception:
            log.exception("download %d failed unexpectedly", view.id)
            view = replace(view, status="failed", completed_at=utcnow(), error=GENERIC_FAILURE)
        await self._finish(view, plan, actor, observer)
        return view

    def _transfer(self, view: DownloadView, plan: Plan, observer: DownloadObserver) -> Transfer:
        """The transfer for ``plan``, reporting into the live view, the row and the server."""

        async def on_progress(progress: CurlProgress) -> None:
            current = self._live.get(view.id, view)
            updated = replace(
                current, bytes_done=progress.bytes_done,
                bytes_total=progress.bytes_total or current.bytes_total,
                speed=progress.speed, eta_seconds=progress.eta_seconds,
            )
            self._live[view.id] = updated
            await self._safe(observer.on_progress, updated)

        async def on_checkpoint() -> None:
            await self.store.save(self._live.get(view.id, view))

        async def on_keepalive() -> None:
            # A long download is activity: idle autostop must not stop the server.
            await self._registry.touch(plan.server.id)

        return Transfer(
            self._shell, plan, view.id, timeout=self.download_timeout,
            on_progress=on_progress, on_checkpoint=on_checkpoint, on_keepalive=on_keepalive,
        )

    async def _finish(self, view: DownloadView, plan: Plan, actor: Actor,
                      observer: DownloadObserver, *, shielded: bool = False) -> None:
        self._live[view.id] = view
        if view.status == "completed":
            self._on_change(plan.server.id)
        log.info("download %d %s: %s/%s on %s%s", view.id, view.status, plan.folder,
                 plan.filename, plan.server.name, f" ({view.error})" if view.error else "")

        if shielded:
            # We are being cancelled: record the end anyway, but do not wait for Discord.
            with contextlib.suppress(Exception):
                await asyncio.shield(self.store.save(view))
            return
        await self.store.save(view)
        if view.status == "completed" and plan.bytes_total is None and self.cache is not None:
            # Its size was unknown when room was made: keep the limit now.
            try:
                await self.cache.trim(plan.server, (plan.folder, plan.filename), actor)
            except ComfyVastError as exc:
                log.warning("could not trim the model cache of %s: %s", plan.server.name, exc)
        await self._registry.touch(plan.server.id)
        outcome = OUTCOME_OK if view.status == "completed" else OUTCOME_ERROR
        details: dict[str, object] = {"url": view.url, "bytes": view.bytes_done}
        if view.error:
            details["error"] = view.error
        await self._audit.record(
            actor, "models download", outcome=outcome,
            resource=f"{plan.server.name}/{plan.folder}/{plan.filename}", details=details,
        )
        await self._safe(observer.on_finished, view)

    async def _safe(self, callback: Callable[[DownloadView], Awaitable[None]],
                    view: DownloadView) -> None:
        # A failing status message must not fail the download itself.
        try:
            result = callback(view)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("download observer failed for download %d", view.id)
