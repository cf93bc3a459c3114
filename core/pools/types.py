"""What the pool commands show: read-only snapshots of a pool and its members."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from core.pools.models import ServerPool
from core.servers.registry import ServerView


@dataclass(frozen=True, slots=True)
class PoolView:
    id: int
    name: str
    gpu: str
    max_price: float | None
    image: str | None
    disk_gb: int | None
    profile: str | None
    models: tuple[str, ...]
    min_servers: int
    max_servers: int
    target_wait: int
    idle_timeout: int
    cooldown: int
    channel_id: int | None

    @classmethod
    def of(cls, row: ServerPool) -> PoolView:
        return cls(
            id=row.id, name=row.name, gpu=row.gpu, max_price=row.max_price, image=row.image,
            disk_gb=row.disk_gb, profile=row.profile, models=tuple(row.models or ()),
            min_servers=row.min_servers, max_servers=row.max_servers,
            target_wait=row.target_wait, idle_timeout=row.idle_timeout,
            cooldown=row.cooldown, channel_id=row.channel_id,
        )


@dataclass(frozen=True, slots=True)
class DecisionView:
    id: int
    action: str
    server_name: str | None
    reason: str
    state: str
    created_at: dt.datetime


@dataclass(frozen=True, slots=True)
class PoolStatus:
    pool: PoolView
    servers: tuple[ServerView, ...]
    queued: int
    job_seconds: float
    expected_wait: float
    decisions: tuple[DecisionView, ...] = field(default=())
