"""ModelService: the one object the bot holds for model files on its servers.

It wires listing, downloads and deletion together and keeps the names and signatures the
cogs, the CLI and the tests use; the work is done in :mod:`core.model_files.listing`,
:mod:`core.model_files.downloads` and :mod:`core.model_files.deletion`.
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import SecretStr

from core.audit import Actor, AuditService
from core.comfy.pool import ComfyPool
from core.config import Settings
from core.db.engine import SessionFactory
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
from core.servers import ServerRegistry, ServerView
from core.ssh import SSHPool, SSHTarget


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
        await self._downloads.close()

    # -- deleting

    async def delete(self, actor: Actor, server: str, folder: str, filename: str) -> str:
        """Delete one model file; returns the path removed (relative to the models dir)."""
        return await self._deletion.delete(actor, server, folder, filename)
