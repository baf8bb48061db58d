from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, UTCDateTime, utcnow


class IdempotencyKey(Base):
    """A client's `Idempotency-Key` and the object its first request created.

    Inserted in the same transaction as that object, before it is created: a concurrent retry waits
    on the unique index, then finds the winner's row and gets the same object back.
    """

    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("project_id", "key", name="uq_idempotency_keys_project_id_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(255))
    # sha256 of what was asked (method, path, body): the same key with another request is refused.
    fingerprint: Mapped[str] = mapped_column(String(64))
    resource_type: Mapped[str] = mapped_column(String(32))
    resource_id: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
