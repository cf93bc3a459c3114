"""servers: where ComfyUI lives, the image's setup profile, whether setup succeeded

Revision ID: 0002_comfy_install
Revises: 0001
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_comfy_install"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("servers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("comfy_path", sa.String(length=512), nullable=True))
        batch_op.add_column(sa.Column("setup_profile", sa.String(length=64), nullable=True))
        batch_op.add_column(
            sa.Column("comfy_installed", sa.Boolean(), nullable=False,
                      server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("servers", schema=None) as batch_op:
        batch_op.drop_column("comfy_installed")
        batch_op.drop_column("setup_profile")
        batch_op.drop_column("comfy_path")
