"""Issue 19, multipart uploads: OpenAI's `/v1/uploads` driven by the official `openai` SDK, unchanged, against a
live API process (uvicorn, PostgreSQL, Redis, its reconciler every second) whose limits are lowered so that big
sizes stay cheap: a part at most PART_LIMIT bytes, an upload at most TOTAL_LIMIT, a single upload at most
SINGLE_LIMIT. Each test makes its own project; the store's contents are read from the stack's directory. The
last test breaks a completion in-process (TestClient) to show what a crash before its commit leaves."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import openai
import pytest
import redis
from sqlalchemy import select

from models.base import utcnow
from models.upload import Upload, UploadPart
from tests.conftest import RUN_ID, Stack, emotion_rows, prompt_completion_rows
from tests.e2e.helpers import sdk
from tests.security.test_upload_limits import CHUNKED, MB, MULTIPART, Server, chunked, file_bytes, form, send

PART_LIMIT = 64 * 1024  # GROVE_MAX_UPLOAD_PART_BYTES (OpenAI's 64 MB by default)
TOTAL_LIMIT = 1024 * 1024  # GROVE_MAX_MULTIPART_UPLOAD_BYTES (8 GB by default)
SINGLE_LIMIT = 32 * 1024  # GROVE_MAX_UPLOAD_BYTES
JSONL = "application/jsonl"


@pytest.fixture(scope="module")
def server(database, tiny_model, tmp_path_factory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("uploads")
    (root / "server-tmp").mkdir()
    queue = f"grove-test-{RUN_ID}-uploads"
    stack = Stack(
        "uploads",
        {
            "GROVE_MAX_UPLOAD_BYTES": str(SINGLE_LIMIT),
            "GROVE_MAX_UPLOAD_PART_BYTES": str(PART_LIMIT),
            "GROVE_MAX_MULTIPART_UPLOAD_BYTES": str(TOTAL_LIMIT),
            "GROVE_STORAGE_DIR": str(root / "storage"),
            "TMPDIR": str(root / "server-tmp"),
            "GROVE_FINE_TUNE_QUEUE": queue,
            "GROVE_RUN_RECONCILER": "true",
            "GROVE_RECONCILE_INTERVAL_SECONDS": "1",
            "GROVE_RUN_WEBHOOK_SENDER": "false",
            "GROVE_LOG_LEVEL": "WARNING",
        },
    ).start(worker=False)
    try:
        yield Server(stack, root / "server-tmp", root / "storage" / "tmp", keys={})
    finally:
        stack.stop()
        redis.Redis.from_url(stack.env["GROVE_BROKER_URL"]).delete(queue)


def client_of(server: Server) -> openai.OpenAI:
    return sdk(server.stack.base_url, server.stack.new_key(f"uploads-{uuid.uuid4().hex[:10]}"))


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def stored_under(server: Server, upload_id: str) -> list[Path]:
    """What the store holds of an upload: its parts' folder and the objects in it."""
    objects = server.staging_dir.parent / "objects"
    return sorted(p for p in objects.rglob("*") if upload_id in p.parts)


def part_rows(server: Server, upload_id: str) -> list[UploadPart]:
    with server.stack.session() as session:
        return list(session.scalars(select(UploadPart).where(UploadPart.upload_id == upload_id)))


def status_of(server: Server, upload_id: str) -> str:
    with server.stack.session() as session:
        return session.get(Upload, upload_id).status


def new_upload(client: openai.OpenAI, size: int, **extra):
    return client.uploads.create(bytes=size, filename="train.jsonl", mime_type=JSONL, purpose="fine-tune", **extra)


