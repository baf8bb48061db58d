"""The tar archives workers publish and read back: regular files only, every one under the archive's root.

`pack_tar` adds the regular files below one directory, named by their path relative to it: no symlink (a link
in a work directory, to a tokenizer cache or anywhere else, is skipped, never stored nor followed), no
device or fifo, no absolute name, no `..`. `unpack_tar` reads an archive back with tarfile's `data` filter
(no absolute names, nothing outside the destination, no special files, safe modes) and, stricter than it,
refuses links and absolute names too: what workers publish holds neither, so such an archive is not theirs.
"""

from __future__ import annotations

import os
import stat
import tarfile
from pathlib import Path


class UnsafeArchive(tarfile.FilterError):
    def __init__(self, member: tarfile.TarInfo, reason: str):
        super().__init__(member)
        self.reason = reason

    def __str__(self) -> str:
        return f"archive member {self.tarinfo.name!r} refused: {self.reason}"


def regular_files(root: Path) -> list[Path]:
    """Every regular file below `root`, sorted; symlinks (to files or directories) are neither listed nor followed."""
    found = []
    for directory, dirs, files in os.walk(root, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            path = Path(directory) / name
            if stat.S_ISREG(path.lstat().st_mode):
                found.append(path)
    return sorted(found)


def pack_tar(root: Path, archive: Path, first: str | None = None) -> Path:
    """An uncompressed tar of the regular files below `root`, named relative to it; `first` (a file directly in
    `root`) goes first when given."""
    files = regular_files(root)
    if first is not None:
        files = [root / first] + [p for p in files if p != root / first]
    with tarfile.open(archive, "w") as tar:
        for path in files:
            tar.add(path, arcname=path.relative_to(root).as_posix(), recursive=False)
    return archive


def _only_files(member: tarfile.TarInfo, dest_path: str) -> tarfile.TarInfo:
    if not (member.isfile() or member.isdir()):
        raise UnsafeArchive(member, "only regular files and directories are extracted")
    if member.name.startswith(("/", "\\")):  # the data filter would strip the slash; ours never have one
        raise UnsafeArchive(member, "absolute name")
    return tarfile.data_filter(member, dest_path)


def unpack_tar(archive: Path, destination: Path) -> Path:
    """Extract a worker-made archive into `destination` (created); raises tarfile.FilterError on any member that
    is not a regular file or directory inside it."""
    destination.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(destination, filter=_only_files)
    return destination
