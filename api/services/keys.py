"""Projects and API keys. Used by the admin CLI and the embedded bootstrap."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.project import ApiKey, Project, generate_key, hash_key


def get_or_create_project(session: Session, name: str) -> Project:
    project = session.scalar(select(Project).where(Project.name == name))
    if project is None:
        project = Project(name=name)
        session.add(project)
        session.flush()
    return project


def create_key(session: Session, project: Project) -> str:
    """Store the key's hash and return the key itself, which is never retrievable again."""
    key = generate_key()
    session.add(ApiKey(project_id=project.id, key_hash=hash_key(key), hint=key[:10]))
    session.flush()
    return key


def is_active(session: Session, key: str) -> bool:
    return (
        session.scalar(select(ApiKey.id).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None)))
        is not None
    )
