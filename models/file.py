from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, BigInteger, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, UTCDateTime, utcnow
from models.ids import new_id


class File(Base):
    """An uploaded dataset or a published result (adapter archive, metrics CSV).

    The bytes live in the storage directory under `storage_key`, which the server chooses; no request
    ever names a path. A row exists only once its content is complete and renamed into place.
    """

    __tablename__ = "files"
    __table_args__ = (Index("ix_files_project_id_id", "project_id", "id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("file"))
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(255))
    # For datasets: chat | prompt_completion | fields, how many examples, and the keys every line has.
    data_format: Mapped[str | None] = mapped_column(String(32))
    n_examples: Mapped[int | None] = mapped_column(Integer)
    fields: Mapped[list | None] = mapped_column(JSON)
    # The job whose result this file is; None for uploads.
    job_id: Mapped[str | None] = mapped_column(String(40), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
