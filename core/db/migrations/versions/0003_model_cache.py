"""model_pins: model files the per-server cache must never evict

Revision ID: 0003_model_cache
Revises: 0002_comfy_install
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_model_cache"
down_revision = "0002_comfy_install"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model_pins",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("server_id", sa.Integer(), nullable=False),
        sa.Column("folder", sa.String(length=64), nullable=False),
        sa.Column("filename", sa.String(length=255), nullable=False),
        sa.Column("pinned_by", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["server_id"], ["servers.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("server_id", "folder", "filename", name="uq_model_pin"),
    )


def downgrade() -> None:
    op.drop_table("model_pins")
