"""admin keys: api_keys.scope, and project_id empty for admin keys

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCOPE_CHECK = "(scope = 'project' AND project_id IS NOT NULL) OR (scope = 'admin' AND project_id IS NULL)"


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("scope", sa.String(length=16), server_default="project", nullable=False))
        batch.alter_column("project_id", existing_type=sa.String(length=40), nullable=True)
        batch.create_check_constraint(op.f("ck_api_keys_scope_project"), SCOPE_CHECK)


def downgrade() -> None:
    # Admin keys have no project to fall back to: they go.
    op.execute("DELETE FROM api_keys WHERE scope = 'admin'")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_constraint(op.f("ck_api_keys_scope_project"), type_="check")
        batch.alter_column("project_id", existing_type=sa.String(length=40), nullable=False)
        batch.drop_column("scope")
