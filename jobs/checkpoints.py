"""Which fine-tuning checkpoint a request names, and whether the caller may use it: its own, or one shared with
its project (models/checkpoint_permission.py). Every use of a checkpoint (from_checkpoint, evaluation targets,
export adapters) and the permission routes resolve through here.

A checkpoint is named by its id (`ftckpt-...`) or by the `fine_tuned_model_checkpoint` Grove shows for it,
`{model}:ckpt-step-{step}:{job_id}`. A checkpoint the caller may not use is not found: the same answer as a name
that does not exist.
"""

from __future__ import annotations

from sqlalchemy import Select, exists, or_, select
from sqlalchemy.orm import Session

from models.checkpoint_permission import CheckpointPermission
from models.job import Checkpoint, Job
from models.job_kind import JobKind

STEP_PREFIX = "ckpt-step-"


def checkpoint_name(job: Job, checkpoint: Checkpoint) -> str:
    """The `fine_tuned_model_checkpoint` of a checkpoint, as the API shows it and takes it back."""
    return f"{job.model}:{STEP_PREFIX}{checkpoint.step}:{job.id}"


def _named(reference: str | int, job_id: str | None) -> Select | None:
    """The checkpoint (and its fine-tuning job) that `reference` names, or None when it cannot name one.

    An int is a step of `job_id`; a string is an id or a `fine_tuned_model_checkpoint` name."""
    stmt = (
        select(Checkpoint, Job)
        .join(Job, Job.id == Checkpoint.job_id)
        .where(Job.kind == JobKind.fine_tune)
        .order_by(Checkpoint.id.desc())  # a step saved twice (a resumed run): the later save
    )
    if isinstance(reference, int):
        return None if job_id is None else stmt.where(Checkpoint.step == reference)
    if reference.startswith("ftckpt-"):
        stmt = stmt.where(Checkpoint.id == reference)
    else:
        parts = reference.rsplit(":", 2)
        if len(parts) != 3 or not parts[1].startswith(STEP_PREFIX):
            return None
        model, step, named_job = parts
        number = step.removeprefix(STEP_PREFIX)
        if not number.isdecimal() or len(number) > 9:
            return None
        stmt = stmt.where(Job.id == named_job, Job.model == model, Checkpoint.step == int(number))
    return stmt if job_id is None else stmt.where(Checkpoint.job_id == job_id)


def find(
    session: Session, reference: str | int, project_id: str | None, *, job_id: str | None = None, shared: bool = True
) -> tuple[Checkpoint, Job] | None:
    """The checkpoint `reference` names, if `project_id` trained it or (with `shared`) was granted it.

    `project_id` None (an admin key) reaches every project's checkpoints. `job_id` narrows the search to one
    fine-tuning job (then `reference` may be a step number)."""
    stmt = _named(reference, job_id)
    if stmt is None:
        return None
    if project_id is not None:
        granted = exists().where(
            CheckpointPermission.checkpoint_id == Checkpoint.id, CheckpointPermission.project_id == project_id
        )
        stmt = stmt.where(or_(Job.project_id == project_id, granted) if shared else Job.project_id == project_id)
    found = session.execute(stmt.limit(1)).first()
    return (found[0], found[1]) if found is not None else None
