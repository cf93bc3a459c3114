"""One ComfyUI connection (HTTP client + shared event stream) per server."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp

from core.comfy.client import ComfyClient
from core.comfy.stream import ComfyEventStream
from core.servers import ServerView
from core.ssh.tunnels import unix_session

log = logging.getLogger(__name__)

# Given a server, the base URL the bot reaches its ComfyUI at (direct, tunnel, public port).
# An SSH tunnel is a private Unix socket named by an ``http+unix://`` URL.
EndpointResolver = Callable[[ServerView], Awaitable[str]]

# What requests through a Unix socket are addressed to (the Host header); the socket
# decides where they go. ComfyUI checks Host only against an Origin header, sent by none.
@dataclass
class ComfyConnection:
    server_id: int
    base_url: str
    client: ComfyClient
    stream: ComfyEventStream
    # The connection's own HTTP session when it goes through a tunnel's Unix socket.
    session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        await self.stream.close()
        if self.session is not None:
            await self.session.close()


class ComfyPool:
    """Shares one WebSocket per server between all jobs on it."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        resolver: EndpointResolver,
        *,
        request_timeout: float = 30.0,
        connect_timeout: float = 10.0,
    ) -> None:
        self._http = http
        self._resolver = resolver
        self._timeout = request_timeout
        self._connect_timeout = connect_timeout
        # One client id per bot process: ComfyUI routes a prompt's messages to the socket
        # whose clientId queued it, so every job on a server must use the same id.
        self.client_id = f"comfyvast-{uuid.uuid4().hex[:12]}"
        self._conns: dict[int, ComfyConnection] = {}
        self._locks: dict[int, asyncio.Lock] = {}

    async def get(self, server: ServerView) -> ComfyConnection:
        lock = self._locks.setdefault(server.id, asyncio.Lock())
        async with lock:
            base_url = (await self._resolver(server)).rstrip("/")
            conn = self._conns.get(server.id)
            if conn is not None and conn.base_url == base_url:
                return conn
            if conn is not None:  # the endpoint moved (new tunnel, new public IP)
                await conn.close()
            http, session, url = self._http, None, base_url
            # aiohttp picks the socket per session: one session per tunnel.
            unix = unix_session(base_url, self._http.timeout)
            if unix is not None:
                session, url = unix
                http = session
            client = ComfyClient(url, http, timeout=self._timeout, client_id=self.client_id)
            stream = ComfyEventStream(
                url,
                http,
                self.client_id,
                client=client,
                connect_timeout=self._connect_timeout,
            )
            # Don't block on the first connect: a server that is down is detected by the
            # HTTP calls, and the stream keeps reconnecting in the background.
            await stream.start(wait=False)
            conn = ComfyConnection(server.id, base_url, client, stream, session)
            self._conns[server.id] = conn
            return conn

    def client_for(self, base_url: str) -> ComfyClient:
        """A bare client, for one-off checks before a server is registered."""
        return ComfyClient(base_url, self._http, timeout=self._timeout, client_id=self.client_id)

    async def drop(self, server_id: int) -> None:
        conn = self._conns.pop(server_id, None)
        if conn is not None:
            await conn.close()

    async def close(self) -> None:
        for server_id in list(self._conns):
            await self.drop(server_id)
