"""The only writer of generation rows (``comfy_generations``), and their reads.

Every change of a job's row is one function below, one legal transition. Each is a single
guarded statement, ``UPDATE comfy_generations ... WHERE id = :id AND status IN (<legal
previous states>)``, that reports whether it won: a caller that lost a race (the job was
cancelled or ended meanwhile) sees it and stops, instead of writing over the end. There is
no read before a write: the statements that need the row back take it from ``RETURNING``.
Modelled on SkyPilot's ``sky/jobs/state.py``.

Legal transitions (``ACTIVE`` = pending, queued, running, uploading):

=================  ==========================  ============================================
function           from                        to
=================  ==========================  ============================================
record             (no row)                    pending (on a server, or waiting for a pool's)
assign             pending, without a server   pending, on a server (a pool's queue placed it)
attach_message     any (not a status change)   (unchanged)
mark_queued        pending                     queued
save_progress      ACTIVE                      unchanged; running once ComfyUI started it
move               ACTIVE                      pending, on another (or the same) server
complete           queued, running, uploading  completed
finish             ACTIVE                      failed or cancelled
=================  ==========================  ============================================

``running`` is written lazily: the start is shown from memory and reaches the row with the
next write (progress or the end), so a short job costs no extra statement. ``uploading`` is
no longer written (delivery posts before it writes); rows of older versions may hold it.

This module sits at the bottom of the package: it returns rows, never views.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import uuid
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, case, exists, func, insert, literal, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from core.db.engine import SessionFactory, write_gate
from core.db.models import ComfyGeneration, ComfyWorkflow, GenerationStatus, Server, ServerStatus
from core.errors import ResourceBusy
from core.overview import ACTIVE_JOB_STATES

ACTIVE = tuple(ACTIVE_JOB_STATES)
PENDING = GenerationStatus.PENDING.value
QUEUED = GenerationStatus.QUEUED.value
RUNNING = GenerationStatus.RUNNING.value
UPLOADING = GenerationStatus.UPLOADING.value
COMPLETED = GenerationStatus.COMPLETED.value

# Legal previous states of each guarded transition (the table above).
FROM: dict[str, tuple[str, ...]] = {
    "mark_queued": (PENDING,),
    "assign": (PENDING,),
    "save_progress": ACTIVE,
    "move": ACTIVE,
    "complete": (QUEUED, RUNNING, UPLOADING),
    "finish": ACTIVE,
}

@dataclass(frozen=True)
class Quota:
    """A member's limits at submission: fewer than ``max_active`` jobs in progress and
    fewer than ``max_recent`` started since ``since`` (see record)."""

    user_id: int
    since: dt.datetime
    max_active: int
    max_recent: int

    def params(self) -> dict[str, Any]:
        """The values of the statement's bound limits (see _quota_conditions)."""
        return {"q_user": self.user_id, "q_since": self.since,
                "q_active": self.max_active, "q_recent": self.max_recent}


def _quota_conditions() -> list[ColumnElement[bool]]:
    mine = ComfyGeneration.user_id == bindparam("q_user")
    active = select(func.count()).where(mine, ComfyGeneration.status.in_(ACTIVE))
    recent = select(func.count()).where(mine, ComfyGeneration.created_at >= bindparam("q_since"))
    return [active.scalar_subquery() < bindparam("q_active"),
            recent.scalar_subquery() < bindparam("q_recent")]


@functools.cache
def _insert(names: tuple[str, ...], quota: bool, on_server: bool) -> Any:
    """The INSERT of :meth:`GenerationStore.record`, built once per shape, its values and
    limits bound (``v_<column>``, ``q_*``): each /generate reuses the statement, its cache
    key and compiled form (built anew per job, it cost more CPU than the database's work)."""
    table = ComfyGeneration.__table__
    values = {name: bindparam(f"v_{name}", type_=table.c[name].type) for name in names}
    conditions = _quota_conditions() if quota else []
    if on_server:
        conditions.append(_running(bindparam("q_server")))  # atomic with the insert
    stmt = (insert(table).from_select(list(names), select(*values.values()).where(*conditions))
            if conditions else insert(table).values(values))
    # Loaded as the ORM loads a SELECT (a row of this session), its parameters bound as
    # they are: an ORM INSERT given parameters would take them for a bulk insert.
    return select(ComfyGeneration).from_statement(stmt.returning(*table.c))


# Plain statements: no objects of these sessions need to follow the change.
_PLAIN = {"synchronize_session": False}


