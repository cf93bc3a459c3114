"""Counts shown by /about and the doctor: servers known, jobs waiting and running."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select

from core.db.engine import SessionFactory
from core.db.models import ComfyGeneration, GenerationStatus, Server, ServerStatus

ACTIVE_JOB_STATES = (
    GenerationStatus.PENDING.value,
    GenerationStatus.QUEUED.value,
    GenerationStatus.RUNNING.value,
    GenerationStatus.UPLOADING.value,
)


@dataclass(frozen=True, slots=True)
class Overview:
    servers_total: int
    servers_running: int
    jobs_waiting: int
    jobs_running: int

    @property
    def queue_length(self) -> int:
        return self.jobs_waiting + self.jobs_running


async def overview(session_factory: SessionFactory) -> Overview:
    async with session_factory() as session:
        server_rows = (
            await session.execute(
                select(Server.status, func.count())
                .where(Server.status != ServerStatus.DESTROYED.value)
                .group_by(Server.status)
            )
        ).all()
        job_rows = (
            await session.execute(
                select(ComfyGeneration.status, func.count())
                .where(ComfyGeneration.status.in_(ACTIVE_JOB_STATES))
                .group_by(ComfyGeneration.status)
            )
        ).all()
    servers = {status: count for status, count in server_rows}
    jobs = {status: count for status, count in job_rows}
    return Overview(
        servers_total=sum(servers.values()),
        servers_running=servers.get(ServerStatus.RUNNING.value, 0),
        jobs_waiting=jobs.get("pending", 0) + jobs.get("queued", 0),
        jobs_running=jobs.get("running", 0) + jobs.get("uploading", 0),
    )
