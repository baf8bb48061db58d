from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, BigInteger, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, UTCDateTime, utcnow
from models.ids import new_id
from models.job_kind import JobKind
from models.job_status import JobStatus


class Job(Base):
    """A unit of queued work. `kind` (a JobKind) says whose rules made it (jobs/<kind>.py) and which worker stage
    runs it."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_project_id_kind_id", "project_id", "kind", "id"),
        Index("ix_jobs_status_dispatched_at", "status", "dispatched_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ftjob"))
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(32), default=JobKind.fine_tune)
    # The Celery queue chosen at creation; every (re)publish of this job goes there.
    queue: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(100))
    training_file_id: Mapped[str | None] = mapped_column(String(40))
    validation_file_id: Mapped[str | None] = mapped_column(String(40))
    spec: Mapped[dict] = mapped_column(JSON)
    # Hyperparameters as requested ("auto" allowed), replaced by the numbers used once training starts.
    hyperparameters: Mapped[dict] = mapped_column(JSON, default=dict)
    suffix: Mapped[str | None] = mapped_column(String(64))
    user_metadata: Mapped[dict | None] = mapped_column(JSON)

    status: Mapped[JobStatus] = mapped_column(String(20), default=JobStatus.validating_files)
    """Written only by models.transitions.switch_job_status."""
    error: Mapped[dict | None] = mapped_column(JSON)

    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    # Dispatch and lease: who runs the job, until when, and when its message last went out.
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    attempts: Mapped[int] = mapped_column(Integer, default=0)

    # Progress, refreshed by the worker.
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger)
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int | None] = mapped_column(Integer)
    estimated_finish: Mapped[datetime | None] = mapped_column(UTCDateTime())

    result_files: Mapped[list] = mapped_column(JSON, default=list)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(200))
    # A kind-specific summary of what the job produced (metrics, a package manifest, ...).
    result: Mapped[dict | None] = mapped_column(JSON)
    # The job that spawned this one (a sweep's trials), if any.
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)


class JobEvent(Base):
    """Append-only log of a job. The integer id gives events a strict order for cursors and SSE."""

    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_id_id", "job_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    level: Mapped[str] = mapped_column(String(10), default="info")
    type: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict | None] = mapped_column(JSON)

    @property
    def public_id(self) -> str:
        return f"ftevent-{self.id}"


class Checkpoint(Base):
    """An adapter saved during training; `file_id` is its downloadable archive once published."""

    __tablename__ = "checkpoints"
    __table_args__ = (Index("ix_checkpoints_job_id_id", "job_id", "id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ftckpt"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    file_id: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
