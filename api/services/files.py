"""Files: datasets uploaded by users and results published by workers."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.services import idempotency
from api.services.pagination import ListOrder, page
from api.upload_form import UploadForm
from models.config import get_settings
from models.datasets import DatasetSummary, validate_jsonl
from models.errors import Conflict, InvalidRequest, NotFound
from models.file import File
from models.ids import new_id
from models.job import Job
from models.job_status import TERMINAL
from models.project import Project
from models.results import add_stored_file
from models.storage import StagedBlob, delete_after_commit, get_storage

UPLOAD_PURPOSES = {"fine-tune"}


def clean_filename(name: str | None) -> str:
    # A display name only, never a path (the content's key is the server's): the last path component, without
    # control characters, and never "." or "..".
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(c for c in base if c.isprintable()).strip()
    return (base if base not in ("", ".", "..") else "upload.jsonl")[:255]


def check_purpose(purpose: str) -> None:
    if purpose not in UPLOAD_PURPOSES:
        raise InvalidRequest(f"purpose must be one of: {', '.join(sorted(UPLOAD_PURPOSES))}.", param="purpose")


# The upload's form fields besides the file, each checked as soon as it has arrived (api/upload_form.py).
UPLOAD_FIELDS = {"purpose": check_purpose}


def validated_file(project: Project, staged: StagedBlob, filename: str, purpose: str) -> File:
    """The File row of a staged dataset, once it has passed validation (line-numbered 400s otherwise); shared
    by the single upload here and a completed multi-part upload (api/services/uploads.py)."""
    summary: DatasetSummary = validate_jsonl(staged.temp_path, get_settings().min_examples)
    return File(
        id=new_id("file"),
        project_id=project.id,
        filename=filename,
        purpose=purpose,
        bytes=staged.bytes,
        sha256=staged.sha256,
        data_format=summary.format,
        n_examples=summary.n_examples,
        fields=summary.fields,
    )


def upload(session: Session, project: Project, form: UploadForm, idempotency_key: str | None = None) -> File:
    """Stage the form's file as it arrives, then validate and store it. The session is first used once the
    body is in: a slow client never holds a database connection."""
    settings = get_settings()
    storage = get_storage()
    staged = storage.stage_chunks(form.file_chunks(), max_bytes=settings.max_upload_bytes)
    try:
        purpose = form.finish()["purpose"]
        name = clean_filename(form.filename)
        claim = idempotency.begin(
            session, project, idempotency_key, idempotency.fingerprint("files", purpose, name, staged.sha256), "file"
        )
        if claim.existing_id is not None:
            storage.discard(staged)
            return get(session, project, claim.existing_id)
        file = validated_file(project, staged, name, purpose)
    except BaseException:
        storage.discard(staged)
        raise
    # If the request's transaction does not commit, the stored copy goes with it.
    add_stored_file(session, staged, file)
    claim.complete(file.id)
    return file


def get(session: Session, project: Project, file_id: str) -> File:
    file = session.scalar(select(File).where(File.id == file_id, File.project_id == project.id))
    if file is None:
        raise NotFound("file", file_id, param="file_id")
    return file


def list_files(
    session: Session,
    project: Project,
    after: str | None,
    limit: int,
    purpose: str | None,
    order: ListOrder = "desc",
) -> tuple[list[File], bool]:
    """The project's files by creation time (ids are time-ordered), newest first unless `order` is asc; `after`
    continues the list in the same order."""
    stmt = select(File).where(File.project_id == project.id)
    if purpose:
        stmt = stmt.where(File.purpose == purpose)
    return page(session, stmt, File.id, after, limit, order)


def delete(session: Session, project: Project, file_id: str) -> None:
    file = get(session, project, file_id)
    active = session.scalar(
        select(Job.id)
        .where(
            Job.project_id == project.id,
            (Job.training_file_id == file.id) | (Job.validation_file_id == file.id),
            Job.status.not_in(sorted(TERMINAL)),
        )
        .limit(1)
    )
    if active is not None:
        raise Conflict(f"File {file.id} is used by job {active}, which has not finished.", param="file_id")
    session.delete(file)
    session.flush()
    # The row goes first; if the commit fails the content is still there. A crash after the commit
    # leaves an orphan object, never a listed file without content.
    delete_after_commit(session, file.storage_key)
