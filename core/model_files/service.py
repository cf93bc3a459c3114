"""ModelService: the one object the bot holds for model files on its servers.

It wires listing, downloads and deletion together and keeps the names and signatures the
cogs, the CLI and the tests use; the work is done in :mod:`core.model_files.listing`,
:mod:`core.model_files.downloads` and :mod:`core.model_files.deletion`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from pydantic import SecretStr

from core.audit import SYSTEM, Actor, AuditService
from core.comfy.pool import ComfyPool
from core.config import Settings
from core.db.engine import SessionFactory
from core.errors import ComfyVastError
from core.model_files.cache import CacheReport, ModelCache
from core.model_files.deletion import Deletion
from core.model_files.downloads import DEFAULT_DOWNLOAD_TIMEOUT, DownloadService
from core.model_files.listing import LISTING_TTL, ListingService
from core.model_files.planning import DEFAULT_RESERVE_BYTES
from core.model_files.shell import ServerShell
from core.model_files.types import (
    DEFAULT_INSTALL_DIR,
    DownloadObserver,
    DownloadRequest,
    DownloadView,
    InstallDir,
    ModelListing,
)
from core.model_files.usage import read_files
from core.providers import has_shell
from core.servers import ServerRegistry, ServerView
from core.ssh import SSHPool, SSHTarget
from core.tasks import TaskRegistry

log = logging.getLogger(__name__)


def parse_model_spec(spec: str) -> tuple[str, str, str]:
    """``"folder/file=url"`` (comfy.popular_models, a pool's models) -> (folder, file, url)."""
    where, sep, url = spec.partition("=")
    folder, slash, filename = where.strip().partition("/")
    if not sep or not slash or not url.strip():
        raise ValueError(f"a model must be written folder/file=https://..., not {spec[:80]!r}")
    return folder, filename, url.strip()


class ModelService:
    """Lists, downloads and deletes model files on the team's servers."""

    def __init__(
        self,
        settings: Settings,
        sessions: SessionFactory,
        registry: ServerRegistry,
        comfy: ComfyPool,
        ssh: SSHPool,
        target_for: Callable[[ServerView], SSHTarget],
        audit: AuditService,
        *,
        install_dir: InstallDir = DEFAULT_INSTALL_DIR,
        on_change: Callable[[int], None] | None = None,
        reserve_bytes: int = DEFAULT_RESERVE_BYTES,
        download_timeout: float = DEFAULT_DOWNLOAD_TIMEOUT,
        listing_ttl: float = LISTING_TTL,
    ) -> None:
        # Called with the server id after a download or deletion, so other caches (the
        # generation service's model catalog) drop their stale lists too.
        self._on_change = on_change
        self._shell = ServerShell(ssh, target_for, install_dir)
        self._listing = ListingService(registry, comfy, self._shell, ttl=listing_ttl)
        self._downloads = DownloadService(
            settings, sessions, registry, self._shell, audit, on_change=self._changed,
            reserve_bytes=reserve_bytes, download_timeout=download_timeout,
        )
        self._deletion = Deletion(
            registry, self._shell, audit, is_busy=self._downloads.is_busy,
            on_change=self._changed,
        )
        self.cache = ModelCache(
            settings, sessions, registry, self._shell, audit,
            is_busy=self._downloads.is_busy, on_change=self._changed,
        )
        self._downloads.cache = self.cache
        self._settings = settings
        self._registry = registry
        self._joins = TaskRegistry("model-joins")

    def _changed(self, server_id: int) -> None:
        self._listing.forget(server_id)
        if self._on_change is not None:
            self._on_change(server_id)

    # -- settings the tests and the CLI adjust after construction

    @property
    def reserve_bytes(self) -> int:
        return self._downloads.planner.reserve_bytes

    @reserve_bytes.setter
    def reserve_bytes(self, value: int) -> None:
        self._downloads.planner.reserve_bytes = value

    @property
    def download_timeout(self) -> float:
        return self._downloads.download_timeout

    @download_timeout.setter
    def download_timeout(self, value: float) -> None:
        self._downloads.download_timeout = value

    @property
    def listing_ttl(self) -> float:
        return self._listing.ttl

    @listing_ttl.setter
    def listing_ttl(self, value: float) -> None:
        self._listing.ttl = value

    @property
    def token_hosts(self) -> dict[str, SecretStr]:
        """Host suffix -> token; a token goes only to its own hosts (and their subdomains)."""
        return self._downloads.planner.token_hosts

    # -- where things are

    async def install_dir(self, server: ServerView) -> str:
        """Where ComfyUI lives on ``server`` (a fixed path, or asked per server)."""
        return await self._shell.install_dir(server)

    async def models_dir(self, server: ServerView) -> str:
        return await self._shell.models_dir(server)

    def auth_headers(self, url: str) -> list[str]:
        """Authorization headers for ``url``'s host from the configured tokens."""
        return self._downloads.planner.auth_headers(url)

    # -- listing

    async def list(
        self, server: str | int | ServerView, *, refresh: bool = False
    ) -> ModelListing:
        """The server's models per folder, from the cache unless stale or ``refresh``."""
        return await self._listing.list(server, refresh=refresh)

    def cached(self, server_id: int) -> ModelListing | None:
        return self._listing.cached(server_id)

    async def names(
        self, folder: str, prefix: str = "", *, server: str | None = None, limit: int = 25
    ) -> list[str]:
        """Model names in ``folder`` containing ``prefix``, for autocomplete."""
        return await self._listing.names(folder, prefix, server=server, limit=limit)

    # -- downloads

    async def start(
        self, request: DownloadRequest, observer: DownloadObserver | None = None
    ) -> DownloadView:
        """Check everything, record the download and start it in the background."""
        return await self._downloads.start(request, observer)

    async def download(
        self, request: DownloadRequest, observer: DownloadObserver | None = None
    ) -> DownloadView:
        """:meth:`start` and wait for the end (CLI and tests)."""
        return await self._downloads.download(request, observer)

    async def wait(self, download_id: int) -> DownloadView:
        return await self._downloads.wait(download_id)

    async def get(self, download_id: int) -> DownloadView:
        return await self._downloads.get(download_id)

    async def recover(self) -> int:
        """Mark downloads a previous process left running as failed (call at start-up)."""
        return await self._downloads.recover()

    async def close(self) -> None:
        """Stop running downloads (their remote curl is killed; partial files stay)."""
        await self._joins.close(timeout=None)
        await self._downloads.close()

    # -- deleting

    async def delete(self, actor: Actor, server: str, folder: str, filename: str) -> str:
        """Delete one model file; returns the path removed (relative to the models dir)."""
        return await self._deletion.delete(actor, server, folder, filename)

    # -- the cache

    async def report(self, server: ServerView) -> CacheReport:
        """Each model file with its size, last use, pin and need (SSH servers only)."""
        return await self.cache.report(server)

    async def pin(self, actor: Actor, server: str, folder: str, filename: str) -> str:
        """Never evict this model from this server."""
        return await self.cache.pin(actor, server, folder, filename)

    async def unpin(self, actor: Actor, server: str, folder: str, filename: str) -> str:
        return await self.cache.unpin(actor, server, folder, filename)

    async def ensure_models(
        self, server: str | int | ServerView, specs: Sequence[str], actor: Actor = SYSTEM
    ) -> dict[str, str]:
        """Download each ``"folder/file=url"`` the server lacks, one after the other (each
        through the cache, so it may evict or be refused). Returns spec path -> outcome
        ("present", "completed", or the sentence that refused or failed it); never raises
        for one model, so one bad entry does not stop the others."""
        view = server if isinstance(server, ServerView) else await self._registry.get(server)
        outcomes: dict[str, str] = {}
        try:
            present = {f.key for f in await read_files(self._shell, view)}
        except ComfyVastError as exc:
            log.warning("cannot read the models on %s: %s", view.name, exc)
            return {spec: str(exc) for spec in specs}
        for spec in specs:
            try:
                folder, filename, url = parse_model_spec(spec)
            except ValueError as exc:
                log.warning("popular model skipped: %s", exc)
                outcomes[spec] = str(exc)
                continue
            path = f"{folder}/{filename}"
            if (folder, filename) in present:
                outcomes[path] = "present"
                continue
            request = DownloadRequest(actor=actor, server=view.name, url=url, folder=folder,
                                      filename=filename)
            try:
                done = await self.download(request)
            except ComfyVastError as exc:
                outcomes[path] = str(exc)
            else:
                outcomes[path] = done.status if done.status != "failed" else (
                    done.error or "failed")
            log.info("model %s on %s: %s", path, view.name, outcomes[path])
        return outcomes

    def server_joined(self, server: ServerView) -> None:
        """A server finished its setup: fetch comfy.popular_models in the background."""
        specs = list(self._settings.comfy.popular_models)
        if not specs or not has_shell(server):
            return
        self._joins.spawn(self.ensure_models(server, specs), key=server.id,
                          name=f"popular-models-{server.id}")
