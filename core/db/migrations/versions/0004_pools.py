"""server pools: templates and limits, members, scaling decisions

Revision ID: 0004_pools
Revises: 0003_model_cache
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_pools"
down_revision = "0003_model_cache"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "server_pools",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(length=24), nullable=False, unique=True),
        sa.Column("gpu", sa.String(length=64), nullable=False),
        sa.Column("max_price", sa.Float(), nullable=True),
        sa.Column("image", sa.String(length=255), nullable=True),
        sa.Column("disk_gb", sa.Integer(), nullable=True),
        sa.Column("profile", sa.String(length=64), nullable=True),
        sa.Column("models", sa.JSON(), nullable=False),
        sa.Column("min_servers", sa.Integer(), nullable=False),
        sa.Column("max_servers", sa.Integer(), nullable=False),
        sa.Column("target_wait", sa.Integer(), nullable=False),
        sa.Column("idle_timeout", sa.Integer(), nullable=False),
        sa.Column("cooldown", sa.Integer(), nullable=False),
        sa.Column("channel_id", sa.BigInteger(), nullable=True),
        sa.Column("created_by", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "pool_members",
        sa.Column("server_id", sa.Integer(),
                  sa.ForeignKey("servers.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("pool_id", sa.Integer(),
                  sa.ForeignKey("server_pools.id", ondelete="CASCADE"), nullable=False),
        sa.Column("added_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "pool_decisions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("pool_id", sa.Integer(),
                  sa.ForeignKey("server_pools.id", ondelete="CASCADE"), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("server_name", sa.String(length=64), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_pool_decisions_pool", "pool_decisions", ["pool_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_pool_decisions_pool", table_name="pool_decisions")
    op.drop_table("pool_decisions")
    op.drop_table("pool_members")
    op.drop_table("server_pools")
