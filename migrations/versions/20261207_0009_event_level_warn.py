"""job_events.level: OpenAI's enum (info, warn, error); events written before said `warning`

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("UPDATE job_events SET level = 'warn' WHERE level = 'warning'")


def downgrade() -> None:
    op.execute("UPDATE job_events SET level = 'warning' WHERE level = 'warn'")
