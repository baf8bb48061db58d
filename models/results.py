"""Registering worker outputs as downloadable files of the job's project."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.orm import Session

from models.file import File
from models.ids import new_id
from models.storage import StagedBlob, delete_on_rollback, get_storage

RESULTS_PURPOSE = "fine-tune-results"


def publish_file(
    session: Session,
    project_id: str,
    source: Path,
    filename: str,
    purpose: str = RESULTS_PURPOSE,
    job_id: str | None = None,
) -> File:
    """Copy `source` into the store and add its row. If the transaction rolls back, the copy goes too."""
    storage = get_storage()
    staged = storage.stage_file(source)
    file = File(
        id=new_id("file"),
        project_id=project_id,
        filename=filename,
        purpose=purpose,
        bytes=staged.bytes,
        sha256=staged.sha256,
        job_id=job_id,
    )
    return add_stored_file(session, staged, file)


def add_stored_file(session: Session, staged: StagedBlob, file: File) -> File:
    """Move a staged copy to its key in the store and add the file's row; if the transaction rolls back, the
    stored copy goes too. A staged copy that cannot be stored is discarded."""
    storage = get_storage()
    file.storage_key = storage.key_for(file.project_id, file.id)
    try:
        storage.commit(staged, file.storage_key)
    except BaseException:
        storage.discard(staged)
        raise
    delete_on_rollback(session, file.storage_key)
    session.add(file)
    session.flush()
    return file
