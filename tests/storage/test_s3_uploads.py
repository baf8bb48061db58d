"""Multipart uploads on the s3 backend (in-process API, real PostgreSQL, the S3 emulator over TCP): the parts are
objects of the bucket until the upload ends; completing leaves only the file's object, cancelling and expiring
leave nothing. (tests/api/test_uploads.py drives the same routes with the openai SDK on the local backend.)"""

from __future__ import annotations

from datetime import timedelta

import pytest

from tests.api.test_files import jsonl, storage_tmp_files
from tests.conftest import prompt_completion_rows

pytestmark = pytest.mark.usefixtures("s3_settings")


def new_upload(client, auth, size: int) -> str:
    body = {"bytes": size, "filename": "train.jsonl", "mime_type": "application/jsonl", "purpose": "fine-tune"}
    response = client.post("/v1/uploads", headers=auth, json=body)
    assert response.status_code == 200, response.text
    return response.json()["id"]


def add_part(client, auth, upload_id: str, data: bytes) -> str:
    response = client.post(f"/v1/uploads/{upload_id}/parts", headers=auth, files={"data": ("part", data)})
    assert response.status_code == 200, response.text
    return response.json()["id"]


def test_a_completed_upload_leaves_only_its_file_in_the_bucket(client, auth, s3_server, bucket):
    rows = jsonl(prompt_completion_rows(12)).encode()
    staged_before = storage_tmp_files()
    upload_id = new_upload(client, auth, len(rows))
    parts = [add_part(client, auth, upload_id, rows[:700]), add_part(client, auth, upload_id, rows[700:])]
    names = s3_server.object_names(bucket)
    assert len(names) == 2 and all(f"/{upload_id}/" in name for name in names)

    done = client.post(f"/v1/uploads/{upload_id}/complete", headers=auth, json={"part_ids": parts})
    assert done.status_code == 200, done.text
    file = done.json()["file"]
    [name] = s3_server.object_names(bucket)
    assert name.endswith(f"/{file['id']}")
    assert s3_server.client().get_object(Bucket=bucket, Key=name)["Body"].read() == rows
    assert client.get(f"/v1/files/{file['id']}/content", headers=auth).content == rows
    assert storage_tmp_files() == staged_before  # the assembled copy went to the bucket, the read copies went


def test_a_cancelled_upload_leaves_nothing_in_the_bucket(client, auth, s3_server, bucket):
    upload_id = new_upload(client, auth, 100)
    add_part(client, auth, upload_id, b"x" * 40)
    assert len(s3_server.object_names(bucket)) == 1
    cancelled = client.post(f"/v1/uploads/{upload_id}/cancel", headers=auth)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert s3_server.object_names(bucket) == []


def test_an_expired_upload_leaves_nothing_in_the_bucket(own_database, client, auth, s3_server, bucket):
    from models.base import utcnow
    from models.db import session_scope
    from models.upload import Upload
    from worker.reconcile import reconcile_once

    upload_id = new_upload(client, auth, 100)
    add_part(client, auth, upload_id, b"x" * 40)
    with session_scope() as session:
        session.get(Upload, upload_id).expires_at = utcnow() - timedelta(seconds=1)
    assert reconcile_once()["expired_uploads"] == 1
    assert s3_server.object_names(bucket) == []
    with session_scope() as session:
        assert session.get(Upload, upload_id).status == "expired"
    assert reconcile_once()["expired_uploads"] == 0
