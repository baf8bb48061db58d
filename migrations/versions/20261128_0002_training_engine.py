"""training engine: no schema change.

The engine's new state lives outside the database: resumable checkpoints (weights, optimizer, RNG, data
position) under GROVE_WORK_DIR/<job id>, tokenized files under GROVE_WORK_DIR/token-cache. Published
checkpoints use the existing `checkpoints` table (metrics JSON carries full_valid_loss and is_best), and the
job's summary the existing `jobs.result` column. The revision stays in the chain as reserved.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from collections.abc import Sequence

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
