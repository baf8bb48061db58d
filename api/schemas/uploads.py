"""Upload objects, shaped like OpenAI's (`client.uploads.*` of the OpenAI SDK works unchanged)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from api.schemas.files import FileObject
from models.base import unix
from models.file import File
from models.request_body import RequestBody
from models.upload import Upload, UploadPart


class ExpiresAfter(RequestBody):
    model_config = ConfigDict(extra="forbid")

    anchor: Literal["created_at"] = Field(description="What the expiry counts from; only created_at.")
    seconds: int = Field(ge=3600, le=2592000, description="Seconds after the anchor, 3600 (1 hour) to 2592000.")


class CreateUpload(RequestBody):
    model_config = ConfigDict(extra="forbid")

    bytes: int = Field(ge=1, description="The size of the whole file: the parts must add up to exactly this.")
    filename: str = Field(min_length=1, max_length=1000, description="The name the completed file is shown by.")
    mime_type: str = Field(min_length=1, max_length=255, description="The file's MIME type (application/jsonl).")
    purpose: str = Field(max_length=64, description="The completed file's purpose: fine-tune.")
    expires_after: ExpiresAfter | None = Field(
        None, description="OpenAI's expiry policy for the completed file. Grove keeps files until they are deleted."
    )


class CompleteUpload(RequestBody):
    model_config = ConfigDict(extra="forbid")

    part_ids: list[str] = Field(
        min_length=1, max_length=10000, description="The upload's parts, in the order their bytes make the file."
    )
    md5: str | None = Field(
        None, max_length=64, description="The hex md5 of the whole file; the completion is refused if it differs."
    )


class UploadObject(BaseModel):
    id: str = Field(description="The upload's id (upload-...).")
    object: Literal["upload"] = Field("upload", description="Always 'upload'.")
    bytes: int = Field(description="The declared size of the file.")
    created_at: int = Field(description="Unix time of the upload's creation.")
    expires_at: int = Field(description="Unix time after which a pending upload expires, its parts deleted.")
    filename: str = Field(description="The name the completed file gets.")
    purpose: str = Field(description="The completed file's purpose.")
    status: Literal["pending", "completed", "cancelled", "expired"] = Field(description="Where the upload stands.")
    file: FileObject | None = Field(None, description="The file made by completing the upload.")

    @classmethod
    def from_row(cls, upload: Upload, file: File | None = None) -> UploadObject:
        return cls(
            id=upload.id,
            bytes=upload.bytes,
            created_at=unix(upload.created_at),
            expires_at=unix(upload.expires_at),
            filename=upload.filename,
            purpose=upload.purpose,
            status=upload.status,
            file=FileObject.from_row(file) if file is not None else None,
        )


class UploadPartObject(BaseModel):
    id: str = Field(description="The part's id (part-...), listed in part_ids to complete the upload.")
    object: Literal["upload.part"] = Field("upload.part", description="Always 'upload.part'.")
    created_at: int = Field(description="Unix time the part was stored.")
    upload_id: str = Field(description="The upload the part belongs to.")

    @classmethod
    def from_row(cls, part: UploadPart) -> UploadPartObject:
        return cls(id=part.id, created_at=unix(part.created_at), upload_id=part.upload_id)
