"""The S3-compatible storage backend (boto3), for API and worker machines that share no disk.

Uploads and results are staged and validated on the local disk as with the local backend, then put to the
bucket with boto3's managed transfer (multipart above `multipart_chunk_bytes`). S3 makes an object visible
only when its upload completed, and boto3 aborts a failed multipart upload, so no reader sees half an
object. Workers download their inputs into their work directory; the API streams downloads from GetObject
(passing a client's Range on) or redirects to a presigned URL.

Credentials come from boto3's standard chain: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (/ AWS_SESSION_TOKEN),
AWS_PROFILE and the shared config files, or the instance's role.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError

from models.storage import CHUNK, StagedBlob, Storage

MISSING = {"404", "NoSuchKey", "NotFound"}


class RangeNotSatisfiable(Exception):
    """The requested byte range starts beyond the object's end (HTTP 416)."""


@dataclass
class ObjectStream:
    """An open GetObject response: `content_range` is set when a range was served."""

    body: object
    content_length: int
    content_range: str | None

    def chunks(self, size: int = CHUNK) -> Iterator[bytes]:
        try:
            yield from self.body.iter_chunks(size)
        finally:
            self.body.close()

    def close(self) -> None:
        self.body.close()


class S3Storage(Storage):
    def __init__(
        self,
        root: Path,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        multipart_chunk_bytes: int = 64 * 1024 * 1024,
    ):
        super().__init__(root)
        self.bucket = bucket
        # 'grove', 'grove/' and '/grove/' all mean the folder grove/ of the bucket.
        self.prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        # A session per backend: boto3's default session is not thread-safe to create clients from.
        self.client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url or None,
            region_name=region or None,
            config=Config(
                signature_version="s3v4", connect_timeout=10, retries={"mode": "standard", "max_attempts": 5}
            ),
        )
        self.transfer = TransferConfig(
            multipart_threshold=multipart_chunk_bytes, multipart_chunksize=multipart_chunk_bytes
        )

    def object_name(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def commit(self, staged: StagedBlob, key: str) -> None:
        self.client.upload_file(
            str(staged.temp_path),
            self.bucket,
            self.object_name(key),
            ExtraArgs={"Metadata": {"sha256": staged.sha256}},
            Config=self.transfer,
        )
        staged.temp_path.unlink(missing_ok=True)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.object_name(key))

    def fetch(self, key: str, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        destination = directory / key.rsplit("/", 1)[-1]
        try:
            # s3transfer writes a temp file beside the destination and renames it when complete.
            self.client.download_file(self.bucket, self.object_name(key), str(destination), Config=self.transfer)
        except ClientError as exc:
            if _code(exc) in MISSING:
                raise FileNotFoundError(f"stored object {key!r} is missing from bucket {self.bucket}") from exc
            raise
        return destination

    def open(self, key: str, byte_range: str | None = None) -> ObjectStream:
        """Start reading the object, or the single byte range `bytes=first-last` / `bytes=first-` / `bytes=-n`."""
        kwargs = {"Bucket": self.bucket, "Key": self.object_name(key)}
        if byte_range:
            kwargs["Range"] = byte_range
        try:
            response = self.client.get_object(**kwargs)
        except ClientError as exc:
            if _code(exc) == "InvalidRange":
                raise RangeNotSatisfiable(byte_range) from exc
            if _code(exc) in MISSING:
                raise FileNotFoundError(f"stored object {key!r} is missing from bucket {self.bucket}") from exc
            raise
        return ObjectStream(response["Body"], response["ContentLength"], response.get("ContentRange"))

    def presigned_url(self, key: str, expires_in: int, content_disposition: str | None = None) -> str:
        params = {"Bucket": self.bucket, "Key": self.object_name(key)}
        if content_disposition:
            params["ResponseContentDisposition"] = content_disposition
        return self.client.generate_presigned_url("get_object", Params=params, ExpiresIn=expires_in)

    def check(self) -> None:
        self.ensure()
        self.client.head_bucket(Bucket=self.bucket)


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))
