"""checkpoint permissions: a fine-tune's checkpoint shared with other projects

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "checkpoint_permissions",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("checkpoint_id", sa.String(length=40), nullable=False),
        sa.Column("owner_project_id", sa.String(length=40), nullable=False),
        sa.Column("project_id", sa.String(length=40), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["checkpoint_id"],
            ["checkpoints.id"],
            name=op.f("fk_checkpoint_permissions_checkpoint_id_checkpoints"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["owner_project_id"],
            ["projects.id"],
            name=op.f("fk_checkpoint_permissions_owner_project_id_projects"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["projects.id"],
            name=op.f("fk_checkpoint_permissions_project_id_projects"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_checkpoint_permissions")),
        sa.UniqueConstraint("checkpoint_id", "project_id", name="uq_checkpoint_permissions_checkpoint_id_project_id"),
    )
    op.create_index(op.f("ix_checkpoint_permissions_owner_project_id"), "checkpoint_permissions", ["owner_project_id"])
    op.create_index(op.f("ix_checkpoint_permissions_project_id"), "checkpoint_permissions", ["project_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_checkpoint_permissions_project_id"), table_name="checkpoint_permissions")
    op.drop_index(op.f("ix_checkpoint_permissions_owner_project_id"), table_name="checkpoint_permissions")
    op.drop_table("checkpoint_permissions")
