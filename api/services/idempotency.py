"""`Idempotency-Key` on creating requests: a retried create returns the same object, never a second one.

The key's row goes in before the object is created, in the same transaction. A concurrent request
with the same key blocks on the unique index until the first commits, then replays its object; if the
first rolls back, the second proceeds as the first.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from models.errors import GroveError, InvalidRequest
from models.idempotency import IdempotencyKey
from models.project import Project

HEADER = "Idempotency-Key"


class IdempotencyKeyReused(GroveError):
    status_code = 422
    type = "invalid_request_error"
    code = "idempotency_key_reused"


def fingerprint(*parts: str | bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


@dataclass
class Claim:
    row: IdempotencyKey | None
    existing_id: str | None = None

    def complete(self, resource_id: str) -> None:
        if self.row is not None:
            self.row.resource_id = resource_id


def _check(row: IdempotencyKey, print_: str, resource_type: str) -> str:
    if row.fingerprint != print_ or row.resource_type != resource_type:
        raise IdempotencyKeyReused(f"{HEADER} {row.key!r} was already used for a different request.", param=HEADER)
    return row.resource_id


def begin(session: Session, project: Project, key: str | None, print_: str, resource_type: str) -> Claim:
    """Claim `key` for this request, or return the id of the object a previous request made with it."""
    if key is None:
        return Claim(row=None)
    if not 1 <= len(key) <= 255:
        raise InvalidRequest(f"{HEADER} must be 1 to 255 characters.", param=HEADER)
    query = select(IdempotencyKey).where(IdempotencyKey.project_id == project.id, IdempotencyKey.key == key)
    found = session.scalar(query)
    if found is not None:
        return Claim(row=None, existing_id=_check(found, print_, resource_type))
    row = IdempotencyKey(project_id=project.id, key=key, fingerprint=print_, resource_type=resource_type)
    try:
        with session.begin_nested():
            session.add(row)
            session.flush()
    except IntegrityError:
        # Another request with this key committed first (we waited on its row): replay it.
        found = session.scalar(query.execution_options(populate_existing=True))
        return Claim(row=None, existing_id=_check(found, print_, resource_type))
    return Claim(row=row)


def create_once(session: Session, project: Project, key: str | None, print_: str, resource_type: str, create, fetch):
    """Run `create()` once per key; a retry gets `fetch(id)` of what the first request made."""
    claim = begin(session, project, key, print_, resource_type)
    if claim.existing_id is not None:
        return fetch(claim.existing_id)
    created = create()
    claim.complete(created.id)
    return created
