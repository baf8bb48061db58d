"""Content storage: the backend interface, the local-disk backend, and the choice between backends.

Every backend stages bytes locally first: they are written to a temp file under `GROVE_STORAGE_DIR/tmp`,
hashed and counted as they stream (the upload limit is enforced there), and only a complete, validated
file is committed under its key, all at once: a reader never sees half an object, and a crash leaves only
temp files that `sweep_temp` removes. Keys are chosen by the server (`objects/<project>/<file id>`); a
request never names a path.

- `LocalStorage`: the objects live in `GROVE_STORAGE_DIR/objects`, on a local disk or a volume shared by
  the API and the workers; committing is a rename.
- `S3Storage` (models/storage_s3.py): the objects live in an S3-compatible bucket, for machines that share
  no disk; committing is an upload (multipart when large) that S3 makes visible only once complete.
  Workers fetch their inputs into their own work directory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from models.config import get_settings
from models.errors import PayloadTooLarge

CHUNK = 1024 * 1024

log = logging.getLogger(__name__)


@dataclass
class StagedBlob:
    """Bytes written to a temp file, not yet visible under a key."""

    temp_path: Path
    bytes: int
    sha256: str


class Storage(ABC):
    """Where uploads and published results live. Subclasses store committed objects; staging is shared."""

    def __init__(self, root: Path):
        self.root = root.resolve()
        self.tmp = self.root / "tmp"

    def ensure(self) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)

    def key_for(self, project_id: str, object_id: str) -> str:
        return f"objects/{project_id}/{object_id}"

    def stage_chunks(self, chunks: Iterable[bytes], max_bytes: int | None = None) -> StagedBlob:
        self.ensure()
        digest = hashlib.sha256()
        size = 0
        fd, name = tempfile.mkstemp(dir=self.tmp, prefix="upload-")
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise PayloadTooLarge(f"File exceeds the upload limit of {max_bytes} bytes.", param="file")
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        return StagedBlob(Path(name), size, digest.hexdigest())

    def stage_file(self, source: Path) -> StagedBlob:
        def chunks():
            with source.open("rb") as f:
                while chunk := f.read(CHUNK):
                    yield chunk

        return self.stage_chunks(chunks())

    def discard(self, staged: StagedBlob) -> None:
        staged.temp_path.unlink(missing_ok=True)

    def sweep_temp(self, older_than_seconds: float = 3600) -> int:
        """Remove temp files abandoned by a crash; returns how many went."""
        if not self.tmp.exists():
            return 0
        cutoff = time.time() - older_than_seconds
        removed = 0
        for entry in self.tmp.iterdir():
            try:
                stale = entry.stat().st_mtime < cutoff
            except FileNotFoundError:  # committed or discarded meanwhile
                continue
            if stale:
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed += 1
        return removed

    @abstractmethod
    def commit(self, staged: StagedBlob, key: str) -> None:
        """Make the staged bytes visible under `key`, all at once. The temp file is consumed."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; a missing one is not an error."""

    @abstractmethod
    def fetch(self, key: str, directory: Path) -> Path:
        """A local file holding the object's bytes, to read only: the stored file itself where the store is
        a local or shared directory, else a complete copy downloaded into `directory` (created if needed).
        A missing object raises FileNotFoundError."""

    @abstractmethod
    def check(self) -> None:
        """Raise if the store cannot be used (readiness)."""

    @contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        """The object as a local file for the duration of the block; a downloaded copy is removed after."""
        self.ensure()
        directory = Path(tempfile.mkdtemp(dir=self.tmp, prefix="read-"))
        try:
            yield self.fetch(key, directory)
        finally:
            shutil.rmtree(directory, ignore_errors=True)


class LocalStorage(Storage):
    """Objects under `root/objects` on a local disk or a volume every process mounts."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.objects = self.root / "objects"

    def ensure(self) -> None:
        super().ensure()
        self.objects.mkdir(parents=True, exist_ok=True)

    def path_of(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.objects):
            raise ValueError(f"storage key escapes the store: {key!r}")
        return path

    def commit(self, staged: StagedBlob, key: str) -> None:
        final = self.path_of(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged.temp_path, final)

    def delete(self, key: str) -> None:
        path = self.path_of(key)
        path.unlink(missing_ok=True)
        # A folder below a project's (an upload's parts, models/upload.py) goes with its last object; a project's
        # own folder stays, so that a file being stored beside it never finds its folder gone.
        if path.parent.parent != self.objects:
            with suppress(OSError):  # not empty yet, or already gone
                path.parent.rmdir()

    def fetch(self, key: str, directory: Path) -> Path:
        path = self.path_of(key)
        if not path.is_file():
            raise FileNotFoundError(f"stored object {key!r} is missing")
        return path

    @contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        yield self.fetch(key, self.tmp)

    def check(self) -> None:
        self.ensure()
        if not os.access(self.objects, os.W_OK) or not os.access(self.tmp, os.W_OK):
            raise PermissionError(f"{self.root} is not writable")


def get_storage() -> Storage:
    """The configured backend (`GROVE_STORAGE_BACKEND`)."""
    settings = get_settings()
    if settings.storage_backend == "s3":
        if not settings.s3_bucket:
            raise ValueError("GROVE_STORAGE_BACKEND=s3 needs GROVE_S3_BUCKET.")
        return _s3_storage(
            settings.storage_dir.resolve(),
            settings.s3_bucket,
            settings.s3_prefix,
            settings.s3_endpoint_url,
            settings.s3_region,
            settings.s3_multipart_chunk_bytes,
        )
    return LocalStorage(settings.storage_dir)


@lru_cache(maxsize=4)
def _s3_storage(
    root: Path, bucket: str, prefix: str, endpoint_url: str | None, region: str | None, chunk_bytes: int
) -> Storage:
    # One client per process and configuration: boto3 clients are thread-safe and hold the connection pool.
    from models.storage_s3 import S3Storage

    return S3Storage(
        root, bucket, prefix=prefix, endpoint_url=endpoint_url, region=region, multipart_chunk_bytes=chunk_bytes
    )


def delete_after_commit(session, key: str) -> None:
    """Remove a stored object once the transaction that dropped its row has committed."""
    session.info.setdefault("delete_after_commit", []).append(key)


def delete_on_rollback(session, key: str) -> None:
    """Remove a freshly stored object if the transaction that registers it does not commit."""
    session.info.setdefault("delete_on_rollback", []).append(key)


def _delete_quietly(keys: list[str]) -> None:
    # The transaction is over either way: a failed delete (a store that does not answer) leaves an orphan
    # object, which is harmless, and must not turn a committed request into an error.
    if not keys:
        return
    storage = get_storage()
    for key in keys:
        try:
            storage.delete(key)
        except Exception:
            log.exception("could not delete stored object %s; it stays as an orphan", key)


def _register_session_hooks() -> None:
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    @event.listens_for(Session, "after_commit")
    def _delete_pending(session) -> None:
        session.info.pop("delete_on_rollback", None)
        _delete_quietly(session.info.pop("delete_after_commit", []))

    @event.listens_for(Session, "after_rollback")
    def _keep_pending(session) -> None:
        session.info.pop("delete_after_commit", None)
        _delete_quietly(session.info.pop("delete_on_rollback", []))


_register_session_hooks()