def test_a_dataset_over_the_single_upload_limit_goes_in_parts_and_is_accepted_by_a_job(server):
    client = client_of(server)
    data = jsonl(emotion_rows(400))
    assert SINGLE_LIMIT < len(data) < TOTAL_LIMIT
    with pytest.raises(openai.APIStatusError) as refused:
        client.files.create(file=("train.jsonl", data), purpose="fine-tune")
    assert refused.value.status_code == 413 and refused.value.param == "file"

    upload = client.uploads.upload_file_chunked(
        file=data,
        filename="train.jsonl",
        bytes=len(data),
        mime_type=JSONL,
        purpose="fine-tune",
        part_size=PART_LIMIT // 3,
        md5=hashlib.md5(data).hexdigest(),
    )
    assert upload.status == "completed" and upload.object == "upload" and upload.bytes == len(data)
    assert upload.expires_at - upload.created_at == 3600  # OpenAI's hour
    file = upload.file
    assert file.object == "file" and file.bytes == len(data) and file.filename == "train.jsonl"
    assert file.purpose == "fine-tune"
    assert client.files.retrieve(file.id).bytes == len(data)
    assert client.files.content(file.id).content == data
    # The parts went once the file was made: rows and bytes.
    assert part_rows(server, upload.id) == [] and stored_under(server, upload.id) == []

    job = client.fine_tuning.jobs.create(
        model="tiny-llama-test", training_file=file.id, extra_body={"text_template": "{text} -> {label}"}
    )
    assert job.status == "queued" and job.training_file == file.id


def test_parts_are_joined_in_the_order_given_and_retries_with_a_key_make_nothing_twice(server):
    client = client_of(server)
    first, second = jsonl(prompt_completion_rows(12)[:6]), jsonl(prompt_completion_rows(12)[6:])
    key = {"Idempotency-Key": uuid.uuid4().hex}
    upload = new_upload(client, len(first) + len(second), extra_headers=key)
    assert upload.status == "pending" and upload.file is None
    assert new_upload(client, len(first) + len(second), extra_headers=key).id == upload.id

    part_key = {"Idempotency-Key": uuid.uuid4().hex}
    part_b = client.uploads.parts.create(upload.id, data=second, extra_headers=part_key)  # sent first, placed second
    assert client.uploads.parts.create(upload.id, data=second, extra_headers=part_key).id == part_b.id
    part_a = client.uploads.parts.create(upload.id, data=first)
    assert part_a.object == "upload.part" and part_a.upload_id == upload.id
    assert len(stored_under(server, upload.id)) == 3  # the folder and two parts

    done = client.uploads.complete(upload.id, part_ids=[part_a.id, part_b.id])
    assert client.files.content(done.file.id).content == first + second
    assert done.file.model_extra["n_examples"] == 12


def test_every_bad_input_is_a_4xx_naming_its_field(server):
    client = client_of(server)

    def refused(call, status: int, param: str | None) -> openai.APIStatusError:
        with pytest.raises(openai.APIStatusError) as error:
            call()
        assert (error.value.status_code, error.value.param) == (status, param), error.value.body
        return error.value

    # Creating.
    refused(
        lambda: client.uploads.create(bytes=10, filename="a", mime_type=JSONL, purpose="assistants"), 400, "purpose"
    )
    refused(lambda: new_upload(client, 0), 400, "bytes")
    refused(lambda: new_upload(client, TOTAL_LIMIT + 1), 400, "bytes")
    refused(
        lambda: new_upload(client, 10, expires_after={"anchor": "created_at", "seconds": 3600}), 400, "expires_after"
    )
    refused(
        lambda: new_upload(client, 10, expires_after={"anchor": "created_at", "seconds": 5}),
        400,
        "expires_after.seconds",
    )
    body = {"bytes": 10, "filename": "a.jsonl", "purpose": "fine-tune"}
    refused(lambda: client.post("/uploads", body=body, cast_to=openai.types.Upload), 400, "mime_type")

    rows = jsonl(prompt_completion_rows(12))
    upload = new_upload(client, len(rows))
    other = new_upload(client, len(rows))
    # Parts: over the part limit, past the declared bytes, empty, misnamed.
    refused(lambda: client.uploads.parts.create(upload.id, data=b"x" * (PART_LIMIT + 1)), 413, "data")
    refused(lambda: client.uploads.parts.create(upload.id, data=rows + b"\n"), 413, "data")
    refused(lambda: client.uploads.parts.create(upload.id, data=b""), 400, "data")
    refused(
        lambda: client.post(
            f"/uploads/{upload.id}/parts",
            body=None,
            files=[("file", ("part", rows))],
            options={"headers": {"Content-Type": "multipart/form-data"}},
            cast_to=openai.types.uploads.UploadPart,
        ),
        400,
        "file",
    )
    half = len(rows) // 2
    head = client.uploads.parts.create(upload.id, data=rows[:half])
    foreign = client.uploads.parts.create(other.id, data=rows[half:])
    # Completing: parts that are not this upload's, repeated, too few bytes, a wrong md5, bad data.
    refused(lambda: client.uploads.complete(upload.id, part_ids=[head.id, "part-nope"]), 400, "part_ids")
    refused(lambda: client.uploads.complete(upload.id, part_ids=[head.id, foreign.id]), 400, "part_ids")
    refused(lambda: client.uploads.complete(upload.id, part_ids=[head.id, head.id]), 400, "part_ids")
    refused(lambda: client.uploads.complete(upload.id, part_ids=[]), 400, "part_ids")
    refused(lambda: client.uploads.complete(upload.id, part_ids=[head.id]), 400, "bytes")
    tail = client.uploads.parts.create(upload.id, data=rows[half:])
    refused(lambda: client.uploads.complete(upload.id, part_ids=[head.id, tail.id], md5="0" * 32), 400, "md5")
    bad_order = refused(lambda: client.uploads.complete(upload.id, part_ids=[tail.id, head.id]), 400, "file")
    # The data is checked as POST /v1/files checks it.
    assert bad_order.body["message"].startswith("line 1: not valid JSON")

    # After all that the upload is still pending with its parts, and completes.
    done = client.uploads.complete(upload.id, part_ids=[head.id, tail.id], md5=hashlib.md5(rows).hexdigest())
    assert done.status == "completed" and client.files.content(done.file.id).content == rows
    # An ended upload takes nothing more.
    refused(lambda: client.uploads.complete(upload.id, part_ids=[head.id, tail.id]), 409, "upload_id")
    refused(lambda: client.uploads.cancel(upload.id), 409, "upload_id")
    refused(lambda: client.uploads.parts.create(upload.id, data=b"{}\n"), 409, "upload_id")
    assert client.uploads.cancel(other.id).status == "cancelled"
    refused(lambda: client.uploads.cancel(other.id), 409, "upload_id")