def _guarded(transition: str, job_id: int) -> Any:
    return update(ComfyGeneration).where(
        ComfyGeneration.id == job_id, ComfyGeneration.status.in_(FROM[transition])
    )


def _start_values(started_at: dt.datetime | None) -> dict[str, ColumnElement[Any]]:
    """Write the start that was kept in memory: a waiting row becomes running, and keeps
    the first start it learned."""
    if started_at is None:
        return {}
    waiting = ComfyGeneration.status.in_((PENDING, QUEUED))
    return {
        "status": case((waiting, RUNNING), else_=ComfyGeneration.status),
        "queue_position": case((waiting, None), else_=ComfyGeneration.queue_position),
        "started_at": func.coalesce(
            ComfyGeneration.started_at, literal(started_at, ComfyGeneration.started_at.type)
        ),
    }


class GenerationStore:
    """Reads and the guarded transitions of generation rows (see the table above)."""

    def __init__(self, sessions: SessionFactory) -> None:
        self._sessions = sessions
        self._gate = write_gate(sessions)
        # SQLite has no row locks (FOR SHARE is not rendered there): the server's state
        # is checked by the insert's condition alone, atomic since SQLite's writes
        # serialize; PostgreSQL takes the server row's share lock first (see record).
        bind = sessions.kw.get("bind")
        self._locks_rows = bind is None or bind.dialect.name != "sqlite"

    @contextlib.asynccontextmanager
    async def _writing(self) -> AsyncIterator[AsyncSession]:
        """A write transaction, taking its turn at the gate (see core.db.engine.write_gate):
        every job writes its row several times, and a burst of jobs writes at once."""
        async with self._gate, self._sessions.begin() as session:
            yield session

    # ------------------------------------------------------------------ reads

    async def load(self, job_id: int) -> ComfyGeneration | None:
        async with self._sessions() as session:
            return await session.get(ComfyGeneration, job_id)

    async def load_named(self, job_id: int) -> tuple[ComfyGeneration, str | None] | None:
        """The row and the name of its server (None when it has none)."""
        async with self._sessions() as session:
            row = await session.get(ComfyGeneration, job_id)
            if row is None:
                return None
            return row, await _server_name(session, row)

    async def load_attempt(
        self, job_id: int
    ) -> tuple[ComfyGeneration, ComfyWorkflow | None] | None:
        """The row and its custom workflow, read once per attempt to run it."""
        async with self._sessions() as session:
            row = await session.get(ComfyGeneration, job_id)
            if row is None:
                return None
            custom = await session.get(ComfyWorkflow, row.workflow_id) if row.workflow_id else None
            return row, custom

    async def active_ids(self) -> list[int]:
        async with self._sessions() as session:
            return list(
                (
                    await session.scalars(
                        select(ComfyGeneration.id)
                        .where(ComfyGeneration.status.in_(ACTIVE))
                        .order_by(ComfyGeneration.id)
                    )
                ).all()
            )

    async def recent(
        self,
        *,
        user_id: int | None,
        limit: int,
        guild_id: int | None,
        viewer_id: int | None,
        channel_ids: Collection[int] | None,
    ) -> list[ComfyGeneration]:
        """The newest jobs a viewer may see (see types.Viewer): of ``guild_id`` only (or,
        outside a guild, the viewer's own), in ``channel_ids`` or the viewer's own unless
        ``channel_ids`` is None (an admin: the whole guild); of ``user_id`` if given."""
        stmt = select(ComfyGeneration).order_by(ComfyGeneration.id.desc()).limit(limit)
        if guild_id is None:
            stmt = stmt.where(ComfyGeneration.guild_id.is_(None)).where(
                ComfyGeneration.user_id == viewer_id
            )
        else:
            stmt = stmt.where(ComfyGeneration.guild_id == guild_id)
            if channel_ids is not None:
                stmt = stmt.where(
                    or_(
                        ComfyGeneration.channel_id.in_(sorted(channel_ids)),
                        ComfyGeneration.user_id == viewer_id,
                    )
                )
        if user_id is not None:
            stmt = stmt.where(ComfyGeneration.user_id == user_id)
        async with self._sessions() as session:
            return list((await session.scalars(stmt)).all())

    async def counts(self, user_id: int | None, since: dt.datetime) -> tuple[int, int]:
        """(jobs started since ``since``, jobs in progress) of one member."""
        # One statement for both counts: submission runs it once per /generate.
        stmt = select(
            func.count().filter(ComfyGeneration.created_at >= since),
            func.count().filter(ComfyGeneration.status.in_(ACTIVE)),
        ).where(ComfyGeneration.user_id == user_id)
        async with self._sessions() as session:
            recent, active = (await session.execute(stmt)).one()
        return recent or 0, active or 0

    async def workflow_named(self, name: str) -> ComfyWorkflow | None:
        async with self._sessions() as session:
            return (
                await session.scalars(select(ComfyWorkflow).where(ComfyWorkflow.name == name))
            ).first()

    # ------------------------------------------------------------------ transitions

    async def record(
        self,
        *,
        fields: dict[str, Any],
        now: dt.datetime,
        input_path: Callable[[int], str] | None = None,
        quota: Quota | None = None,
    ) -> ComfyGeneration | None:
        """Insert a pending job; ``input_path(id)`` stores its input image under its id.

        With ``quota``, the row is inserted only if its member is within it, checked by the
        same statement (no count first, and two submissions cannot both pass the last
        slot): None when refused.

        A new job is activity on its server (idle autostop counts from here), written in
        the same transaction as the row. The server must still be running, a condition of
        the insert, read first under a share lock of its row on PostgreSQL: idle autostop
        takes that row's lock and looks for jobs before it begins a stop
        (core.servers.state.ServerStates.begin_stop), so a job is never recorded on a
        server whose stop began (ResourceBusy instead). SQLite has no row locks: its
        writes serialize, and the insert's condition alone is atomic with the stop's.
        """
        values = {
            **fields,
            "status": PENDING,
            # Our own prompt id, known before queueing: a restart can find the prompt.
            "comfy_prompt_id": str(uuid.uuid4()),
        }
        server_id = fields.get("server_id")
        stmt = _insert(tuple(values), quota is not None, server_id is not None)
        params = {f"v_{name}": value for name, value in values.items()}
        if quota is not None:
            params.update(quota.params())
        if server_id is not None:
            params["q_server"] = server_id
        async with self._writing() as session:
            if server_id is not None and self._locks_rows:
                await _server_still_running(session, server_id)
            row = (await session.execute(stmt, params)).scalars().first()
            if row is None:
                if server_id is not None:
                    await _server_still_running(session, server_id)
                return None  # over the quota
            if row.server_id is not None:
                await session.execute(_ACTIVITY, {"s_id": row.server_id, "s_now": now,
                                                  "s_channel": row.channel_id})
            if input_path is not None:
                row.parameters = {**row.parameters, "input_path": input_path(row.id)}
                await session.flush()
            return row

    async def attach_message(
        self, job_id: int, channel_id: int | None, message_id: int | None
    ) -> bool:
        """Where the job's status message is (None: it has none; ``channel_id`` None: the
        channel stays); legal in any state (it is not a status)."""
        async with self._writing() as session:
            result = await session.execute(
                _ATTACH, {"j_id": job_id, "j_channel": channel_id, "j_message": message_id})
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    async def mark_queued(self, job_id: int, position: int | None) -> ComfyGeneration | None:
        """ComfyUI accepted the prompt; the row as written, or None if the job ended."""
        async with self._writing() as session:
            result = await session.execute(
                _QUEUED, {"j_id": job_id, "j_position": position})
            return result.scalars().first()

    async def assign(
        self, job_id: int, server_id: int, model: str | None, now: dt.datetime
    ) -> ComfyGeneration | None:
        """A job waiting for a pool's server gets one (and the checkpoint resolved on it);
        the row, or None when it ended meanwhile (cancelled) or has a server already.
        The server must be running, as in :meth:`record`; its activity is written too."""
        async with self._writing() as session:
            await _server_still_running(session, server_id)
            row = (
                await session.execute(
                    _guarded("assign", job_id)
                    .where(ComfyGeneration.server_id.is_(None), _running(server_id))
                    .values(server_id=server_id)
                    .returning(ComfyGeneration),
                    execution_options=_PLAIN,
                )
            ).scalars().first()
            if row is None:
                await _server_still_running(session, server_id)
                return None
            if model is not None and (row.parameters or {}).get("model") != model:
                row.parameters = {**(row.parameters or {}), "model": model}
            activity: dict[str, Any] = {"last_used_at": now}
            if row.channel_id is not None:
                activity["last_channel_id"] = row.channel_id
            await session.execute(
                update(Server).where(Server.id == server_id).values(activity),
                execution_options=_PLAIN,
            )
            await session.flush()
            return row

    async def save_progress(
        self, job_id: int, progress: float, node: str | None, started_at: dt.datetime | None
    ) -> bool:
        values: dict[str, Any] = {"progress": progress, "current_node": node}
        values.update(_start_values(started_at))
        async with self._writing() as session:
            result = await session.execute(
                _guarded("save_progress", job_id).values(values), execution_options=_PLAIN
            )
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    async def move(self, job_id: int, server_id: int) -> bool:
        """Failover: the job waits again, on ``server_id``, under a new prompt id."""
        async with self._writing() as session:
            result = await session.execute(
                _guarded("move", job_id).values(
                    server_id=server_id,
                    status=PENDING,
                    comfy_prompt_id=str(uuid.uuid4()),
                    attempts=ComfyGeneration.attempts + 1,
                ),
                execution_options=_PLAIN,
            )
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    async def complete(
        self,
        job_id: int,
        *,
        server_id: int | None,
        image_urls: list[Any],
        started_at: dt.datetime | None,
        now: dt.datetime,
    ) -> bool:
        """The result was posted: write the end (and the server's activity)."""
        values: dict[str, Any] = {
            "status": COMPLETED, "progress": 1.0, "current_node": None,
            "queue_position": None, "image_urls": image_urls, "started_at": started_at,
            "completed_at": now, "delivered_at": now,
        }
        async with self._writing() as session:
            result = await session.execute(
                _guarded("complete", job_id).values(values), execution_options=_PLAIN
            )
            if server_id is not None:
                # A finished job is activity: idle autostop counts from here.
                await session.execute(
                    update(Server).where(Server.id == server_id).values(last_used_at=now),
                    execution_options=_PLAIN,
                )
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    async def finish(
        self,
        job_id: int,
        status: GenerationStatus,
        error: str | None,
        *,
        started_at: dt.datetime | None,
        now: dt.datetime,
    ) -> tuple[ComfyGeneration, str | None] | None:
        """End a job as failed or cancelled; the row and its server's name, or None when
        it had ended already."""
        values: dict[str, Any] = _start_values(started_at)
        values.update(
            status=status.value, error_message=error, completed_at=now, queue_position=None
        )
        stmt = _guarded("finish", job_id).values(values).returning(ComfyGeneration)
        async with self._writing() as session:
            row = (await session.execute(stmt, execution_options=_PLAIN)).scalars().first()
            if row is None:
                return None
            return row, await _server_name(session, row)


