"""What the parts of :class:`core.servers.service.ServerService` share.

One :class:`ServerContext` holds the settings, sessions, registry, audit, the Vast.ai
client, the clock and sleep (tests replace both), the per-server locks, the events
observer, and the retry around idempotent Vast.ai calls. The parts (billing, rental,
lifecycle, sync, autostop) each keep a reference to it, so a test that sets ``clock`` on
the service changes it for all of them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from core.audit import AuditService
from core.config import Settings
from core.db.engine import SessionFactory
from core.errors import ValidationFailed
from core.providers.vast import transient
from core.retry import Backoff
from core.servers.pending import MessageRef, PendingOps
from core.servers.registry import ServerRegistry, ServerView
from core.tasks import TaskRegistry
from core.vast import VastClient, VastError, VastNotFound

log = logging.getLogger(__name__)

Progress = Callable[[str], Awaitable[None]]

# Idempotent calls (show, start, stop, destroy) ride out bursts longer than the client's
# own retries; the create's ambiguous-failure loop waits less, as it looks itself up first.
IDEMPOTENT_BACKOFF = Backoff(base=1.0, cap=20.0, jitter="full")
CREATE_BACKOFF = Backoff(base=1.0, cap=10.0, jitter="full")


async def no_progress(_: str) -> None:
    return None


def spread(backoff: Backoff, attempt: int) -> float:
    """Delay before retry ``attempt`` (1-based): the ceiling ±50%, uniformly.

    That is half the ceiling, fixed, plus a full-jitter draw up to the ceiling: the spread
    these loops have always used (neither Backoff's "equal" [c/2, c] nor "full" [0, c]).
    """
    ceiling = min(backoff.cap, backoff.base * 2 ** (attempt - 1))
    return ceiling / 2 + backoff.delay(attempt)


class ServerEvents:
    """Told about a server by the service; the Discord side posts to a channel.

    The methods do nothing here: an instance of this class is the default observer.
    """

    async def idle_warning(self, server: ServerView, channel_id: int, minutes_left: int) -> None:
        return None

    async def notice(self, channel_id: int, text: str) -> None:
        return None

    async def operation_done(self, message: MessageRef, text: str) -> None:
        """An operation that outlived its caller (a restart, a slow start) has ended."""
        return None


class ServerContext:
    def __init__(
        self,
        settings: Settings,
        sessions: SessionFactory,
        registry: ServerRegistry,
        audit: AuditService,
        vast: VastClient | None,
        *,
        public_key: Callable[[], str] | None,
        clock: Callable[[], dt.datetime],
        sleep: Callable[[float], Awaitable[None]],
        poll_interval: float,
        boot_timeout: float,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.registry = registry
        self.audit = audit
        self.vast_client = vast
        self.public_key = public_key
        self.clock = clock
        self.sleep = sleep
        self.poll_interval = poll_interval
        self.boot_timeout = boot_timeout
        # A first boot stuck in "loading" this long is read as a missing image or tag.
        self.pull_timeout = settings.vast.image_pull_timeout
        # How long /server start waits; a slower start is kept, never destroyed.
        self.start_timeout = settings.vast.start_timeout
        self.pending = PendingOps(sessions)
        # Servers with operations running in this process (how many); recovery and the
        # sync leave them alone.
        self.busy: dict[int, int] = {}
        self.tasks = TaskRegistry("servers")
        self.events = ServerEvents()
        # Hook for the SSH layer: touch the heartbeat file on a running instance.
        self.heartbeat: Callable[[ServerView], Awaitable[None]] | None = None
        # Hook for the SSH layer: wait until a booted server's ComfyUI answers (given the
        # instance's current SSH endpoint); raises when it stays silent.
        self.comfy_ready: (
            Callable[[ServerView, tuple[str, int] | None, Progress], Awaitable[None]] | None
        ) = None
        # Hook for the ComfyUI layer: close the bot's connection to a server whose instance
        # stopped or starts again (core.comfy.pool.ComfyPool.drop). Its event stream would
        # otherwise retry a stopped instance with a backoff growing to 10 s, and after a
        # start a job could wait for the stream's next try, blind to its progress.
        self.forget_connections: Callable[[int], Awaitable[None]] | None = None
        self._locks: dict[str, asyncio.Lock] = {}

    async def connections_stale(self, server_id: int) -> None:
        if self.forget_connections is not None:
            try:
                await self.forget_connections(server_id)
            except Exception:  # a stale connection only delays progress, never a stop
                log.exception("closing the ComfyUI connection of server %s failed", server_id)

    @property
    def vast(self) -> VastClient:
        if self.vast_client is None:
            raise ValidationFailed(
                "Vast.ai is not configured: set [vast] api_key (or VAST_AI_API_KEY)."
            )
        return self.vast_client

    def claim(self, server_id: int) -> None:
        self.busy[server_id] = self.busy.get(server_id, 0) + 1

    def release(self, server_id: int) -> None:
        left = self.busy.get(server_id, 0) - 1
        if left > 0:
            self.busy[server_id] = left
        else:
            self.busy.pop(server_id, None)

    def lock(self, key: str) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    async def retry(self, what: str, call: Callable[[], Awaitable[Any]], attempts: int = 5) -> Any:
        """Repeat an idempotent call (show, start, stop, destroy) on transient errors.

        The client already retries a few times; this outer loop rides out longer bursts
        with jittered exponential backoff. Never used for create (see Rental._create_once).
        """
        for attempt in range(1, attempts + 1):
            try:
                return await call()
            except VastError as exc:
                if not transient(exc) or attempt == attempts:
                    raise
                delay = spread(IDEMPOTENT_BACKOFF, attempt)
                log.warning("%s failed (%s); retrying in %.1f s", what, exc, delay)
                await self.sleep(delay)
        raise AssertionError("unreachable")

    async def destroy_instance(self, instance_id: int) -> None:
        """Destroy a Vast.ai instance; one that is gone already is fine."""
        try:
            await self.retry("destroy", lambda: self.vast.destroy_instance(instance_id))
        except VastNotFound:
            pass
