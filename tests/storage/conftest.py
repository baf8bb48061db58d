"""An S3 emulator (moto's server) on loopback, and settings that point the service at a bucket of it.

The emulator is a separate process speaking S3's HTTP API on a free port: boto3 reaches it over TCP exactly
as it reaches AWS or MinIO, with credentials from the standard AWS environment variables.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import TMP, free_port

# Credentials are checked for form only by the emulator; boto3 finds them where it finds real ones.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "grove-test-key",
    "AWS_SECRET_ACCESS_KEY": "grove-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": str(TMP / "no-aws-config"),
    "AWS_SHARED_CREDENTIALS_FILE": str(TMP / "no-aws-credentials"),
}


@dataclass
class S3Server:
    endpoint_url: str
    process: subprocess.Popen

    def client(self):
        import boto3

        return boto3.session.Session().client("s3", endpoint_url=self.endpoint_url)

    def create_bucket(self) -> str:
        name = f"grove-test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def object_names(self, bucket: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


@pytest.fixture(scope="session")
def s3_server():
    import httpx

    saved = {name: os.environ.get(name) for name in AWS_ENV}
    os.environ.update(AWS_ENV)
    port = free_port()
    log = (TMP / "moto-server.log").open("ab")
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None, (TMP / "moto-server.log").read_text()
        try:
            if httpx.get(f"{endpoint}/moto-api/", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the S3 emulator did not start"
        time.sleep(0.2)
    yield S3Server(endpoint, process)
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=30)
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def bucket(s3_server) -> str:
    return s3_server.create_bucket()


@pytest.fixture
def s3_settings(s3_server, bucket, monkeypatch):
    """This process's settings switched to the s3 backend on a fresh bucket, for the test's duration."""
    from models.config import get_settings
    from models.storage import _s3_storage

    monkeypatch.setenv("GROVE_STORAGE_BACKEND", "s3")
    monkeypatch.setenv("GROVE_S3_BUCKET", bucket)
    monkeypatch.setenv("GROVE_S3_ENDPOINT_URL", s3_server.endpoint_url)
    get_settings.cache_clear()
    _s3_storage.cache_clear()
    yield get_settings()
    monkeypatch.undo()
    get_settings.cache_clear()
    _s3_storage.cache_clear()
