from __future__ import annotations

from typing import Generic, Literal, TypeVar

from pydantic import BaseModel

from models.base import unix
from models.job import Job, JobEvent

T = TypeVar("T")


class ListObject(BaseModel, Generic[T]):
    """OpenAI's cursor page: pass the last id as `after` to get the next page."""

    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None

    @classmethod
    def of(cls, items: list[T], has_more: bool) -> ListObject[T]:
        ids = [getattr(item, "id", None) for item in items]
        return cls(data=items, has_more=has_more, first_id=ids[0] if ids else None, last_id=ids[-1] if ids else None)


def job_times(job: Job) -> dict:
    """The fields every kind's job object takes from the row alike: id, status, base model and timestamps."""
    return {
        "id": job.id,
        "created_at": unix(job.created_at),
        "started_at": unix(job.started_at),
        "finished_at": unix(job.finished_at),
        "status": job.status,
        "model": job.model,
    }


class JobEventObject(BaseModel):
    """One event of a job of any kind; each kind's subclass names its `object` and documents `event_type`."""

    id: str
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    data: dict | None
    event_type: str

    @classmethod
    def from_row(cls, event: JobEvent):
        return cls(
            id=event.public_id,
            created_at=unix(event.created_at),
            level=event.level,
            message=event.message,
            data=event.data or {},
            event_type=event.type,
        )
