"""Multipart uploads (OpenAI's Uploads API): a file sent in parts, assembled into a File when completed.

An upload is `pending` while it takes parts, then `completed` (its `file_id` set), `cancelled` or `expired`
(past `expires_at`, swept by the reconciler). Its parts are stored objects of their own until the upload ends:
then their rows and their bytes go, whatever the ending, so that only the completed File is left.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import BigInteger, ForeignKey, Index, String, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from models.base import Base, UTCDateTime, utcnow
from models.storage import delete_after_commit

# How many expired uploads one reconciler pass ends; the next pass takes the rest.
EXPIRE_BATCH = 500


class UploadStatus(StrEnum):
    pending = "pending"
    completed = "completed"
    cancelled = "cancelled"
    expired = "expired"


class Upload(Base):
    """A file on its way in, part by part. Its parts' bytes live in the store until it ends."""

    __tablename__ = "uploads"
    __table_args__ = (
        Index("ix_uploads_project_id_id", "project_id", "id"),
        Index("ix_uploads_status_expires_at", "status", "expires_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    # What the client declared: the completed file must be exactly this long.
    bytes: Mapped[int] = mapped_column(BigInteger)
    mime_type: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16), default=UploadStatus.pending)
    # The File made when the upload completed; it outlives the upload's parts (and may be deleted on its own).
    file_id: Mapped[str | None] = mapped_column(ForeignKey("files.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())


class UploadPart(Base):
    """One part's bytes, stored under `storage_key` until its upload ends."""

    __tablename__ = "upload_parts"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    upload_id: Mapped[str] = mapped_column(ForeignKey("uploads.id", ondelete="CASCADE"), index=True)
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


def part_key(project_id: str, upload_id: str, part_id: str) -> str:
    """Where a part's bytes are stored: beside the project's files, in a folder of their upload."""
    return f"objects/{project_id}/{upload_id}/{part_id}"


def drop_parts(session: Session, upload: Upload) -> int:
    """Delete the upload's part rows, and their bytes once the transaction has committed (if it does not, the
    parts stay, rows and bytes). Returns how many went."""
    parts = list(session.scalars(select(UploadPart).where(UploadPart.upload_id == upload.id)))
    for part in parts:
        session.delete(part)
        delete_after_commit(session, part.storage_key)
    session.flush()
    return len(parts)


def expire_uploads(session: Session) -> int:
    """End the pending uploads past their `expires_at`: status `expired`, parts deleted. Returns how many."""
    due = session.scalars(
        select(Upload)
        .where(Upload.status == UploadStatus.pending, Upload.expires_at < utcnow())
        .order_by(Upload.expires_at)
        .limit(EXPIRE_BATCH)
        # An upload being completed or cancelled holds its row: leave it to that request.
        .with_for_update(skip_locked=True)
    ).all()
    for upload in due:
        upload.status = UploadStatus.expired
        drop_parts(session, upload)
    return len(due)
