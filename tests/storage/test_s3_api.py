"""The files API on the s3 backend (in-process API, real PostgreSQL, the S3 emulator over TCP): uploads land
in the bucket only when valid, downloads stream from GetObject with Content-Length, the sha256 ETag and
Range, deletes remove the object after the commit, the API reads datasets back from the bucket, and the
presigned-redirect option."""

from __future__ import annotations

import hashlib

import httpx
import pytest

from tests.api.test_files import jsonl, storage_tmp_files, upload
from tests.conftest import emotion_rows, prompt_completion_rows

pytestmark = pytest.mark.usefixtures("s3_settings")


def content(client, auth, file_id: str, **headers):
    return client.get(f"/v1/files/{file_id}/content", headers=auth | headers)


def test_upload_download_ranges_delete(client, auth, s3_server, bucket):
    from models.config import get_settings

    body = jsonl(prompt_completion_rows(40)).encode()
    staged_before = storage_tmp_files()  # the store's tmp/ is shared: a killed process elsewhere may leave files
    created = upload(client, auth, body, name="train.jsonl")
    assert created.status_code == 200, created.text
    file = created.json()
    [name] = s3_server.object_names(bucket)
    assert name.startswith("objects/") and name.endswith(f"/{file['id']}")
    assert s3_server.client().get_object(Bucket=bucket, Key=name)["Body"].read() == body
    # Staged on the API's disk, then moved to the bucket: nothing stays behind locally.
    assert storage_tmp_files() == staged_before and not (get_settings().storage_dir / name).exists()

    whole = content(client, auth, file["id"])
    etag = f'"{hashlib.sha256(body).hexdigest()}"'
    assert whole.status_code == 200 and whole.content == body
    assert whole.headers["etag"] == etag and whole.headers["x-content-sha256"] == file["sha256"]
    assert int(whole.headers["content-length"]) == len(body) and whole.headers["accept-ranges"] == "bytes"
    assert whole.headers["content-type"] == "application/jsonl"
    assert whole.headers["content-disposition"] == 'attachment; filename="train.jsonl"'

    partial = content(client, auth, file["id"], Range="bytes=10-19")
    assert partial.status_code == 206 and partial.content == body[10:20]
    assert partial.headers["content-range"] == f"bytes 10-19/{len(body)}" and partial.headers["content-length"] == "10"
    resumed = content(client, auth, file["id"], Range="bytes=1000-")  # what curl -C - sends
    assert resumed.status_code == 206 and resumed.content == body[1000:]
    suffix = content(client, auth, file["id"], Range="bytes=-5")
    assert suffix.status_code == 206 and suffix.content == body[-5:]
    beyond = content(client, auth, file["id"], Range=f"bytes={len(body)}-")
    assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{len(body)}"

    # If-Range: a range only of the same content; several ranges or other units: the whole file.
    assert content(client, auth, file["id"], Range="bytes=0-9", **{"If-Range": etag}).status_code == 206
    stale = content(client, auth, file["id"], Range="bytes=0-9", **{"If-Range": '"old"'})
    assert stale.status_code == 200 and stale.content == body
    several = content(client, auth, file["id"], Range="bytes=0-1,5-6")
    assert several.status_code == 200 and several.content == body
    assert content(client, auth, file["id"], Range="items=0-1").content == body
    assert content(client, auth, file["id"], **{"If-None-Match": etag}).status_code == 304

    assert client.delete(f"/v1/files/{file['id']}", headers=auth).json()["deleted"] is True
    assert s3_server.object_names(bucket) == []
    assert content(client, auth, file["id"]).status_code == 404


def test_a_refused_upload_leaves_nothing_in_the_bucket(client, auth, s3_server, bucket):
    staged_before = storage_tmp_files()
    bad = upload(client, auth, jsonl([*prompt_completion_rows(11), "{not json"]))
    assert bad.status_code == 400 and bad.json()["error"]["message"].startswith("line 12:")
    assert s3_server.object_names(bucket) == [] and storage_tmp_files() == staged_before


def test_the_api_reads_datasets_back_from_the_bucket(client, auth):
    """Creating an evaluation checks its data, which lives only in the bucket."""
    staged_before = storage_tmp_files()
    gsm = upload(client, auth, jsonl([{"prompt": f"q{i}", "completion": f"long answer {i}"} for i in range(10)]))
    refused = client.post(
        "/v1/evaluations",
        headers=auth,
        json={"evaluation_file": gsm.json()["id"], "targets": ["tiny-llama-test"], "metrics": ["accuracy"]},
    )
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "metrics"
    emotion = upload(client, auth, jsonl(emotion_rows(12))).json()["id"]
    created = client.post(
        "/v1/evaluations",
        headers=auth,
        json={
            "evaluation_file": emotion,
            "targets": ["tiny-llama-test"],
            "text_template": "Text: {text}\nEmotion: {label}",
            "metrics": ["accuracy", "loss"],
        },
    )
    assert created.status_code == 200, created.text
    assert storage_tmp_files() == staged_before  # the copy read for the check is gone


def test_presigned_downloads_redirect_to_the_bucket(client, auth, s3_server, monkeypatch):
    from models.config import get_settings

    monkeypatch.setenv("GROVE_S3_PRESIGNED_DOWNLOADS", "true")
    get_settings.cache_clear()
    body = jsonl(prompt_completion_rows(12)).encode()
    file_id = upload(client, auth, body, name="data.jsonl").json()["id"]

    redirect = client.get(f"/v1/files/{file_id}/content", headers=auth, follow_redirects=False)
    assert redirect.status_code == 307 and redirect.headers["etag"] == f'"{hashlib.sha256(body).hexdigest()}"'
    location = redirect.headers["location"]
    assert location.startswith(f"{s3_server.endpoint_url}/") and "X-Amz-Signature=" in location
    # The URL alone is the credential: the client sends no key.
    fetched = httpx.get(location)
    assert fetched.status_code == 200 and fetched.content == body
    assert fetched.headers["content-disposition"] == 'attachment; filename="data.jsonl"'
    ranged = httpx.get(location, headers={"Range": "bytes=5-9"})
    assert ranged.status_code == 206 and ranged.content == body[5:10]


def test_unreachable_store_is_503_and_leaves_nothing(client, auth, monkeypatch):
    from models.config import get_settings
    from models.storage import _s3_storage
    from tests.conftest import free_port

    monkeypatch.setenv("GROVE_S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    get_settings.cache_clear()
    _s3_storage.cache_clear()
    before = client.get("/v1/files", headers=auth).json()["data"]
    staged_before = storage_tmp_files()
    response = upload(client, auth, jsonl(prompt_completion_rows(20)).encode())
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "5"
    assert response.json()["error"]["message"] == "The artifact store is unavailable; retry shortly."
    # The upload was not recorded and its staged copy is gone.
    assert client.get("/v1/files", headers=auth).json()["data"] == before
    assert storage_tmp_files() == staged_before
