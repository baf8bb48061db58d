"""Projects and API keys: used by the admin routes (/v1/admin/keys), the admin CLI and the bootstrap. Never commits.

Only a key's sha256 is stored (models/project.py); the key itself is returned once, by `issue`.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.services.pagination import page
from models.base import utcnow
from models.errors import InvalidRequest, NotFound
from models.project import ADMIN_SCOPE, PROJECT_SCOPE, ApiKey, Project, generate_key, hash_key


def get_or_create_project(session: Session, name: str) -> Project:
    project = session.scalar(select(Project).where(Project.name == name))
    if project is None:
        project = Project(name=name)
        session.add(project)
        session.flush()
    return project


def issue(session: Session, project: Project | None) -> tuple[ApiKey, str]:
    """A new key: scoped to `project`, or an admin key when `project` is None. Returns the row and the key."""
    key = generate_key()
    row = ApiKey(
        project_id=project.id if project else None,
        scope=PROJECT_SCOPE if project else ADMIN_SCOPE,
        key_hash=hash_key(key),
        hint=key[:10],
    )
    session.add(row)
    session.flush()
    return row, key


def create_key(session: Session, project: Project) -> str:
    """Store a project key's hash and return the key itself, which is never retrievable again."""
    return issue(session, project)[1]


def create_admin_key(session: Session) -> str:
    """An admin key: it manages keys over HTTP and reaches no project's resources."""
    return issue(session, None)[1]


def create(session: Session, scope: str, project_name: str | None) -> tuple[ApiKey, Project | None, str]:
    if scope == ADMIN_SCOPE:
        if project_name is not None:
            raise InvalidRequest("An admin key belongs to no project; leave out project.", param="project")
        row, key = issue(session, None)
        return row, None, key
    if not project_name:
        raise InvalidRequest("A project key needs the name of its project (created if new).", param="project")
    project = get_or_create_project(session, project_name)
    row, key = issue(session, project)
    return row, project, key


def get(session: Session, key_id: str) -> tuple[ApiKey, Project | None]:
    found = session.execute(
        select(ApiKey, Project).outerjoin(Project, Project.id == ApiKey.project_id).where(ApiKey.id == key_id)
    ).first()
    if found is None:
        raise NotFound("API key", key_id, param="key_id")
    return found[0], found[1]


def list_keys(
    session: Session, after: str | None, limit: int, project_name: str | None = None, scope: str | None = None
) -> tuple[list[tuple[ApiKey, Project | None]], bool]:
    stmt = select(ApiKey)
    if project_name is not None:
        stmt = stmt.join(Project, Project.id == ApiKey.project_id).where(Project.name == project_name)
    if scope is not None:
        stmt = stmt.where(ApiKey.scope == scope)
    rows, has_more = page(session, stmt, ApiKey.id, after, limit)
    projects = {p.id: p for p in session.scalars(select(Project).where(Project.id.in_({r.project_id for r in rows})))}
    return [(r, projects.get(r.project_id)) for r in rows], has_more


def revoke(session: Session, key_id: str) -> tuple[ApiKey, Project | None]:
    """Revoke a key: from the next request on it gets 401. Revoking a revoked key changes nothing."""
    row, project = get(session, key_id)
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.flush()
    return row, project
