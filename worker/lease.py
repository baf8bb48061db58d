"""Claiming a job and keeping it: the conditional claim, and a heartbeat that renews the lease.

The heartbeat runs in a thread so that a long step or a slow model load never lets the lease lapse.
It also reads the job's status, so the training loop learns of a cancel (or a pause) from a flag, not a query.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

from models.config import get_settings
from models.db import session_scope
from models.job_status import JobStatus
from models.transitions import renew_lease, switch_job_status

log = logging.getLogger(__name__)


def new_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Lease:
    def __init__(self, job_id: str, owner: str, lease_seconds: int, poll_seconds: float = 1.0):
        self.job_id = job_id
        self.owner = owner
        self.lease_seconds = lease_seconds
        self.poll_seconds = poll_seconds
        self.cancel_requested = threading.Event()
        # Not a stop: the loop finishes its step, checkpoints and hands the job back (worker/train_loop.py).
        self.pause_requested = threading.Event()
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)

    @property
    def should_stop(self) -> bool:
        return self.cancel_requested.is_set() or self.lost.is_set()

    def start(self) -> Lease:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def beat(self) -> None:
        with session_scope() as session:
            status = renew_lease(session, self.job_id, self.owner, self.lease_seconds)
        if status is None:
            log.warning("lost the lease on %s", self.job_id)
            self.lost.set()
        else:
            self.note(status)

    def note(self, status: str | None) -> None:
        """Raise the flag the job's status asks for: cancelling, or pausing."""
        if status == JobStatus.cancelling:
            self.cancel_requested.set()
        elif status == JobStatus.pausing:
            self.pause_requested.set()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.beat()
            except Exception:
                # A database blip is not a lost lease; the lease outlives many missed beats.
                log.exception("heartbeat for %s failed; retrying", self.job_id)
            if self.lost.is_set():
                return


def claim(job_id: str) -> Lease | None:
    """Move the job queued -> running for this worker, or return None if someone else has it."""
    settings = get_settings()
    owner = new_owner()
    with session_scope() as session:
        claimed = switch_job_status(
            session,
            job_id,
            JobStatus.running,
            only_from={JobStatus.queued},
            lease_owner=owner,
            lease_seconds=settings.lease_seconds,
            message=f"Fine-tuning job started on {owner}.",
        )
    if not claimed:
        return None
    return Lease(job_id, owner, settings.lease_seconds)


def wait_for(condition, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()
