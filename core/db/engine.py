"""Async engine, session factory and start-up migrations."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import weakref
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")

SessionFactory = async_sessionmaker[AsyncSession]


#: How long a SQLite writer waits for another connection's write lock, in seconds.
SQLITE_BUSY_TIMEOUT = 30.0


class RollbackOnClose(sqlite3.Connection):
    """A SQLite connection that rolls back its open transaction when it is closed.

    A task cancelled in the middle of a statement (a job's Cancel button cancels its
    runner; ``wait_for`` timeouts; shutdown) makes SQLAlchemy invalidate and close the
    connection. ``sqlite3.Connection.close`` uses ``sqlite3_close_v2``, which leaves a
    "zombie" while the cancelled cursor's statement is not finalized, and a zombie keeps
    its transaction and so the database's write lock: every other writer then waited out
    the busy timeout and failed with "database is locked" until garbage collection. A
    ROLLBACK first ends the transaction whatever statements are pending (SQLite aborts
    them since 3.7.11).
    """

    def close(self) -> None:
        try:
            if self.in_transaction:
                self.rollback()
        except sqlite3.Error as exc:  # already broken: closing is all that is left
            log.debug("rollback before close failed: %s", exc)
        super().close()


def create_engine(
    url: str, *, echo: bool = False, busy_timeout: float = SQLITE_BUSY_TIMEOUT
) -> AsyncEngine:
    """Create the engine; for SQLite, create the file's directory and enable foreign keys."""
    parsed = make_url(url)
    kwargs: dict[str, object] = {"echo": echo}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"timeout": busy_timeout, "factory": RollbackOnClose}
        if parsed.database and parsed.database != ":memory:":
            # Each aiosqlite connection is a thread plus PRAGMAs to open; the default pool
            # (5 + 10 overflow, the overflow closed after each use) reopens them all the
            # time when many jobs write at once. Keep enough of them open, but not many
            # more: writers take turns at the write gate (below) and hold no connection
            # while they wait, so more connections add threads and SQLite caches (about
            # 0.8 MB each), not throughput. At 2,000 jobs 20 + 20 opened up to 36 at once.
            kwargs["pool_size"] = 16
            kwargs["max_overflow"] = 4
        # Rolled back on return only when a transaction is open (see _sqlite_reset).
        kwargs["pool_reset_on_return"] = None
    else:
        kwargs["pool_pre_ping"] = True
        kwargs["pool_size"] = 5
    engine = create_async_engine(url, **kwargs)
    if parsed.get_backend_name() == "sqlite":

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
            cur.close()

        @event.listens_for(engine.sync_engine, "reset")
        def _sqlite_reset(dbapi_conn, _record, _state) -> None:  # type: ignore[no-untyped-def]
            # The pool's usual reset is a ROLLBACK on every return, a trip to the
            # connection's thread (aiosqlite) even after a commit ended the transaction:
            # one per write, a burst of jobs writes thousands of times. SQLite says whether
            # a transaction is open (a SELECT alone opens none in sqlite3's default mode).
            if dbapi_conn.driver_connection.in_transaction:
                dbapi_conn.rollback()

    return engine


def create_session_factory(engine: AsyncEngine) -> SessionFactory:
    return async_sessionmaker(engine, expire_on_commit=False)


def write_gate(sessions: SessionFactory) -> contextlib.AbstractAsyncContextManager[Any]:
    """What a busy writer holds around its write transactions: one process-wide lock per
    SQLite database, nothing for a server database.

    SQLite has one writer at a time. When hundreds of jobs write at once, each waiting
    connection sleeps in SQLite's busy handler (steps of up to 100 ms, in no order) while
    it holds one of the pool's connections: the lock changes hands slowly, the pool runs
    dry (30-s timeouts) and unlucky writers wait out the busy timeout ("database is
    locked"). Queued on an asyncio lock instead, the writers take turns at once and hold
    no connection while they wait.
    """
    bind = sessions.kw.get("bind")
    if bind is None or bind.dialect.name != "sqlite":
        return contextlib.nullcontext()
    gate = _GATES.get(bind)
    if gate is None:
        gate = _GATES[bind] = asyncio.Lock()
    return gate


_GATES: weakref.WeakKeyDictionary[AsyncEngine, asyncio.Lock] = weakref.WeakKeyDictionary()


def alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


async def migrate(engine: AsyncEngine) -> None:
    """Apply Alembic migrations up to head (idempotent)."""

    def _upgrade(connection: Connection) -> None:
        command.upgrade(alembic_config(connection), "head")

    async with engine.begin() as conn:
        await conn.run_sync(_upgrade)
    log.info("database schema is at head")


async def current_revision(engine: AsyncEngine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    def _rev(connection: Connection) -> str | None:
        return MigrationContext.configure(connection).get_current_revision()

    async with engine.connect() as conn:
        return await conn.run_sync(_rev)
