from __future__ import annotations

import hashlib
import secrets
from datetime import datetime

from sqlalchemy import CheckConstraint, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, UTCDateTime, utcnow
from models.ids import new_id

KEY_PREFIX = "grove-"
# A project key reaches its project's resources and nothing else; an admin key manages keys and nothing else.
PROJECT_SCOPE = "project"
ADMIN_SCOPE = "admin"
SCOPES = (PROJECT_SCOPE, ADMIN_SCOPE)


class Project(Base):
    """A tenant. Every file, job and artifact belongs to exactly one project."""

    __tablename__ = "projects"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("proj"))
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ApiKey(Base):
    """Only the sha256 of a key is stored; the key itself is shown once, at creation.

    A key is found by that hash (an index lookup), so a presented key is never compared with a stored secret
    character by character. `scope` is `project` (bound to one project) or `admin` (no project).
    """

    __tablename__ = "api_keys"
    __table_args__ = (
        CheckConstraint(
            f"(scope = '{PROJECT_SCOPE}' AND project_id IS NOT NULL) "
            f"OR (scope = '{ADMIN_SCOPE}' AND project_id IS NULL)",
            name="scope_project",
        ),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("key"))
    project_id: Mapped[str | None] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    scope: Mapped[str] = mapped_column(String(16), default=PROJECT_SCOPE, server_default=PROJECT_SCOPE)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # The first characters, so an operator can tell keys apart in a listing.
    hint: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)