def test_another_projects_upload_is_not_found(server):
    owner, stranger = client_of(server), client_of(server)
    rows = jsonl(prompt_completion_rows(12))
    upload = new_upload(owner, len(rows))
    part = owner.uploads.parts.create(upload.id, data=rows)
    for call in (
        lambda: stranger.uploads.parts.create(upload.id, data=rows),
        lambda: stranger.uploads.complete(upload.id, part_ids=[part.id]),
        lambda: stranger.uploads.cancel(upload.id),
    ):
        with pytest.raises(openai.NotFoundError) as error:
            call()
        assert error.value.param == "upload_id"
    # A stranger's upload cannot claim the owner's part either.
    theirs = new_upload(stranger, len(rows))
    with pytest.raises(openai.BadRequestError) as error:
        stranger.uploads.complete(theirs.id, part_ids=[part.id])
    assert error.value.param == "part_ids"
    assert owner.uploads.complete(upload.id, part_ids=[part.id]).status == "completed"


def test_a_cancelled_upload_leaves_no_bytes(server):
    client = client_of(server)
    upload = new_upload(client, 3000)
    for _ in range(2):
        client.uploads.parts.create(upload.id, data=b"x" * 1000)
    stored = [p for p in stored_under(server, upload.id) if p.is_file()]
    assert len(stored) == 2 and all(p.stat().st_size == 1000 for p in stored)

    cancelled = client.uploads.cancel(upload.id)
    assert cancelled.status == "cancelled" and cancelled.file is None
    assert stored_under(server, upload.id) == [] and part_rows(server, upload.id) == []


def test_an_abandoned_upload_expires_and_leaves_no_bytes(server):
    client = client_of(server)
    upload = new_upload(client, 3000)
    client.uploads.parts.create(upload.id, data=b"x" * 1000)
    assert len(stored_under(server, upload.id)) == 2  # the folder and the part
    with server.stack.session() as session:
        session.get(Upload, upload.id).expires_at = utcnow() - timedelta(seconds=1)

    deadline = time.monotonic() + 30  # the stack's reconciler runs every second
    while status_of(server, upload.id) != "expired":
        assert time.monotonic() < deadline, "the upload was not swept"
        time.sleep(0.2)
    assert stored_under(server, upload.id) == [] and part_rows(server, upload.id) == []
    with pytest.raises(openai.ConflictError) as error:
        client.uploads.parts.create(upload.id, data=b"x")
    assert "expired" in error.value.message


