"""Tables of server pools: the template and limits, the members, the scaling decisions.

They live beside the other tables on the same declarative ``Base`` (migration 0004_pools).
A decision row is written before the action it names, so a restarted bot finds what a
dead process had started and never acts twice on it.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, BigInteger, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from core.db.models import Base, UTCDateTime, utcnow

# Decision states: written "planned" before acting, then "done", "failed" (the action
# raised), "refused" (budget, no offer) or "abandoned" (a dead process never began it).
PLANNED = "planned"
DONE = "done"
FAILED = "failed"
REFUSED = "refused"
ABANDONED = "abandoned"


class ServerPool(Base):
    __tablename__ = "server_pools"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(24), unique=True)
    # The template: offer constraints, image, disk, setup profile, models to download.
    gpu: Mapped[str] = mapped_column(String(64))
    max_price: Mapped[float | None] = mapped_column(Float)
    image: Mapped[str | None] = mapped_column(String(255))
    disk_gb: Mapped[int | None] = mapped_column(Integer)
    profile: Mapped[str | None] = mapped_column(String(64))
    models: Mapped[list[Any]] = mapped_column(JSON, default=list)
    # The limits: servers kept at least and at most, the queue wait to stay under
    # (seconds), the members' idle autostop (minutes) and the pause between scalings.
    min_servers: Mapped[int] = mapped_column(Integer, default=0)
    max_servers: Mapped[int] = mapped_column(Integer, default=2)
    target_wait: Mapped[int] = mapped_column(Integer, default=60)
    idle_timeout: Mapped[int] = mapped_column(Integer, default=15)
    cooldown: Mapped[int] = mapped_column(Integer, default=300)
    channel_id: Mapped[int | None] = mapped_column(BigInteger)
    created_by: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class PoolMember(Base):
    __tablename__ = "pool_members"

    server_id: Mapped[int] = mapped_column(
        ForeignKey("servers.id", ondelete="CASCADE"), primary_key=True
    )
    pool_id: Mapped[int] = mapped_column(ForeignKey("server_pools.id", ondelete="CASCADE"))
    added_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class PoolDecision(Base):
    __tablename__ = "pool_decisions"
    __table_args__ = (Index("ix_pool_decisions_pool", "pool_id", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pool_id: Mapped[int] = mapped_column(ForeignKey("server_pools.id", ondelete="CASCADE"))
    action: Mapped[str] = mapped_column(String(16))  # "start" or "rent"
    server_name: Mapped[str | None] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), default=PLANNED)
    detail: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
