"""The S3 backend against the S3 emulator over TCP: commit, multipart, fetch, ranged reads, delete, the
transaction hooks, readiness, and the choice of backend from the settings."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tests.conftest import TMP


def s3_storage(s3_server, bucket: str, **kwargs):
    from models.storage_s3 import S3Storage

    return S3Storage(TMP / "s3-unit-staging", bucket, endpoint_url=s3_server.endpoint_url, **kwargs)


def stage(storage, data: bytes):
    return storage.stage_chunks([data[i : i + 1_000_000] for i in range(0, len(data), 1_000_000)])


def test_commit_puts_the_staged_bytes_and_consumes_the_temp_file(s3_server, bucket, tmp_path):
    storage = s3_storage(s3_server, bucket)
    data = os.urandom(300_000)
    staged = stage(storage, data)
    assert staged.sha256 == hashlib.sha256(data).hexdigest() and staged.bytes == len(data)
    key = storage.key_for("proj-1", "file-abc")
    storage.commit(staged, key)

    assert not staged.temp_path.exists()
    head = s3_server.client().head_object(Bucket=bucket, Key=key)
    assert head["ContentLength"] == len(data) and head["Metadata"] == {"sha256": staged.sha256}

    fetched = storage.fetch(key, tmp_path / "inputs")
    assert fetched == tmp_path / "inputs" / "file-abc" and fetched.read_bytes() == data
    assert sorted(p.name for p in (tmp_path / "inputs").iterdir()) == ["file-abc"]  # no temp file left beside it

    with storage.local_copy(key) as copy:
        assert copy.read_bytes() == data and copy.is_relative_to(storage.tmp)
    assert not copy.exists() and list(storage.tmp.glob("read-*")) == []


def test_large_objects_go_up_in_parts_and_come_back_whole(s3_server, bucket, tmp_path):
    storage = s3_storage(s3_server, bucket, multipart_chunk_bytes=5 * 1024 * 1024)
    data = os.urandom(11 * 1024 * 1024)
    key = storage.key_for("proj-1", "file-big")
    storage.commit(stage(storage, data), key)

    head = s3_server.client().head_object(Bucket=bucket, Key=key)
    # A multipart object's ETag is the digest of its parts' digests with their count: 5 + 5 + 1 MiB.
    assert head["ETag"].strip('"').endswith("-3") and head["ContentLength"] == len(data)
    assert s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert hashlib.sha256(storage.fetch(key, tmp_path).read_bytes()).digest() == hashlib.sha256(data).digest()


def test_a_failed_commit_publishes_nothing_and_the_caller_discards_the_temp_file(s3_server, bucket):
    from boto3.exceptions import S3UploadFailedError

    storage = s3_storage(s3_server, f"{bucket}-missing")
    staged = stage(storage, b"x" * 1000)
    with pytest.raises(S3UploadFailedError, match="NoSuchBucket"):
        storage.commit(staged, storage.key_for("proj-1", "file-x"))
    storage.discard(staged)
    assert not staged.temp_path.exists()
    assert s3_server.object_names(bucket) == []


def test_ranged_reads_are_served_by_the_bucket(s3_server, bucket):
    from models.storage_s3 import RangeNotSatisfiable

    storage = s3_storage(s3_server, bucket)
    data = bytes(range(256)) * 40
    key = storage.key_for("proj-1", "file-r")
    storage.commit(stage(storage, data), key)

    whole = storage.open(key)
    assert whole.content_range is None and whole.content_length == len(data) and b"".join(whole.chunks()) == data
    part = storage.open(key, "bytes=100-199")
    assert part.content_range == f"bytes 100-199/{len(data)}" and part.content_length == 100
    assert b"".join(part.chunks(7)) == data[100:200]
    tail = storage.open(key, "bytes=-10")
    size = len(data)
    assert b"".join(tail.chunks()) == data[-10:] and tail.content_range == f"bytes {size - 10}-{size - 1}/{size}"
    assert b"".join(storage.open(key, "bytes=10000-").chunks()) == data[10000:]
    with pytest.raises(RangeNotSatisfiable):
        storage.open(key, f"bytes={len(data)}-")


def test_missing_objects_and_deletes(s3_server, bucket, tmp_path):
    storage = s3_storage(s3_server, bucket)
    key = storage.key_for("proj-1", "file-d")
    storage.commit(stage(storage, b"payload"), key)
    storage.delete(key)
    assert s3_server.object_names(bucket) == []
    storage.delete(key)  # already gone: not an error
    with pytest.raises(FileNotFoundError):
        storage.fetch(key, tmp_path)
    with pytest.raises(FileNotFoundError):
        storage.open(key)


@pytest.mark.parametrize("prefix", ["grove", "grove/", "/grove/"])
def test_prefix_is_a_folder_of_the_bucket(s3_server, bucket, prefix, tmp_path):
    storage = s3_storage(s3_server, bucket, prefix=prefix)
    key = storage.key_for("proj-1", "file-p")
    storage.commit(stage(storage, b"data"), key)
    assert s3_server.object_names(bucket) == ["grove/objects/proj-1/file-p"]
    assert storage.fetch(key, tmp_path).read_bytes() == b"data"


def test_check_reaches_the_bucket(s3_server, bucket):
    from botocore.exceptions import ClientError

    s3_storage(s3_server, bucket).check()
    with pytest.raises(ClientError):
        s3_storage(s3_server, f"{bucket}-missing").check()


def test_settings_choose_the_backend(s3_settings, monkeypatch):
    from models.config import get_settings
    from models.storage import LocalStorage, _s3_storage, get_storage
    from models.storage_s3 import S3Storage

    storage = get_storage()
    assert isinstance(storage, S3Storage) and storage.bucket == s3_settings.s3_bucket
    assert get_storage() is storage  # one client per process
    assert storage.root == Path(s3_settings.storage_dir).resolve()  # staging stays local

    monkeypatch.delenv("GROVE_S3_BUCKET")
    get_settings.cache_clear()
    _s3_storage.cache_clear()
    with pytest.raises(ValueError, match="GROVE_S3_BUCKET"):
        get_storage()
    monkeypatch.setenv("GROVE_STORAGE_BACKEND", "local")
    get_settings.cache_clear()
    assert isinstance(get_storage(), LocalStorage)


def test_objects_follow_the_transaction(s3_settings, s3_server, bucket):
    """Dropped rows' objects go only after the commit; fresh objects go with a rollback (real PostgreSQL)."""
    from sqlalchemy import text

    from models.db import session_scope
    from models.storage import delete_after_commit, delete_on_rollback, get_storage

    storage = get_storage()
    kept, dropped, rolled_back = (storage.key_for("proj-t", name) for name in ("kept", "dropped", "rolled-back"))
    for key in (kept, dropped, rolled_back):
        storage.commit(stage(storage, b"bytes of " + key.encode()), key)

    with session_scope() as session:
        session.execute(text("SELECT 1"))  # a transaction is open, as with a row deleted
        delete_after_commit(session, dropped)
        delete_on_rollback(session, kept)  # committed: registered objects stay
    assert s3_server.object_names(bucket) == sorted([kept, rolled_back])

    class Boom(Exception):
        pass

    with pytest.raises(Boom), session_scope() as session:
        session.execute(text("SELECT 1"))
        delete_on_rollback(session, rolled_back)
        delete_after_commit(session, kept)  # rolled back: nothing was dropped
        raise Boom
    assert s3_server.object_names(bucket) == [kept]
