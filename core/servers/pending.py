"""Operations in flight, kept in the database so a restart can finish them.

Before the bot asks Vast.ai to create, start, stop or destroy, the server's row takes the
matching status (``creating``, ``starting``, ``stopping``, ``destroying``) and this store
records who is waiting for the answer: the Discord message that shows the progress (or
the channel for a notice). If the process dies mid-call, :mod:`core.servers.recovery`
finds the row, settles it with Vast.ai, and tells that message how it ended.

The records live in the ``bot_state`` key/value table (key ``server-op:<id>``), so no
schema change is needed.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from core.db.engine import SessionFactory
from core.db.models import BotState, utcnow

KEY_PREFIX = "server-op:"
OPS = ("create", "start", "stop", "destroy")


@dataclass(frozen=True, slots=True)
class MessageRef:
    """Where the outcome of an operation goes: a message to edit, else a channel notice.

    ``header`` is the message's first line, kept so an edit after a restart still says
    what the message was about.
    """

    channel_id: int
    message_id: int | None = None
    header: str = ""


@dataclass(frozen=True, slots=True)
class PendingOp:
    server_id: int
    op: str
    since: dt.datetime
    message: MessageRef | None

    def to_json(self) -> dict[str, Any]:
        m = self.message
        return {
            "op": self.op,
            "since": self.since.isoformat(),
            "channel_id": m.channel_id if m else None,
            "message_id": m.message_id if m else None,
            "header": m.header if m else "",
        }

    @classmethod
    def from_json(cls, server_id: int, value: dict[str, Any]) -> PendingOp:
        channel = value.get("channel_id")
        message = (
            MessageRef(int(channel), _int_or_none(value.get("message_id")),
                       str(value.get("header") or ""))
            if channel
            else None
        )
        try:
            since = dt.datetime.fromisoformat(str(value.get("since")))
        except ValueError:
            since = utcnow()
        return cls(server_id, str(value.get("op") or ""), since, message)


def _int_or_none(value: Any) -> int | None:
    return int(value) if value not in (None, "") else None


def _key(server_id: int) -> str:
    return f"{KEY_PREFIX}{server_id}"


class PendingOps:
    def __init__(self, sessions: SessionFactory) -> None:
        self._sessions = sessions

    @staticmethod
    async def add(
        session: AsyncSession, server_id: int, op: str, message: MessageRef | None
    ) -> None:
        """Record ``op`` inside the caller's transaction (with the row it belongs to)."""
        if op not in OPS:
            raise ValueError(op)
        value = PendingOp(server_id, op, utcnow(), message).to_json()
        row = await session.get(BotState, _key(server_id))
        if row is None:
            session.add(BotState(key=_key(server_id), value=value))
        else:
            row.value = value

    async def begin(self, server_id: int, op: str, message: MessageRef | None) -> None:
        async with self._sessions.begin() as session:
            await self.add(session, server_id, op, message)

    async def get(self, server_id: int) -> PendingOp | None:
        async with self._sessions() as session:
            row = await session.get(BotState, _key(server_id))
            return PendingOp.from_json(server_id, dict(row.value)) if row else None

    async def take(self, server_id: int) -> PendingOp | None:
        """Forget the operation; returns it (None when none was recorded)."""
        async with self._sessions.begin() as session:
            row = await session.get(BotState, _key(server_id))
            if row is None:
                return None
            op = PendingOp.from_json(server_id, dict(row.value))
            await session.delete(row)
            return op

    async def all(self) -> dict[int, PendingOp]:
        async with self._sessions() as session:
            rows = (
                await session.scalars(
                    select(BotState).where(BotState.key.startswith(KEY_PREFIX))
                )
            ).all()
        out: dict[int, PendingOp] = {}
        for row in rows:
            try:
                server_id = int(row.key.removeprefix(KEY_PREFIX))
            except ValueError:
                continue
            out[server_id] = PendingOp.from_json(server_id, dict(row.value))
        return out
