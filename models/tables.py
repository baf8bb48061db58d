"""Imports every table so that Base.metadata is complete (alembic env and tests import this)."""

from models.base import Base
from models.checkpoint_permission import CheckpointPermission
from models.file import File
from models.idempotency import IdempotencyKey
from models.job import Checkpoint, Job, JobEvent
from models.project import ApiKey, Project
from models.upload import Upload, UploadPart
from models.webhook import WebhookDelivery, WebhookEndpoint, WebhookEvent
from models.worker_heartbeat import WorkerHeartbeat

__all__ = [
    "ApiKey",
    "Base",
    "Checkpoint",
    "CheckpointPermission",
    "File",
    "IdempotencyKey",
    "Job",
    "JobEvent",
    "Project",
    "Upload",
    "UploadPart",
    "WebhookDelivery",
    "WebhookEndpoint",
    "WebhookEvent",
    "WorkerHeartbeat",
]
