"""Checkpoint permissions: a fine-tune's checkpoint shared with another project, which may then start a
fine-tune from it, evaluate it and export it (jobs/checkpoints.py resolves every such use)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, UTCDateTime, utcnow
from models.ids import new_id


class CheckpointPermission(Base):
    """One grant: `project_id` may use `checkpoint_id`, which `owner_project_id` trained.

    The owner is kept on the row so that the owner's listing never joins through the job, and a grant ends with
    either project (cascade). A grant gives use only: the grantee sees none of the owner's job, files or events.
    """

    __tablename__ = "checkpoint_permissions"
    __table_args__ = (
        UniqueConstraint("checkpoint_id", "project_id", name="uq_checkpoint_permissions_checkpoint_id_project_id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("cp"))
    checkpoint_id: Mapped[str] = mapped_column(ForeignKey("checkpoints.id", ondelete="CASCADE"))
    owner_project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
