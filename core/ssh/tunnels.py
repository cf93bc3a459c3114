"""Local forwarding to a port on a server: :class:`Tunnel` and :class:`TunnelManager`.

They give ComfyUI's port on a server a stable local endpoint that survives reconnects: a
Unix socket that only the bot's user can open (mode 0600, in a private 0700 directory).
ComfyUI has no login, so a loopback TCP port would hand it to every local user (issue 12).
The endpoint is named by a URL ``http+unix://<percent-encoded socket path>`` (the
requests-unixsocket convention); :func:`unix_socket_path` reads it back and HTTP clients
connect with ``aiohttp.UnixConnector``. Close tunnels (:meth:`TunnelManager.close_all`)
before the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path
from urllib.parse import quote, unquote

import aiohttp
import asyncssh

from core.ssh.errors import SSHError
from core.ssh.pool import ConnectionPool, PooledConnection
from core.ssh.target import SSHTarget
from core.tasks import TaskRegistry

log = logging.getLogger(__name__)

_READ_CHUNK = 65536
_SUPERVISOR = "supervisor"
UNIX_URL_PREFIX = "http+unix://"


# The host part of URLs sent over a Unix socket: aiohttp needs one; the socket decides.
UNIX_BASE_URL = "http://localhost"


def unix_session(
    url: str, timeout: aiohttp.ClientTimeout
) -> tuple[aiohttp.ClientSession, str] | None:
    """For a :func:`unix_url`: a new session connected to its socket (the caller closes
    it) and the base URL to use with it; None for any other URL."""
    path = unix_socket_path(url)
    if path is None:
        return None
    session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=path), timeout=timeout)
    return session, UNIX_BASE_URL


def unix_url(path: str | os.PathLike[str]) -> str:
    """The URL naming a Unix socket endpoint (see the module docstring)."""
    return UNIX_URL_PREFIX + quote(os.fspath(path), safe="")


def unix_socket_path(url: str) -> str | None:
    """The socket path of a :func:`unix_url`, or None for any other URL."""
    if not url.startswith(UNIX_URL_PREFIX):
        return None
    return unquote(url[len(UNIX_URL_PREFIX) :].rstrip("/"))


def private_socket_dir() -> Path:
    """A fresh directory only this user can enter (mkdtemp creates it 0700), checked."""
    path = Path(tempfile.mkdtemp(prefix="comfyvast-tunnel-"))
    info = path.lstat()
    if info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) != 0o700:
        shutil.rmtree(path, ignore_errors=True)
        raise OSError(f"{path} is not a private directory")
    return path


class Tunnel:
    """A private Unix socket forwarded over SSH to ``remote_host:remote_port``.

    We own the local listener (rather than asyncssh's ``forward_local_path_to_port``) so
    the socket, and therefore :attr:`url`, stays the same across reconnects. A supervisor task
    keeps a pooled connection leased, waits for it to drop and re-establishes it with
    backoff; each accepted local connection opens a direct-tcpip channel on whatever
    connection is current.
    """

    def __init__(
        self, pool: ConnectionPool, target: SSHTarget, remote_host: str, remote_port: int
    ) -> None:
        self.pool = pool
        self.target = target
        self.remote_host = remote_host
        self.remote_port = remote_port
        # The socket's private directory and path, made by start().
        self.socket_dir: Path | None = None
        self.socket_path: Path | None = None
        self._server: asyncio.Server | None = None
        # Holds the supervisor (one keyed task); it logs the supervisor's crash.
        self._tasks = TaskRegistry("ssh-tunnel")
        self._conn: asyncssh.SSHClientConnection | None = None
        self._ready = asyncio.Event()
        self._retarget = asyncio.Event()
        # The handler tasks of accepted local connections. asyncio.start_server creates
        # them, not us, so they cannot go through the TaskRegistry; each handler adds and
        # removes itself so close() can cancel the forwards still open.
        self._clients: set[asyncio.Task[None]] = set()
        self._closed = False
        self.last_error: SSHError | None = None
        # How many SSH connections the tunnel has used so far (1 + reconnects).
        self.connections_made = 0

    @property
    def url(self) -> str:
        """``http+unix://...``: connect with ``aiohttp.UnixConnector(tunnel.socket_path)``."""
        if self.socket_path is None:
            raise RuntimeError("the tunnel has not started")
        return unix_url(self.socket_path)

    @property
    def connected(self) -> bool:
        return self._ready.is_set()

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        return (
            f"Tunnel({self.socket_path} -> {self.target.address} "
            f"{self.remote_host}:{self.remote_port}, connected={self.connected})"
        )

    async def start(self) -> None:
        """Listen locally and connect; raises the first connection error (e.g. auth)."""
        self.socket_dir = private_socket_dir()
        self.socket_path = self.socket_dir / "comfyui.sock"
        try:
            self._server = await asyncio.start_unix_server(
                self._handle_client, path=str(self.socket_path)
            )
            # The 0700 directory already keeps other users out (also in the moment before
            # this chmod); 0600 on the socket says the same on its own.
            self.socket_path.chmod(0o600)
            # Connect once up front so configuration errors surface to the caller.
            entry = await self.pool.acquire(self.target)
        except BaseException:
            if self._server is not None:
                self._server.close()
            self._remove_socket()
            self._closed = True
            raise
        self._tasks.spawn(
            self._supervise(entry),
            key=_SUPERVISOR,
            name=f"ssh-tunnel-{self.target.key}-{self.remote_port}",
        )
        log.info(
            "Tunnel %s -> %s %s:%d started",
            self.socket_path,
            self.target.address,
            self.remote_host,
            self.remote_port,
        )

    async def wait_connected(self, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            await self._ready.wait()

    def retarget(self, target: SSHTarget) -> None:
        """Point the tunnel at a changed host/port/pin, keeping the local URL."""
        if target != self.target:
            self.target = target
            self._retarget.set()

    async def _supervise(self, entry: PooledConnection | None) -> None:
        failures = 0
        delays = self.pool.options.backoff()
        while not self._closed and not self.pool.closed:
            if entry is None:
                try:
                    entry = await self.pool.acquire(self.target)
                except SSHError as exc:
                    failures += 1
                    self.last_error = exc
                    delay = delays.delay(failures)
                    log.warning(
                        "Tunnel to %s could not reconnect (%s); next try in %.2f s",
                        self.target.address,
                        exc,
                        delay,
                    )
                    await asyncio.sleep(delay)
                    continue
            failures = 0
            self.last_error = None
            self.connections_made += 1
            self._conn = entry.conn
            self._ready.set()
            # Two local waits raced against each other, not background tasks.
            closed = asyncio.ensure_future(entry.conn.wait_closed())
            retarget = asyncio.ensure_future(self._retarget.wait())
            try:
                await asyncio.wait({closed, retarget}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                closed.cancel()
                retarget.cancel()
                self._ready.clear()
                self._conn = None
                self._retarget.clear()
                self.pool.release(entry)
                entry = None
            if not self._closed:
                log.warning(
                    "Tunnel to %s lost its SSH connection; reconnecting", self.target.address
                )

    async def _handle_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._clients.add(task)
        try:
            await self._forward(reader, writer)
        except asyncio.CancelledError:
            # close() cancels open forwards; start_server would report a cancelled handler
            # task as an error, so it ends quietly here (this task is the handler's own).
            pass
        except Exception:
            log.exception("Tunnel %s: forwarding a connection failed", self.socket_path)
        finally:
            if task is not None:
                self._clients.discard(task)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                await self.wait_connected(self.pool.options.connect_timeout)
            except TimeoutError:
                log.warning(
                    "Tunnel %s: no SSH connection; dropping a local client", self.socket_path
                )
                return
            conn = self._conn
            if conn is None:
                return
            try:
                remote_reader, remote_writer = await conn.open_connection(
                    self.remote_host, self.remote_port
                )
            except (asyncssh.Error, OSError) as exc:
                log.warning(
                    "Tunnel %s: could not open %s:%d on %s: %s",
                    self.socket_path,
                    self.remote_host,
                    self.remote_port,
                    self.target.address,
                    exc,
                )
                return
            try:
                await asyncio.gather(_pipe(reader, remote_writer), _pipe(remote_reader, writer))
            finally:
                remote_writer.close()
        finally:
            writer.close()

    async def close(self) -> None:
        """Stop listening, drop forwarded connections and release the SSH connection."""
        if self._closed and _SUPERVISOR not in self._tasks:
            return
        self._closed = True
        if self._server is not None:
            self._server.close()
        for task in list(self._clients):
            task.cancel()
        # Cancels the supervisor and waits for it to release its connection lease.
        await self._tasks.close(timeout=None)
        if self._clients:
            await asyncio.gather(*self._clients, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
        self._remove_socket()
        log.info("Tunnel %s closed", self.socket_path)

    def _remove_socket(self) -> None:
        # Python 3.11's unix server leaves its socket file behind.
        if self.socket_dir is not None:
            shutil.rmtree(self.socket_dir, ignore_errors=True)


async def _pipe(
    reader: asyncio.StreamReader | asyncssh.SSHReader[bytes],
    writer: asyncio.StreamWriter | asyncssh.SSHWriter[bytes],
) -> None:
    """Copy until EOF, then pass the EOF on (HTTP clients half-close)."""
    try:
        while True:
            data = await reader.read(_READ_CHUNK)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError, asyncssh.Error):
        # Either side went away; closing both ends (in the caller) is all there is to do.
        writer.close()


async def start_tunnel(
    pool: ConnectionPool, target: SSHTarget, remote_host: str, remote_port: int
) -> Tunnel:
    """Start a :class:`Tunnel` from a private Unix socket to ``remote_host:remote_port``."""
    tunnel = Tunnel(pool, target, remote_host, remote_port)
    await tunnel.start()
    return tunnel


class TunnelManager:
    """One :class:`Tunnel` per (server, remote port), so each server keeps one local URL."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self._tunnels: dict[tuple[str, str, int], Tunnel] = {}
        self._lock = asyncio.Lock()

    async def get(
        self, target: SSHTarget, remote_port: int = 8188, remote_host: str = "127.0.0.1"
    ) -> Tunnel:
        """The live tunnel for ``target``, started on first use."""
        key = (target.key, remote_host, remote_port)
        async with self._lock:
            tunnel = self._tunnels.get(key)
            if tunnel is not None and not tunnel.closed:
                tunnel.retarget(target)
                return tunnel
            tunnel = await start_tunnel(self.pool, target, remote_host, remote_port)
            self._tunnels[key] = tunnel
            return tunnel

    async def url(self, target: SSHTarget, remote_port: int = 8188) -> str:
        return (await self.get(target, remote_port)).url

    async def close(self, target: SSHTarget) -> None:
        """Close every tunnel to ``target`` (e.g. when the server is stopped)."""
        async with self._lock:
            keys = [k for k in self._tunnels if k[0] == target.key]
            tunnels = [self._tunnels.pop(k) for k in keys]
        for tunnel in tunnels:
            await tunnel.close()

    async def close_all(self) -> None:
        async with self._lock:
            tunnels = list(self._tunnels.values())
            self._tunnels.clear()
        for tunnel in tunnels:
            await tunnel.close()
