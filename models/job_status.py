from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    validating_files = "validating_files"
    queued = "queued"
    running = "running"
    cancelling = "cancelling"
    pausing = "pausing"
    paused = "paused"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})

# Every move a job may make. `running -> queued` is the reconciler giving back a job whose worker
# stopped renewing its lease; `cancelling -> failed` is a worker that crashed while stopping.
# Pause: a queued job is paused at once; a running one is `pausing` until its worker has checkpointed at a step
# boundary and let go of it (`paused`, no lease). `pausing -> succeeded` is a pause asked after the last step;
# `pausing -> paused` is also the reconciler, for a worker that died before confirming (the job then resumes from
# its last regular checkpoint). Resume is `paused -> queued`.
ALLOWED_TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.validating_files: frozenset({JobStatus.queued, JobStatus.failed, JobStatus.cancelled}),
    JobStatus.queued: frozenset({JobStatus.running, JobStatus.cancelled, JobStatus.failed, JobStatus.paused}),
    JobStatus.running: frozenset(
        {JobStatus.succeeded, JobStatus.failed, JobStatus.cancelling, JobStatus.queued, JobStatus.pausing}
    ),
    JobStatus.cancelling: frozenset({JobStatus.cancelled, JobStatus.failed}),
    JobStatus.pausing: frozenset({JobStatus.paused, JobStatus.succeeded, JobStatus.failed, JobStatus.cancelling}),
    JobStatus.paused: frozenset({JobStatus.queued, JobStatus.cancelled}),
    JobStatus.succeeded: frozenset(),
    JobStatus.failed: frozenset(),
    JobStatus.cancelled: frozenset(),
}


def sources_of(target: JobStatus) -> list[JobStatus]:
    return [source for source, targets in ALLOWED_TRANSITIONS.items() if target in targets]
