from __future__ import annotations

import time
from pathlib import Path

import httpx
from openai import OpenAI

from tests.conftest import emotion_rows, write_jsonl
from worker.archives import unpack_tar

TERMINAL = {"succeeded", "failed", "cancelled"}


def sdk(base_url: str, key: str) -> OpenAI:
    return OpenAI(api_key=key, base_url=f"{base_url}/v1", max_retries=0, timeout=60)


def upload_emotion(client: OpenAI, tmp_path: Path, n: int, offset: int = 0, name: str = "train.jsonl") -> str:
    path = write_jsonl(tmp_path / name, emotion_rows(n, offset))
    with path.open("rb") as f:
        return client.files.create(file=f, purpose="fine-tune").id


def wait_for(client: OpenAI, job_id: str, until=lambda job: job.status in TERMINAL, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if until(job):
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not reach the condition in {timeout}s; last status {job.status}")


def download(base_url: str, key: str, file_id: str, **headers) -> httpx.Response:
    return httpx.get(
        f"{base_url}/v1/files/{file_id}/content", headers={"Authorization": f"Bearer {key}"} | headers, timeout=60
    )


def untar(content: bytes, dest: Path) -> Path:
    """A downloaded archive, extracted as the workers extract theirs (regular files only, inside `dest`)."""
    archive = dest.with_name(dest.name + ".tar")
    archive.write_bytes(content)
    return unpack_tar(archive, dest)
