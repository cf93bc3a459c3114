"""The ``model_downloads`` rows: the one place that reads and writes them."""

from __future__ import annotations

from dataclasses import replace

from sqlalchemy import update

from core.audit import Actor
from core.db.engine import SessionFactory
from core.db.models import ModelDownload, utcnow
from core.errors import NotFound
from core.model_files.planning import Plan
from core.model_files.types import DownloadView
from core.redact import redact_url
from core.servers import ServerRegistry

# Statuses of a download that has not ended.
UNFINISHED = ("pending", "downloading", "verifying")


def view_of(row: ModelDownload, server_name: str) -> DownloadView:
    return DownloadView(
        id=row.id, server_id=row.server_id, server_name=server_name, url=row.url,
        folder=row.folder, filename=row.filename, status=row.status,
        bytes_total=row.bytes_total, bytes_done=row.bytes_done or 0, sha256=row.sha256,
        error=row.error_message, requested_by=row.requested_by, channel_id=row.channel_id,
        message_id=row.message_id, completed_at=row.completed_at,
    )


class DownloadStore:
    """Inserts, updates and reads download rows; the running download's live view is kept
    by the download service, the row is its durable record."""

    def __init__(self, sessions: SessionFactory, registry: ServerRegistry) -> None:
        self._sessions = sessions
        self._registry = registry

    async def insert(self, actor: Actor, plan: Plan) -> DownloadView:
        """A "pending" row for the plan (its URL redacted)."""
        async with self._sessions.begin() as session:
            row = ModelDownload(
                server_id=plan.server.id, url=redact_url(plan.url), folder=plan.folder,
                filename=plan.filename, status="pending", bytes_total=plan.bytes_total,
                bytes_done=plan.partial_bytes, sha256=plan.sha256, requested_by=actor.user_id,
                channel_id=actor.channel_id,
            )
            session.add(row)
            await session.flush()
            view = view_of(row, plan.server.name)
        return replace(view, resumed_from=plan.partial_bytes)

    async def set_message(self, download_id: int, channel_id: int, message_id: int) -> None:
        async with self._sessions.begin() as session:
            await session.execute(
                update(ModelDownload).where(ModelDownload.id == download_id)
                .values(channel_id=channel_id, message_id=message_id)
            )

    async def save(self, view: DownloadView) -> None:
        """Status, progress and the end; the sha256 only once the file is complete."""
        values: dict[str, object] = {
            "status": view.status, "bytes_done": view.bytes_done, "bytes_total": view.bytes_total,
            "error_message": view.error, "completed_at": view.completed_at,
        }
        if view.status == "completed":
            values["sha256"] = view.sha256
        async with self._sessions.begin() as session:
            await session.execute(
                update(ModelDownload).where(ModelDownload.id == view.id).values(**values)
            )

    async def get(self, download_id: int) -> DownloadView:
        async with self._sessions() as session:
            row = await session.get(ModelDownload, download_id)
            if row is None:
                raise NotFound(f"There is no download #{download_id}.")
            server = await self._registry.get(row.server_id)
            return view_of(row, server.name)

    async def fail_unfinished(self, reason: str) -> int:
        """Mark every download that has not ended as failed; how many there were."""
        async with self._sessions.begin() as session:
            result = await session.execute(
                update(ModelDownload)
                .where(ModelDownload.status.in_(UNFINISHED))
                .values(status="failed", error_message=reason, completed_at=utcnow())
            )
        return int(result.rowcount or 0)  # type: ignore[attr-defined]
