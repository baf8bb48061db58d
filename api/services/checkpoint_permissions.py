"""Checkpoint permissions: grant, list and revoke another project's use of a fine-tune's checkpoint. Never commits.

Only the project that trained the checkpoint (its project keys) and admin keys manage its permissions. Any other
project, a grantee included, gets 404 for the checkpoint, as for a name that does not exist: a grantee uses a
checkpoint (jobs/checkpoints.py) but sees nothing of it here.
"""

from __future__ import annotations

from typing import Literal

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.deps import Caller
from jobs import checkpoints
from models.checkpoint_permission import CheckpointPermission
from models.errors import InvalidRequest, NotFound
from models.job import Checkpoint, Job
from models.project import Project

CHECKPOINT_PARAM = "fine_tuned_model_checkpoint"


def _managed(session: Session, caller: Caller, reference: str) -> tuple[Checkpoint, Job]:
    """The checkpoint, if the caller may manage its permissions: its owner's key or an admin key."""
    found = checkpoints.find(session, reference, caller.project.id if caller.project else None, shared=False)
    if found is None:
        raise NotFound("checkpoint", reference, param=CHECKPOINT_PARAM)
    return found


def _granted(session: Session, checkpoint_id: str, project_id: str) -> CheckpointPermission | None:
    return session.scalar(
        select(CheckpointPermission).where(
            CheckpointPermission.checkpoint_id == checkpoint_id, CheckpointPermission.project_id == project_id
        )
    )


def create(session: Session, caller: Caller, reference: str, project_ids: list[str]) -> list[CheckpointPermission]:
    """One permission per project, in the order asked; a project granted already keeps (and gets back) its own."""
    checkpoint, job = _managed(session, caller, reference)
    wanted = list(dict.fromkeys(project_ids))
    known = set(session.scalars(select(Project.id).where(Project.id.in_(wanted))))
    for index, project_id in enumerate(wanted):
        if project_id not in known:
            raise InvalidRequest(f"No project found with id {project_id!r}.", param=f"project_ids[{index}]")
        if project_id == job.project_id:
            raise InvalidRequest(
                f"Project {project_id} trained this checkpoint; it needs no permission.",
                param=f"project_ids[{index}]",
            )
    permissions = []
    for project_id in wanted:
        permission = _granted(session, checkpoint.id, project_id)
        if permission is None:
            permission = CheckpointPermission(
                checkpoint_id=checkpoint.id, owner_project_id=job.project_id, project_id=project_id
            )
            try:
                with session.begin_nested():
                    session.add(permission)
            except IntegrityError:  # granted at the same moment by another request: that grant is this one
                permission = _granted(session, checkpoint.id, project_id)
        permissions.append(permission)
    return permissions


def list_permissions(
    session: Session,
    caller: Caller,
    reference: str,
    after: str | None,
    limit: int,
    order: Literal["ascending", "descending"],
    project_id: str | None,
) -> tuple[list[CheckpointPermission], bool]:
    checkpoint, _ = _managed(session, caller, reference)
    stmt = select(CheckpointPermission).where(CheckpointPermission.checkpoint_id == checkpoint.id)
    if project_id is not None:
        stmt = stmt.where(CheckpointPermission.project_id == project_id)
    column = CheckpointPermission.id
    if after is not None:
        stmt = stmt.where(column > after if order == "ascending" else column < after)
    stmt = stmt.order_by(column.asc() if order == "ascending" else column.desc())
    rows = list(session.scalars(stmt.limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def delete(session: Session, caller: Caller, reference: str, permission_id: str) -> CheckpointPermission:
    """Revoke: the project can start no new job from the checkpoint. Jobs it created already keep running."""
    checkpoint, _ = _managed(session, caller, reference)
    permission = session.scalar(
        select(CheckpointPermission).where(
            CheckpointPermission.id == permission_id, CheckpointPermission.checkpoint_id == checkpoint.id
        )
    )
    if permission is None:
        raise NotFound("checkpoint permission", permission_id, param="permission_id")
    session.delete(permission)
    session.flush()
    return permission
