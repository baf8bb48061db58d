from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from models.base import unix
from models.file import File


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"
    status_details: str | None = None
    expires_at: int | None = None
    sha256: str = Field(description="Grove extension: sha256 of the content, also sent as the ETag.")
    format: str | None = Field(None, description="Grove extension: chat, prompt_completion, preference or fields.")
    n_examples: int | None = Field(None, description="Grove extension: examples in a dataset.")
    fields: list[str] | None = Field(None, description="Grove extension: keys present on every line.")

    @classmethod
    def from_row(cls, file: File) -> FileObject:
        return cls(
            id=file.id,
            bytes=file.bytes,
            created_at=unix(file.created_at),
            filename=file.filename,
            purpose=file.purpose,
            sha256=file.sha256,
            format=file.data_format,
            n_examples=file.n_examples,
            fields=file.fields,
        )


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True
