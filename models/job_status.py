from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    validating_files = "validating_files"
    queued = "queued"
    running = "running"
    cancelling = "cancelling"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})

# Every move a job may make. `running -> queued` is the reconciler giving back a job whose worker
# stopped renewing its lease; `cancelling -> failed` is a worker that crashed while stopping.
ALLOWED_TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.validating_files: frozenset({JobStatus.queued, JobStatus.failed, JobStatus.cancelled}),
    JobStatus.queued: frozenset({JobStatus.running, JobStatus.cancelled, JobStatus.failed}),
    JobStatus.running: frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelling, JobStatus.queued}),
    JobStatus.cancelling: frozenset({JobStatus.cancelled, JobStatus.failed}),
    JobStatus.succeeded: frozenset(),
    JobStatus.failed: frozenset(),
    JobStatus.cancelled: frozenset(),
}


def sources_of(target: JobStatus) -> list[JobStatus]:
    return [source for source, targets in ALLOWED_TRANSITIONS.items() if target in targets]
