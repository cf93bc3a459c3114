"""SSH access to registered servers: targets with pinned host keys, tunnels to ComfyUI,
heartbeats, and the check that a booted server's ComfyUI answers."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import posixpath
from collections.abc import Awaitable, Callable

import aiohttp
from sqlalchemy import update

from core.config import Settings
from core.db.engine import SessionFactory
from core.db.models import Server
from core.errors import ValidationFailed
from core.netguard import guarded_connector
from core.providers import provider_for
from core.retry import Backoff
from core.servers import ServerView
from core.ssh import (
    SSHConnector,
    SSHError,
    SSHOptions,
    SSHPool,
    SSHTarget,
    TunnelManager,
    ensure_client_key,
)
from core.ssh.tunnels import unix_session

log = logging.getLogger(__name__)

#: How long a booted server's ComfyUI may take to answer before the start is reported stuck.
READY_TIMEOUT = 600.0
#: Between two looks at /system_stats while waiting; each look is one short request.
READY_BACKOFF = Backoff(base=0.25, cap=2.0, jitter="full")


def target_for(server: ServerView, default_user: str = "root") -> SSHTarget:
    if not server.ssh_host:
        raise ValueError(f"server {server.name} has no SSH address")
    return SSHTarget(
        host=server.ssh_host,
        port=server.ssh_port or 22,
        username=server.ssh_user or default_user,
        pinned_host_key=server.host_key,
        server_id=server.id,
    )


class Remote:
    """The bot's SSH identity, connection pool and tunnels, built once at start."""

    def __init__(self, settings: Settings, sessions: SessionFactory) -> None:
        self._settings = settings
        self._sessions = sessions
        self.key = ensure_client_key(settings.ssh_key_path)
        options = SSHOptions(
            connect_timeout=settings.ssh.connect_timeout,
            keepalive_interval=settings.ssh.keepalive_interval,
        )
        self.connector = SSHConnector(self.key, options, on_host_key_learned=self._pin)
        # Keys of an unfinished rotation (core.servers.keys): offered after the bot's key
        # so servers that still hold only the other one stay reachable after a restart.
        path = settings.ssh_key_path
        extra = [ensure_client_key(p) for p in (path.with_name(path.name + ".next"),
                                                path.with_name(path.name + ".old"))
                 if p.exists()]
        self.connector.use_keys(self.key, *extra)
        self.pool = SSHPool(self.connector)
        self.tunnels = TunnelManager(self.pool)

    async def _pin(self, target: SSHTarget, key_line: str) -> None:
        """Store a host key learned on first contact; only if none is pinned yet."""
        if target.server_id is None:
            return
        async with self._sessions.begin() as session:
            await session.execute(
                update(Server)
                .where(Server.id == int(target.server_id))
                .where(Server.host_key.is_(None))
                .values(host_key=key_line)
            )
        log.info("pinned the host key of %s", target.address)

    def target(self, server: ServerView) -> SSHTarget:
        return target_for(server, self._settings.ssh.user)

    async def url_for(self, server: ServerView) -> str:
        """A local URL tunnelled to ComfyUI's port on the server (the row's port: 18188 on
        Vast's ComfyUI image, the configured default elsewhere)."""
        port = server.comfy_port or self._settings.comfy.default_port
        tunnel = await self.tunnels.get(self.target(server), remote_port=port)
        return tunnel.url

    async def wait_comfy(
        self,
        server: ServerView,
        ssh_endpoint: tuple[str, int] | None = None,
        progress: Callable[[str], Awaitable[None]] | None = None,
        *,
        timeout: float | None = None,
    ) -> None:
        """Return once the server's ComfyUI answers ``/system_stats`` through the tunnel.

        A booted instance is ready only then, not when Vast says ``running``: after a start
        the boot hooks (or supervisord) still have to bring ComfyUI up. Servers without an
        installation (never set up) and servers reached by URL return at once.
        ``ssh_endpoint`` is where the instance answers SSH now (it may have moved since the
        row was written). Raises :class:`ValidationFailed` when ComfyUI stays silent.
        """
        if not server.comfy_installed or not provider_for(server).tunnelled(server):
            return
        if ssh_endpoint is not None:
            server = dataclasses.replace(
                server, ssh_host=ssh_endpoint[0], ssh_port=ssh_endpoint[1])
        limit = READY_TIMEOUT if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        attempt, last = 0, "no answer yet"
        # A short bound per look: ComfyUI answers /system_stats at once when it is up.
        look = aiohttp.ClientTimeout(total=10)
        while True:
            try:
                url = await self.url_for(server)
                # The tunnel's endpoint is a private Unix socket (core.ssh.tunnels).
                unix = unix_session(url, look)
                http, base = unix if unix is not None else (
                    aiohttp.ClientSession(timeout=look, connector=guarded_connector()), url)
                async with http, http.get(f"{base}/system_stats",
                                          allow_redirects=False) as resp:
                    await resp.content.read(64 * 1024)
                    if resp.status == 200:
                        log.info("ComfyUI on %s answers", server.name)
                        return
                    last = f"HTTP {resp.status}"
            except (SSHError, aiohttp.ClientError, TimeoutError, OSError) as exc:
                last = str(exc) or type(exc).__name__
            attempt += 1
            if attempt == 1 and progress is not None:
                await progress(f"Server {server.name} is up; waiting for ComfyUI to answer…")
            if loop.time() > deadline:
                raise ValidationFailed(
                    f"Server {server.name} runs, but its ComfyUI did not answer within "
                    f"{limit / 60:.0f} minutes ({last}); try /server diagnose or /setup run."
                )
            await asyncio.sleep(READY_BACKOFF.delay(attempt))

    async def heartbeat(self, server: ServerView) -> None:
        """Touch the dead man's switch file on a rented instance."""
        from core.providers.vast import HEARTBEAT_FILE, LEGACY_HEARTBEAT_FILE

        await self.pool.run(
            self.target(server),
            f"mkdir -p {posixpath.dirname(HEARTBEAT_FILE)} && "
            f"touch {HEARTBEAT_FILE} {LEGACY_HEARTBEAT_FILE}", timeout=30)

    async def close(self) -> None:
        await self.tunnels.close_all()
        await self.pool.close()
