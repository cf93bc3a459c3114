"""Server registry: the team's GPU servers of every kind, as rows and read-only views.

Renting and the life cycle live in the sibling modules of this package; this module owns
the rows, names and the read side used by every other service.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select

from core.audit import OUTCOME_OK, Actor, AuditService
from core.db.engine import SessionFactory
from core.db.models import ComfyGeneration, Provider, Server, ServerStatus, utcnow
from core.errors import NotFound, ValidationFailed
from core.overview import ACTIVE_JOB_STATES
from core.servers.validation import (
    MAX_SERVER_ID,
    parse_server_ref,
    shown_ref,
    validate_comfy_url,
    validate_name,
    validate_ssh_target,
)


@dataclass(frozen=True, slots=True)
class ServerView:
    """A read-only snapshot of a server row, safe to pass across layers."""

    id: int
    name: str
    provider: str
    provider_id: str | None
    status: str
    status_message: str | None
    gpu: str | None
    gpu_count: int
    gpu_ram_mb: int | None
    price_per_hour: float
    location: str | None
    ssh_host: str | None
    ssh_port: int | None
    ssh_user: str | None
    host_key: str | None
    comfy_url: str | None
    comfy_port: int | None
    idle_timeout: int | None
    last_used_at: dt.datetime | None
    last_channel_id: int | None
    running_since: dt.datetime | None
    created_at: dt.datetime
    comfy_path: str | None = None
    setup_profile: str | None = None
    comfy_installed: bool = False

    @property
    def is_ready(self) -> bool:
        return self.status == ServerStatus.RUNNING.value

    @classmethod
    def of(cls, row: Server) -> ServerView:
        return cls(
            id=row.id,
            name=row.name,
            provider=row.provider,
            provider_id=row.provider_id,
            status=row.status,
            status_message=row.status_message,
            gpu=row.gpu,
            gpu_count=row.gpu_count,
            gpu_ram_mb=row.gpu_ram_mb,
            price_per_hour=row.price_per_hour,
            location=row.location,
            ssh_host=row.ssh_host,
            ssh_port=row.ssh_port,
            ssh_user=row.ssh_user,
            host_key=row.host_key,
            comfy_url=row.comfy_url,
            comfy_port=row.comfy_port,
            idle_timeout=row.idle_timeout,
            last_used_at=row.last_used_at,
            last_channel_id=row.last_channel_id,
            running_since=row.running_since,
            created_at=row.created_at,
            comfy_path=row.comfy_path,
            setup_profile=row.setup_profile,
            comfy_installed=bool(row.comfy_installed),
        )


# The columns of a ServerView in its fields' order: a row becomes a view by position (by
# name, 25 lookups per server, it was most of a read of 100 servers).
_VIEW_COLUMNS = [Server.__table__.c[f.name] for f in dataclasses.fields(ServerView)]
_ALL_SERVERS = select(*_VIEW_COLUMNS).order_by(Server.name)
_LIVE_SERVERS = _ALL_SERVERS.where(Server.status != ServerStatus.DESTROYED.value)
_ACTIVE_JOBS = (
    select(ComfyGeneration.server_id, func.count())
    .where(ComfyGeneration.status.in_(ACTIVE_JOB_STATES))
    .where(ComfyGeneration.server_id.is_not(None))
    .group_by(ComfyGeneration.server_id)
)


class ServerRegistry:
    def __init__(self, session_factory: SessionFactory, audit: AuditService) -> None:
        self._sessions = session_factory
        self._audit = audit
        # What "now" is for activity stamps; the services share one clock (bench.costsim
        # runs them on a compressed one).
        self.clock: Callable[[], dt.datetime] = utcnow

    async def get(self, name_or_id: str | int) -> ServerView:
        async with self._sessions() as session:
            row = await self._find(session, name_or_id)
            return ServerView.of(row)

    async def _find(self, session, name_or_id: str | int) -> Server:  # type: ignore[no-untyped-def]
        server_id, name = parse_server_ref(name_or_id)
        if server_id is not None:
            row = await session.get(Server, server_id)
            if row is not None:
                return row
        row = None
        if name is not None:
            row = (await session.scalars(select(Server).where(Server.name == name))).first()
        if row is None:
            raise NotFound(f"There is no server named '{shown_ref(name_or_id)}'.")
        return row

    async def list(self, *, include_destroyed: bool = False) -> list[ServerView]:
        # Plain rows (no ORM objects), from statements built once: placement reads this
        # a few times a second while jobs are submitted.
        stmt = _ALL_SERVERS if include_destroyed else _LIVE_SERVERS
        async with self._sessions() as session:
            rows = (await session.execute(stmt)).all()
        views = [ServerView(*row) for row in rows]
        # As ServerView.of: a row of an older version may say NULL.
        return [v if v.comfy_installed is not None else dataclasses.replace(
            v, comfy_installed=False) for v in views]

    async def names(self, prefix: str = "", *, limit: int = 25) -> list[str]:
        """Names for autocomplete: live servers whose name contains what was typed."""
        stmt = (
            select(Server.name)
            .where(Server.status != ServerStatus.DESTROYED.value)
            .where(Server.name.contains(prefix.lower(), autoescape=True))
            .order_by(Server.name)
            .limit(limit)
        )
        async with self._sessions() as session:
            return list((await session.scalars(stmt)).all())

    async def active_jobs(self) -> dict[int, int]:
        """Jobs waiting or running per server id, for picking the least busy server."""
        async with self._sessions() as session:
            return {sid: n for sid, n in (await session.execute(_ACTIVE_JOBS)).all()}

    async def ensure_name_free(self, name: str) -> None:
        async with self._sessions() as session:
            taken = (await session.scalars(select(Server.id).where(Server.name == name))).first()
        if taken is not None:
            raise ValidationFailed(f"A server named '{name}' already exists; pick another name.")

    async def add_direct(self, actor: Actor, name: str, url: str) -> ServerView:
        """Register a ComfyUI that is already running (the caller checked it answers)."""
        name = validate_name(name)
        url = validate_comfy_url(url)
        return await self._add(
            actor, "server add-direct", {"url": url},
            provider=Provider.DIRECT.value, name=name, comfy_url=url,
        )

    async def add_ssh(
        self,
        actor: Actor,
        name: str,
        host: str,
        port: int,
        user: str,
        host_key: str,
        *,
        comfy_port: int,
    ) -> ServerView:
        """Register a host the team owns, with the host key pinned on first contact."""
        name = validate_name(name)
        host, port, user = validate_ssh_target(host, port, user)
        return await self._add(
            actor, "server add-ssh", {"host": host, "port": port, "user": user},
            provider=Provider.SSH.value, name=name, ssh_host=host, ssh_port=port,
            ssh_user=user, host_key=host_key, comfy_port=comfy_port,
        )

    async def _add(
        self, actor: Actor, action: str, details: dict[str, Any], *, name: str, **fields: Any
    ) -> ServerView:
        """Insert a server that is running from the start (ssh, direct) and audit it."""
        await self.ensure_name_free(name)
        now = self.clock()
        async with self._sessions.begin() as session:
            row = Server(
                name=name,
                status=ServerStatus.RUNNING.value,
                is_launched=True,
                running_since=now,
                created_by=actor.user_id,
                last_used_at=now,
                **fields,
            )
            session.add(row)
            await session.flush()
            view = ServerView.of(row)
        await self._audit.record(actor, action, outcome=OUTCOME_OK, resource=name, details=details)
        return view

    async def touch(self, server_id: int, *, channel_id: int | None = None) -> None:
        """Record activity (a generation, setup, download) so idle autostop waits."""
        if not 1 <= server_id <= MAX_SERVER_ID:  # e.g. a forged Keep-alive button id
            return
        async with self._sessions.begin() as session:
            row = await session.get(Server, server_id)
            if row is not None:
                row.last_used_at = self.clock()
                if channel_id is not None:
                    row.last_channel_id = channel_id

    async def set_status(
        self, server_id: int, status: ServerStatus, message: str | None = None
    ) -> None:
        async with self._sessions.begin() as session:
            row = await session.get(Server, server_id)
            if row is None:
                raise NotFound(f"Server {server_id} no longer exists.")
            row.status = status.value
            row.status_message = message
