"""Multipart uploads (OpenAI's Uploads API): create, add parts, complete into a File, cancel.

Parts are stored as objects of their own as they arrive, each held to GROVE_MAX_UPLOAD_PART_BYTES and, with the
parts before it, to the upload's declared `bytes`, counted as the bytes arrive (api/upload_form.py).

Completing writes in this order, so that a crash anywhere leaves either the pending upload with all its parts
(the client completes again) or the completed upload with its file, never a half file:
1. the upload's row is locked, the parts checked (theirs, each once, adding up to `bytes`);
2. the parts are copied, in the order given, into one staged temp file (not visible under any key), hashed;
3. the staged file is validated as `POST /v1/files` validates (line-numbered 400s) and stored under its key;
4. one transaction adds the File row, marks the upload completed and deletes the part rows; only once it has
   committed are the parts' bytes deleted. Before that commit the stored file is an object no row names (and is
   removed if the transaction rolls back); after it a failed delete of a part's bytes leaves an orphan object,
   never a listed file without its content.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from datetime import timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.schemas.uploads import CompleteUpload, CreateUpload
from api.services import idempotency
from api.services.files import check_purpose, clean_filename, validated_file
from api.upload_form import UploadForm
from models.base import utcnow
from models.config import get_settings
from models.errors import Conflict, InvalidRequest, NotFound, PayloadTooLarge
from models.file import File
from models.ids import new_id
from models.project import Project
from models.results import add_stored_file
from models.storage import CHUNK, StagedBlob, delete_on_rollback, get_storage
from models.upload import Upload, UploadPart, UploadStatus, drop_parts, part_key

PART_FIELD = "data"


def create(session: Session, project: Project, body: CreateUpload) -> Upload:
    settings = get_settings()
    check_purpose(body.purpose)
    if body.bytes > settings.max_multipart_upload_bytes:
        raise InvalidRequest(
            f"bytes: {body.bytes} is over the largest upload, {settings.max_multipart_upload_bytes} bytes "
            "(GROVE_MAX_MULTIPART_UPLOAD_BYTES).",
            param="bytes",
        )
    if body.expires_after is not None:
        raise InvalidRequest(
            "expires_after: Grove keeps files until they are deleted (DELETE /v1/files/{file_id}); "
            "an expiry policy is not supported.",
            param="expires_after",
        )
    now = utcnow()
    upload = Upload(
        id=new_id("upload"),
        project_id=project.id,
        filename=clean_filename(body.filename),
        purpose=body.purpose,
        bytes=body.bytes,
        mime_type=body.mime_type,
        status=UploadStatus.pending,
        created_at=now,
        expires_at=now + timedelta(seconds=settings.upload_expiry_seconds),
    )
    session.add(upload)
    session.flush()
    return upload


def get(session: Session, project: Project, upload_id: str, lock: bool = False) -> Upload:
    stmt = select(Upload).where(Upload.id == upload_id, Upload.project_id == project.id)
    if lock:
        # Completing, cancelling, adding a part and the expiry sweep take the row in turn.
        stmt = stmt.with_for_update().execution_options(populate_existing=True)
    upload = session.scalar(stmt)
    if upload is None:
        raise NotFound("upload", upload_id, param="upload_id")
    return upload


def file_of(session: Session, upload: Upload) -> File | None:
    return session.get(File, upload.file_id) if upload.file_id else None


def _check_pending(upload: Upload, doing: str) -> None:
    status = upload.status
    if status == UploadStatus.pending and upload.expires_at <= utcnow():
        status = UploadStatus.expired  # not swept yet, but over all the same
    if status != UploadStatus.pending:
        raise Conflict(f"Upload {upload.id} is {status}: it cannot {doing}.", param="upload_id")


def _received(session: Session, upload: Upload) -> int:
    return session.scalar(select(func.coalesce(func.sum(UploadPart.bytes), 0)).where(UploadPart.upload_id == upload.id))


def part_form(session: Session, project: Project, upload_id: str, request) -> UploadForm:
    """The part's form, held to the smaller of the part limit and what the upload still lacks. Checked before a
    byte of the body is read: an unknown, ended or full upload is answered at once. A part sent with an
    Idempotency-Key may be the retry of one already counted: it is held to the part limit alone here, and to the
    declared bytes once it is known not to be a retry (`add_part`)."""
    settings = get_settings()
    upload = get(session, project, upload_id)
    _check_pending(upload, "take more parts")
    room = upload.bytes - _received(session, upload)
    if request.headers.get(idempotency.HEADER) is not None:
        room = upload.bytes
    if room <= 0:
        raise InvalidRequest(
            f"Upload {upload.id} already holds its declared {upload.bytes} bytes: complete it.", param=PART_FIELD
        )
    if room < settings.max_upload_part_bytes:
        limit, name = room, f"what the upload's declared bytes ({upload.bytes}) leave"
    else:
        limit, name = settings.max_upload_part_bytes, "GROVE_MAX_UPLOAD_PART_BYTES"
    return UploadForm(request, fields={}, file_field=PART_FIELD, limit=limit, limit_name=name)


def add_part(
    session: Session, project: Project, upload_id: str, form: UploadForm, idempotency_key: str | None = None
) -> UploadPart:
    """Stage the part as it arrives, then store it, the upload's row locked. The session is first used once the
    body is in."""
    storage = get_storage()
    staged = storage.stage_chunks(form.file_chunks())
    try:
        form.finish()
        if staged.bytes == 0:
            raise InvalidRequest(f"{PART_FIELD}: the part is empty.", param=PART_FIELD)
        print_ = idempotency.fingerprint("uploads.parts", upload_id, staged.sha256)
        claim = idempotency.begin(session, project, idempotency_key, print_, "upload.part")
        if claim.existing_id is not None:
            storage.discard(staged)
            return _get_part(session, upload_id, claim.existing_id)
        upload = get(session, project, upload_id, lock=True)
        _check_pending(upload, "take more parts")
        total = _received(session, upload) + staged.bytes
        if total > upload.bytes:
            raise PayloadTooLarge(
                f"{PART_FIELD}: with this part the upload would hold {total} bytes, more than its declared "
                f"{upload.bytes} bytes.",
                param=PART_FIELD,
            )
        part = UploadPart(id=new_id("part"), upload_id=upload.id, bytes=staged.bytes, sha256=staged.sha256)
        part.storage_key = part_key(project.id, upload.id, part.id)
    except BaseException:
        storage.discard(staged)
        raise
    try:
        storage.commit(staged, part.storage_key)
    except BaseException:
        storage.discard(staged)
        raise
    delete_on_rollback(session, part.storage_key)
    session.add(part)
    session.flush()
    claim.complete(part.id)
    return part


def _get_part(session: Session, upload_id: str, part_id: str) -> UploadPart:
    part = session.scalar(select(UploadPart).where(UploadPart.id == part_id, UploadPart.upload_id == upload_id))
    if part is None:  # the upload ended since, and its parts went
        raise Conflict(f"Part {part_id} of upload {upload_id} no longer exists.", param="upload_id")
    return part


def _ordered_parts(session: Session, upload: Upload, part_ids: list[str]) -> list[UploadPart]:
    repeated = [part_id for part_id, times in Counter(part_ids).items() if times > 1]
    if repeated:
        raise InvalidRequest(f"part_ids: {repeated[0][:60]!r} is listed more than once.", param="part_ids")
    found = {
        part.id: part
        for part in session.scalars(
            select(UploadPart).where(UploadPart.upload_id == upload.id, UploadPart.id.in_(part_ids))
        )
    }
    unknown = [p for p in part_ids if p not in found]
    if unknown:
        raise InvalidRequest(
            f"part_ids: {unknown[0][:60]!r} is not a part of upload {upload.id}"
            + (f" (and {len(unknown) - 1} more)." if len(unknown) > 1 else "."),
            param="part_ids",
        )
    parts = [found[p] for p in part_ids]
    total = sum(part.bytes for part in parts)
    if total != upload.bytes:
        raise InvalidRequest(
            f"bytes: the parts listed hold {total} bytes; the upload declared {upload.bytes}.", param="bytes"
        )
    return parts


def _assemble(parts: list[UploadPart]) -> tuple[StagedBlob, str]:
    """The parts' bytes, in order, in one staged file; and its md5."""
    storage = get_storage()
    md5 = hashlib.md5(usedforsecurity=False)

    def chunks():
        for part in parts:
            with storage.local_copy(part.storage_key) as path, path.open("rb") as f:
                while chunk := f.read(CHUNK):
                    md5.update(chunk)
                    yield chunk

    staged = storage.stage_chunks(chunks())
    return staged, md5.hexdigest()


def complete(session: Session, project: Project, upload_id: str, body: CompleteUpload) -> Upload:
    storage = get_storage()
    upload = get(session, project, upload_id, lock=True)
    _check_pending(upload, "be completed")
    parts = _ordered_parts(session, upload, body.part_ids)
    staged, md5 = _assemble(parts)
    try:
        if body.md5 is not None and body.md5.strip().lower() != md5:
            raise InvalidRequest(f"md5: the parts' md5 is {md5}, not {body.md5[:64]!r}.", param="md5")
        file = validated_file(project, staged, upload.filename, upload.purpose)
    except BaseException:
        storage.discard(staged)
        raise
    add_stored_file(session, staged, file)
    upload.status = UploadStatus.completed
    upload.file_id = file.id
    drop_parts(session, upload)  # their bytes go once the file's row has committed
    return upload


def cancel(session: Session, project: Project, upload_id: str) -> Upload:
    upload = get(session, project, upload_id, lock=True)
    _check_pending(upload, "be cancelled")
    upload.status = UploadStatus.cancelled
    drop_parts(session, upload)
    return upload
