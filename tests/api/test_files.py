import hashlib
import json

import pytest

from models.config import get_settings
from tests.conftest import emotion_rows, prompt_completion_rows

pytestmark = pytest.mark.usefixtures("database")


def upload(client, auth, content: bytes | str, name="data.jsonl", purpose="fine-tune"):
    if isinstance(content, str):
        content = content.encode()
    return client.post("/v1/files", headers=auth, files={"file": (name, content)}, data={"purpose": purpose})


def jsonl(rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def storage_tmp_files() -> list:
    tmp = get_settings().storage_dir / "tmp"
    return sorted(tmp.iterdir()) if tmp.exists() else []


def test_upload_get_list_download_delete(client, auth):
    body = jsonl(prompt_completion_rows(12)).encode()
    created = upload(client, auth, body, name="../../etc/passwd.jsonl")
    assert created.status_code == 200, created.text
    file = created.json()
    assert file["object"] == "file" and file["id"].startswith("file-")
    assert file["bytes"] == len(body) and file["purpose"] == "fine-tune" and file["status"] == "processed"
    assert file["format"] == "prompt_completion" and file["n_examples"] == 12
    assert file["filename"] == "passwd.jsonl"  # the name is shown back, never used as a path

    assert client.get(f"/v1/files/{file['id']}", headers=auth).json() == file
    listed = client.get("/v1/files", headers=auth).json()
    assert listed["object"] == "list" and [f["id"] for f in listed["data"]] == [file["id"]]

    content = client.get(f"/v1/files/{file['id']}/content", headers=auth)
    assert content.status_code == 200 and content.content == body
    assert content.headers["etag"] == f'"{hashlib.sha256(body).hexdigest()}"'
    assert int(content.headers["content-length"]) == len(body)

    partial = client.get(f"/v1/files/{file['id']}/content", headers=auth | {"Range": "bytes=10-19"})
    assert partial.status_code == 206 and partial.content == body[10:20]
    assert partial.headers["content-range"] == f"bytes 10-19/{len(body)}"

    not_modified = client.get(
        f"/v1/files/{file['id']}/content", headers=auth | {"If-None-Match": content.headers["etag"]}
    )
    assert not_modified.status_code == 304

    deleted = client.delete(f"/v1/files/{file['id']}", headers=auth)
    assert deleted.json() == {"id": file["id"], "object": "file", "deleted": True}
    assert client.get(f"/v1/files/{file['id']}", headers=auth).status_code == 404
    assert client.get(f"/v1/files/{file['id']}/content", headers=auth).status_code == 404


def test_cursor_pagination(client, auth):
    ids = [upload(client, auth, jsonl(prompt_completion_rows(10))).json()["id"] for _ in range(5)]
    first = client.get("/v1/files?limit=2", headers=auth).json()
    assert [f["id"] for f in first["data"]] == ids[::-1][:2] and first["has_more"] is True
    second = client.get(f"/v1/files?limit=2&after={first['last_id']}", headers=auth).json()
    assert [f["id"] for f in second["data"]] == ids[::-1][2:4]
    last = client.get(f"/v1/files?limit=2&after={second['last_id']}", headers=auth).json()
    assert [f["id"] for f in last["data"]] == ids[:1] and last["has_more"] is False

    # Oldest first: `after` continues forward.
    first = client.get("/v1/files?limit=3&order=asc", headers=auth).json()
    assert [f["id"] for f in first["data"]] == ids[:3] and first["has_more"] is True
    rest = client.get(f"/v1/files?limit=3&order=asc&after={first['last_id']}", headers=auth).json()
    assert [f["id"] for f in rest["data"]] == ids[3:] and rest["has_more"] is False
    assert client.get("/v1/files?order=desc", headers=auth).json()["data"][0]["id"] == ids[-1]
    refused = client.get("/v1/files?order=random", headers=auth)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "order"


def test_fields_format_records_common_keys(client, auth):
    rows = emotion_rows(10)
    rows[3]["extra"] = 1
    file = upload(client, auth, jsonl(rows)).json()
    assert file["format"] == "fields" and file["fields"] == ["label", "text"]


GOOD_CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ([GOOD_CHAT] * 3 + ["{not json"] + [GOOD_CHAT] * 8, "line 4: not valid JSON"),
        ([GOOD_CHAT] * 5 + ["[1, 2]"] + [GOOD_CHAT] * 8, "line 6: each line must be a JSON object"),
        (
            [GOOD_CHAT, {"messages": [{"role": "wizard", "content": "x"}]}] + [GOOD_CHAT] * 10,
            "line 2: messages[0] has unknown role 'wizard'",
        ),
        (
            [GOOD_CHAT] * 2 + [{"messages": [{"role": "user", "content": "only a question"}]}] + [GOOD_CHAT] * 9,
            "line 3: no assistant message",
        ),
        (
            [{"prompt": "a", "completion": "b"}] * 6 + [{"prompt": "a"}] + [{"prompt": "a", "completion": "b"}] * 5,
            "line 7: missing key 'completion'",
        ),
        (
            [{"prompt": "a", "completion": "b"}, GOOD_CHAT] + [{"prompt": "a", "completion": "b"}] * 10,
            "line 2: expected a prompt_completion example like line 1, found a chat example",
        ),
        ([GOOD_CHAT] * 9, "file has 9 examples; at least 10 are required"),
        ([], "file contains no examples"),
    ],
)
def test_bad_files_are_refused_naming_the_line(client, auth, lines, expected):
    before = storage_tmp_files()
    response = upload(client, auth, jsonl(lines))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["message"].startswith(expected), error
    assert error["param"] == "file" and error["type"] == "invalid_request_error"
    assert client.get("/v1/files", headers=auth).json()["data"] == []
    assert storage_tmp_files() == before


def test_bad_purpose_names_the_field(client, auth):
    response = upload(client, auth, jsonl(prompt_completion_rows(10)), purpose="batch")
    assert response.status_code == 400 and response.json()["error"]["param"] == "purpose"


def test_missing_file_field_names_it(client, auth):
    response = client.post("/v1/files", headers=auth, data={"purpose": "fine-tune"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "file"


@pytest.mark.parametrize("refused_before_reading", [True, False])
def test_upload_over_limit_gets_413_and_leaves_nothing(client, auth, monkeypatch, refused_before_reading):
    monkeypatch.setattr(get_settings(), "max_upload_bytes", 2000)
    # ~29 kB: within the multipart allowance, so it is caught while being stored, byte by byte.
    body = jsonl(prompt_completion_rows(200)).encode()
    if refused_before_reading:
        body = body * 10  # the declared length alone is over the limit: refused before the body is read
    before = storage_tmp_files()
    response = upload(client, auth, body)
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "file_too_large"
    assert client.get("/v1/files", headers=auth).json()["data"] == []
    assert storage_tmp_files() == before
