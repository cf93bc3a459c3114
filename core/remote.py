"""SSH access to registered servers: targets with pinned host keys, heartbeats."""

from __future__ import annotations

import logging

from sqlalchemy import update

from core.config import Settings
from core.db.engine import SessionFactory
from core.db.models import Server
from core.servers import ServerView
from core.ssh import SSHConnector, SSHOptions, SSHPool, SSHTarget, TunnelManager, ensure_client_key

log = logging.getLogger(__name__)


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
        """A local URL tunnelled to ComfyUI's port on the server."""
        port = server.comfy_port or self._settings.comfy.default_port
        tunnel = await self.tunnels.get(self.target(server), remote_port=port)
        return tunnel.url

    async def heartbeat(self, server: ServerView) -> None:
        """Touch the dead man's switch file on a rented instance."""
        from core.providers.vast import HEARTBEAT_FILE

        await self.pool.run(self.target(server), f"touch {HEARTBEAT_FILE}", timeout=30)

    async def close(self) -> None:
        await self.tunnels.close_all()
        await self.pool.close()