def _running(server_id: Any) -> ColumnElement[bool]:
    """The server is running: a condition of the statement that records a job on it."""
    return exists().where(Server.id == server_id,
                          Server.status == ServerStatus.RUNNING.value)


def _or_kept(name: str, column: Any) -> ColumnElement[Any]:
    """A bound value that leaves the column as it is when None."""
    return func.coalesce(bindparam(name, type_=column.type), column)


# The per-job statements of submission, built once with bound values (see _insert).
# A new job is its server's activity (and, with a channel, the server's last one).
_ACTIVITY = update(Server).where(Server.id == bindparam("s_id")).values(
    last_used_at=bindparam("s_now"),
    last_channel_id=_or_kept("s_channel", Server.last_channel_id),
).execution_options(**_PLAIN)
_ATTACH = update(ComfyGeneration).where(ComfyGeneration.id == bindparam("j_id")).values(
    channel_id=_or_kept("j_channel", ComfyGeneration.channel_id),
    message_id=bindparam("j_message"),
).execution_options(**_PLAIN)
_T = ComfyGeneration.__table__
_QUEUED = select(ComfyGeneration).from_statement(  # a plain UPDATE, loaded as in _insert
    update(_T).where(_T.c.id == bindparam("j_id"), _T.c.status.in_(FROM["mark_queued"]))
    .values(status=QUEUED, queue_position=bindparam("j_position"),
            attempts=case((_T.c.attempts < 1, 1), else_=_T.c.attempts))
    .returning(*_T.c))


async def _server_still_running(session: AsyncSession, server_id: int) -> None:
    """ResourceBusy unless the server runs; under a share lock of its row (PostgreSQL),
    which the idle autostop's stop takes exclusively (ServerStates.begin_stop)."""
    status = await session.scalar(
        select(Server.status).where(Server.id == server_id).with_for_update(read=True)
    )
    if status != ServerStatus.RUNNING.value:
        raise ResourceBusy("The server chosen for this job is no longer running.")


async def _server_name(session: AsyncSession, row: ComfyGeneration) -> str | None:
    if row.server_id is None:
        return None
    return await session.scalar(select(Server.name).where(Server.id == row.server_id))
