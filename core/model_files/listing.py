"""Which model files a server has, per folder, cached per server.

ComfyUI is asked first (``GET /models/{folder}``); when it does not answer, the files are
read from ``<install>/models/<folder>`` over SSH. A listing is cached for a while and dropped
after every change, so the next request reads again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
import time

from core.comfy.errors import ComfyNotFound
from core.comfy.pool import ComfyPool
from core.db.models import utcnow
from core.errors import ComfyVastError, ExternalServiceError, NotFound
from core.model_files.shell import COMMAND_TIMEOUT, MARK, ServerShell
from core.model_files.types import MODEL_EXTENSIONS, MODEL_FOLDERS, ModelListing
from core.providers import has_shell
from core.servers import ServerRegistry, ServerView

log = logging.getLogger(__name__)

LISTING_TTL = 300.0
# File names of every model folder; thousands of models fit in a fraction of this.
LISTING_MAX_OUTPUT = 8 * 2**20
LISTING_API_TIMEOUT = 10.0
# Autocomplete must answer within Discord's 3 s, so a cold cache gets this long at most.
NAMES_REFRESH_TIMEOUT = 2.0


class ListingService:
    """Lists each server's models (ComfyUI first, SSH as the fallback) and caches them."""

    def __init__(
        self, registry: ServerRegistry, comfy: ComfyPool, shell: ServerShell, *,
        ttl: float = LISTING_TTL,
    ) -> None:
        self._registry = registry
        self._comfy = comfy
        self._shell = shell
        self.ttl = ttl
        self._cache: dict[int, tuple[float, ModelListing]] = {}
        self._locks: dict[int, asyncio.Lock] = {}

    async def list(
        self, server: str | int | ServerView, *, refresh: bool = False
    ) -> ModelListing:
        """The server's models per folder, from the cache unless stale or ``refresh``."""
        view = server if isinstance(server, ServerView) else await self._registry.get(server)
        lock = self._locks.setdefault(view.id, asyncio.Lock())
        async with lock:
            hit = self._cache.get(view.id)
            if hit and not refresh and time.monotonic() - hit[0] < self.ttl:
                return hit[1]
            listing = await self._fetch(view)
            self._cache[view.id] = (time.monotonic(), listing)
            return listing

    def cached(self, server_id: int) -> ModelListing | None:
        hit = self._cache.get(server_id)
        return hit[1] if hit else None

    def forget(self, server_id: int) -> None:
        """Drop the server's listing; the next request reads it again."""
        self._cache.pop(server_id, None)

    async def names(
        self, folder: str, prefix: str = "", *, server: str | None = None, limit: int = 25
    ) -> list[str]:
        """Model names in ``folder`` containing ``prefix`` (names starting with it first),
        across running servers or on one; from the cache, filling a cold cache within
        about two seconds so autocomplete still answers in time."""
        if folder not in MODEL_FOLDERS:
            return []
        views = await self._registry.list()
        if server:
            views = [v for v in views if v.name == server.lower()]
        views = [v for v in views if v.is_ready]
        cold = [v for v in views if v.id not in self._cache]
        if cold:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(NAMES_REFRESH_TIMEOUT):
                    await asyncio.gather(
                        *(self._quiet_list(v) for v in cold), return_exceptions=True
                    )
        seen: set[str] = set()
        for view in views:
            listing = self.cached(view.id)
            if listing is not None:
                seen.update(listing.names(folder))
        needle = prefix.lower()
        hits = [n for n in seen if needle in n.lower()]
        hits.sort(key=lambda n: (not n.lower().startswith(needle), n.lower()))
        return hits[:limit]

    async def _quiet_list(self, view: ServerView) -> None:
        try:
            await self.list(view)
        except ComfyVastError as exc:
            log.debug("listing models on %s for autocomplete failed: %s", view.name, exc)

    async def _fetch(self, server: ServerView) -> ModelListing:
        try:
            folders = await self._fetch_api(server)
            source = "comfyui"
        except (ComfyVastError, TimeoutError) as exc:
            if not has_shell(server):
                if isinstance(exc, ComfyVastError):
                    raise
                raise ExternalServiceError(
                    f"ComfyUI on '{server.name}' did not list its models in time."
                ) from None
            log.info("ComfyUI on %s did not list models (%s); reading the disk over SSH",
                     server.name, exc)
            folders = await self._fetch_ssh(server)
            source = "ssh"
        return ModelListing(server.id, server.name, source, folders, utcnow())

    async def _fetch_api(self, server: ServerView) -> dict[str, tuple[str, ...]]:
        async with asyncio.timeout(LISTING_API_TIMEOUT):
            conn = await self._comfy.get(server)
            client = conn.client

            async def one(folder: str) -> tuple[str, tuple[str, ...]]:
                try:
                    names = await client.list_models(folder)
                except ComfyNotFound:
                    # Older ComfyUI versions lack some folders (text_encoders, ...).
                    return folder, ()
                return folder, tuple(sorted(names, key=str.lower))

            pairs = await asyncio.gather(*(one(f) for f in MODEL_FOLDERS))
        return dict(pairs)

    async def _fetch_ssh(self, server: ServerView) -> dict[str, tuple[str, ...]]:
        root = await self._shell.models_dir(server)
        folders = " ".join(shlex.quote(f) for f in MODEL_FOLDERS)
        # find -L follows symlinked model folders (a common way to share them); hidden
        # entries (our partial downloads, .cache) are pruned.
        script = (
            f"root={shlex.quote(root)}; "
            f'[ -d "$root" ] || {{ echo {MARK}nomodels; exit 0; }}; '
            f"for f in {folders}; do "
            f'[ -d "$root/$f" ] || continue; echo "{MARK}folder $f"; '
            f'(cd "$root/$f" && find -L . -name ".*" ! -name . -prune -o -type f -print '
            f"2>/dev/null); done"
        )
        result = await self._shell.run(server, script, timeout=COMMAND_TIMEOUT,
                                       max_output=LISTING_MAX_OUTPUT)
        if result.stdout_dropped:
            # The capture keeps the tail: the first folders would be missing, silently.
            raise ComfyVastError(
                f"The model folders on '{server.name}' list more than "
                f"{LISTING_MAX_OUTPUT // 2**20} MiB of file names; the bot does not read "
                "them whole. Tidy the models directory, or list with ComfyUI running."
            )
        if f"{MARK}nomodels" in result.stdout:
            raise NotFound(
                f"ComfyUI is not running on '{server.name}' and there is no models directory "
                f"at {root}; install it with /setup run."
            )
        out: dict[str, list[str]] = {f: [] for f in MODEL_FOLDERS}
        current: str | None = None
        for line in result.stdout.splitlines():
            if line.startswith(f"{MARK}folder "):
                current = line.split(" ", 1)[1]
                continue
            if current in out and line.startswith("./"):
                name = line[2:]
                if name.lower().endswith(MODEL_EXTENSIONS):
                    out[current].append(name)
        return {f: tuple(sorted(v, key=str.lower)) for f, v in out.items()}
