"""Audit trail: who did what, to which resource, with what outcome."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from core.db.engine import SessionFactory
from core.db.models import AuditLog
from core.redact import redact_text, redact_value

log = logging.getLogger(__name__)

OUTCOME_OK = "ok"
OUTCOME_REFUSED = "refused"
OUTCOME_ERROR = "error"


@dataclass(frozen=True, slots=True)
class Actor:
    """The person (or the bot itself, user_id None) on whose behalf something happens."""

    user_id: int | None
    guild_id: int | None = None
    channel_id: int | None = None
    is_admin: bool = False


SYSTEM = Actor(user_id=None)


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    user_id: int | None
    action: str
    resource: str | None
    outcome: str
    details: dict[str, Any]
    created_at: Any


class AuditService:
    def __init__(self, session_factory: SessionFactory) -> None:
        self._sessions = session_factory

    async def record(
        self,
        actor: Actor,
        action: str,
        *,
        outcome: str,
        resource: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        """Write one row; never raises, because auditing must not break the action itself.

        Every detail and the resource are redacted here (core.redact), whoever records
        them: the command's options as typed can hold a URL with ``?token=``.
        """
        try:
            resource = redact_text(resource) if resource else None
            details = redact_value(details or {})
            async with self._sessions.begin() as session:
                session.add(
                    AuditLog(
                        user_id=actor.user_id,
                        guild_id=actor.guild_id,
                        channel_id=actor.channel_id,
                        action=action[:64],
                        resource=resource[:255] if resource else None,
                        outcome=outcome,
                        details=details,
                    )
                )
        except Exception:
            log.exception("could not write audit entry for %s", action)

    async def recent(self, limit: int = 20, *, user_id: int | None = None) -> list[AuditEntry]:
        stmt = select(AuditLog).order_by(AuditLog.id.desc()).limit(limit)
        if user_id is not None:
            stmt = stmt.where(AuditLog.user_id == user_id)
        async with self._sessions() as session:
            rows = (await session.scalars(stmt)).all()
        return [
            AuditEntry(r.id, r.user_id, r.action, r.resource, r.outcome, r.details, r.created_at)
            for r in rows
        ]