def test_a_part_over_the_limit_without_content_length_is_refused_as_it_arrives(server):
    client = client_of(server)
    upload = new_upload(client, TOTAL_LIMIT)
    head = 'Content-Disposition: form-data; name="data"; filename="part"\r\nContent-Type: application/octet-stream'
    answer = send(
        server,
        client.api_key,
        [MULTIPART, CHUNKED],
        chunked(form((head, lambda: file_bytes(50 * MB)))),
        path=f"/v1/uploads/{upload.id}/parts",
    )
    assert answer.status == 413 and answer.error["param"] == "data", answer
    assert answer.body_left and answer.closed  # answered while the client still had bytes to send
    # The part was staged as it came, never past the limit, and nothing of it is left.
    assert all(size <= PART_LIMIT for disk in answer.disks for size in disk.values()), answer.disks
    assert server.disk() == {} and part_rows(server, upload.id) == []
    # The upload goes on taking parts.
    assert client.uploads.parts.create(upload.id, data=b"x" * 10).upload_id == upload.id


def test_files_list_in_both_orders(server):
    client = client_of(server)
    ids = [client.files.create(file=("d.jsonl", jsonl(prompt_completion_rows(10))), purpose="fine-tune").id]
    ids += [client.files.create(file=("d.jsonl", jsonl(prompt_completion_rows(10))), purpose="fine-tune").id]
    ids += [client.files.create(file=("d.jsonl", jsonl(prompt_completion_rows(10))), purpose="fine-tune").id]
    # The SDK follows `after` from page to page (limit 2: two pages), in the order asked for.
    assert [f.id for f in client.files.list(order="asc", limit=2)] == ids
    assert [f.id for f in client.files.list(order="desc", limit=2)] == ids[::-1]
    assert [f.id for f in client.files.list(limit=2)] == ids[::-1]  # OpenAI's default: newest first
    assert [f.id for f in client.files.list(purpose="fine-tune", order="asc", limit=1)] == ids
    assert list(client.files.list(purpose="fine-tune-results")) == []
    with pytest.raises(openai.BadRequestError) as error:
        client.files.list(order="sideways")
    assert error.value.param == "order"


def test_a_completion_that_fails_before_its_commit_leaves_the_upload_whole(client, auth, monkeypatch):
    """In-process: the completion fails after the assembled file was stored, before its transaction committed (as
    a crash there would). No file is listed or stored, the upload is still pending with its parts, and completing
    again works."""
    from api.services import uploads as service
    from models.config import get_settings
    from models.db import session_scope

    rows = jsonl(prompt_completion_rows(12))
    body = {"bytes": len(rows), "filename": "d.jsonl", "mime_type": JSONL, "purpose": "fine-tune"}
    upload_id = client.post("/v1/uploads", headers=auth, json=body).json()["id"]
    part_ids = [
        client.post(f"/v1/uploads/{upload_id}/parts", headers=auth, files={"data": ("p", piece)}).json()["id"]
        for piece in (rows[:500], rows[500:])
    ]
    objects = get_settings().storage_dir / "objects"
    stored_before = sorted(objects.rglob("*"))

    def crash(*_args):
        raise RuntimeError("the process died here")

    with monkeypatch.context() as patch:
        patch.setattr(service, "drop_parts", crash)
        with pytest.raises(RuntimeError):
            client.post(f"/v1/uploads/{upload_id}/complete", headers=auth, json={"part_ids": part_ids})
    assert client.get("/v1/files", headers=auth).json()["data"] == []
    assert sorted(objects.rglob("*")) == stored_before  # the stored file went with the rollback; the parts stayed
    with session_scope() as session:
        assert session.get(Upload, upload_id).status == "pending"
        assert len(list(session.scalars(select(UploadPart).where(UploadPart.upload_id == upload_id)))) == 2

    # Completing again works; a retry with the same Idempotency-Key gets the same answer, not a 409.
    key = {"Idempotency-Key": uuid.uuid4().hex}
    done = client.post(f"/v1/uploads/{upload_id}/complete", headers=auth | key, json={"part_ids": part_ids})
    assert done.status_code == 200 and done.json()["status"] == "completed", done.text
    again = client.post(f"/v1/uploads/{upload_id}/complete", headers=auth | key, json={"part_ids": part_ids})
    assert again.json() == done.json()
    assert client.get(f"/v1/files/{done.json()['file']['id']}/content", headers=auth).content == rows
    assert not any(upload_id in path.parts for path in objects.rglob("*"))
