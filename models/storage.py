"""Content storage on a local or shared volume.

Bytes are written to a temp file under the store, hashed as they stream, and renamed into place only
when complete: a reader never sees half a file, and a crash leaves only temp files that `sweep_temp`
removes. Keys are chosen by the server (`objects/<project>/<file id>`); a request never names a path.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from models.config import get_settings
from models.errors import PayloadTooLarge

CHUNK = 1024 * 1024


@dataclass
class StagedBlob:
    """Bytes written to a temp file, not yet visible under a key."""

    temp_path: Path
    bytes: int
    sha256: str


class Storage:
    def __init__(self, root: Path):
        self.root = root.resolve()
        self.tmp = self.root / "tmp"
        self.objects = self.root / "objects"

    def ensure(self) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.objects.mkdir(parents=True, exist_ok=True)

    def key_for(self, project_id: str, object_id: str) -> str:
        return f"objects/{project_id}/{object_id}"

    def path_of(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.objects):
            raise ValueError(f"storage key escapes the store: {key!r}")
        return path

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

    def commit(self, staged: StagedBlob, key: str) -> Path:
        final = self.path_of(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged.temp_path, final)
        return final

    def discard(self, staged: StagedBlob) -> None:
        staged.temp_path.unlink(missing_ok=True)

    def delete(self, key: str) -> None:
        self.path_of(key).unlink(missing_ok=True)

    def sweep_temp(self, older_than_seconds: float = 3600) -> int:
        """Remove temp files abandoned by a crash; returns how many went."""
        if not self.tmp.exists():
            return 0
        cutoff = time.time() - older_than_seconds
        removed = 0
        for entry in self.tmp.iterdir():
            if entry.stat().st_mtime < cutoff:
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed += 1
        return removed


def get_storage() -> Storage:
    return Storage(get_settings().storage_dir)


def delete_after_commit(session, key: str) -> None:
    """Remove a stored object once the transaction that dropped its row has committed."""
    session.info.setdefault("delete_after_commit", []).append(key)


def delete_on_rollback(session, key: str) -> None:
    """Remove a freshly stored object if the transaction that registers it does not commit."""
    session.info.setdefault("delete_on_rollback", []).append(key)


def _register_session_hooks() -> None:
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    @event.listens_for(Session, "after_commit")
    def _delete_pending(session) -> None:
        session.info.pop("delete_on_rollback", None)
        keys = session.info.pop("delete_after_commit", [])
        storage = get_storage()
        for key in keys:
            storage.delete(key)

    @event.listens_for(Session, "after_rollback")
    def _keep_pending(session) -> None:
        session.info.pop("delete_after_commit", None)
        storage = get_storage()
        for key in session.info.pop("delete_on_rollback", []):
            storage.delete(key)


_register_session_hooks()
