"""Key/value facts the bot keeps across restarts."""

from __future__ import annotations

from typing import Any

from core.db.engine import SessionFactory
from core.db.models import BotState


class StateStore:
    def __init__(self, session_factory: SessionFactory) -> None:
        self._sessions = session_factory

    async def get(self, key: str) -> dict[str, Any] | None:
        async with self._sessions() as session:
            row = await session.get(BotState, key)
            return dict(row.value) if row else None

    async def set(self, key: str, value: dict[str, Any]) -> None:
        async with self._sessions.begin() as session:
            row = await session.get(BotState, key)
            if row is None:
                session.add(BotState(key=key, value=value))
            else:
                row.value = value
