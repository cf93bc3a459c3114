"""Leasing connections: :class:`ConnectionPool` keeps at most one connection per target.

A connection is leased while in use; when the last lease ends it is closed after
``options.idle_timeout`` seconds unless someone leases it again. A connection that dropped
is replaced on the next lease. Each connection admits ``max_sessions_per_connection``
sessions (commands, SFTP) at a time. The operations on top live in :mod:`core.ssh.client`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncssh

from core.ssh.connector import SSHConnector
from core.ssh.errors import SSHError
from core.ssh.target import SSHTarget

log = logging.getLogger(__name__)


@dataclass(eq=False)
class PooledConnection:
    """One pooled connection and its leases; ``dead`` is set when the server hung up."""

    target: SSHTarget
    conn: asyncssh.SSHClientConnection
    sessions: asyncio.Semaphore
    leases: int = 0
    dead: bool = False
    idle_handle: asyncio.TimerHandle | None = None

    @property
    def alive(self) -> bool:
        return not self.dead and not self.conn.is_closed()


class ConnectionPool:
    """At most one connection per target, shared by commands, SFTP and tunnels.

    A target whose host, port, user or pin changed (same :attr:`SSHTarget.key`) gets a new
    connection.
    """

    def __init__(self, connector: SSHConnector) -> None:
        self.connector = connector
        self.options = connector.options
        self._entries: dict[str, PooledConnection] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._closed = False

    @property
    def open_connections(self) -> int:
        return sum(1 for e in self._entries.values() if e.alive)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called; the pool refuses new work then."""
        return self._closed

    async def acquire(self, target: SSHTarget) -> PooledConnection:
        """Lease the connection to ``target``, opening one if needed; pair with :meth:`release`."""
        if self._closed:
            raise SSHError("The SSH connection pool is shut down.")
        lock = self._locks.setdefault(target.key, asyncio.Lock())
        async with lock:
            entry = self._entries.get(target.key)
            if entry is not None and (not entry.alive or entry.target != target):
                self._discard(entry)
                entry = None
            if entry is None:
                holder: list[PooledConnection] = []

                def on_lost() -> None:
                    if holder:
                        holder[0].dead = True

                conn = await self.connector.connect(target, on_lost=on_lost)
                entry = PooledConnection(
                    target=target,
                    conn=conn,
                    sessions=asyncio.Semaphore(self.options.max_sessions_per_connection),
                )
                holder.append(entry)
                self._entries[target.key] = entry
            if entry.idle_handle is not None:
                entry.idle_handle.cancel()
                entry.idle_handle = None
            entry.leases += 1
            return entry

    def release(self, entry: PooledConnection) -> None:
        """End one lease; the last one starts the idle timer (or closes a replaced connection)."""
        entry.leases -= 1
        if entry.leases > 0:
            return
        if not entry.alive or self._entries.get(entry.target.key) is not entry:
            self._discard(entry)
            return
        loop = asyncio.get_running_loop()
        entry.idle_handle = loop.call_later(self.options.idle_timeout, self._expire, entry)

    def _expire(self, entry: PooledConnection) -> None:
        entry.idle_handle = None
        if entry.leases == 0:
            log.debug("Closing idle SSH connection to %s", entry.target.address)
            self._discard(entry)

    def _discard(self, entry: PooledConnection) -> None:
        if self._entries.get(entry.target.key) is entry:
            del self._entries[entry.target.key]
        if entry.idle_handle is not None:
            entry.idle_handle.cancel()
            entry.idle_handle = None
        if entry.leases == 0:
            entry.conn.close()
        # A leased connection is closed by its last user; a dead one is closed already.

    @contextlib.asynccontextmanager
    async def connection(self, target: SSHTarget) -> AsyncIterator[asyncssh.SSHClientConnection]:
        """Lease the pooled connection to ``target`` for raw asyncssh use."""
        entry = await self.acquire(target)
        try:
            yield entry.conn
        finally:
            self.release(entry)

    @contextlib.asynccontextmanager
    async def session(self, target: SSHTarget) -> AsyncIterator[asyncssh.SSHClientConnection]:
        """Lease the connection and one of its session slots (for a command or SFTP)."""
        entry = await self.acquire(target)
        try:
            async with entry.sessions:
                yield entry.conn
        finally:
            self.release(entry)

    async def close(self) -> None:
        """Close every pooled connection; the pool refuses new work afterwards."""
        self._closed = True
        entries = list(self._entries.values())
        self._entries.clear()
        for entry in entries:
            if entry.idle_handle is not None:
                entry.idle_handle.cancel()
            entry.conn.close()
        for entry in entries:
            with contextlib.suppress(Exception):
                await entry.conn.wait_closed()
