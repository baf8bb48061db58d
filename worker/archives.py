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

# tarfile's extraction filters came in Python 3.11.4; Debian 12's Python is 3.11.2. There the same checks are
# made here (`_check_without_filters`), and a refused member raises UnsafeArchive, a tarfile.TarError.
HAS_FILTERS = hasattr(tarfile, "data_filter")
ArchiveRefused = tarfile.FilterError if HAS_FILTERS else tarfile.TarError


class UnsafeArchive(ArchiveRefused):
    def __init__(self, member: tarfile.TarInfo, reason: str):
        super().__init__(member)
        self.tarinfo = member
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


def _check_without_filters(member: tarfile.TarInfo, dest_path: str) -> tarfile.TarInfo:
    """What `_only_files` and the data filter refuse, for a Python without tarfile's filters."""
    if not (member.isfile() or member.isdir()):
        raise UnsafeArchive(member, "only regular files and directories are extracted")
    if member.name.startswith(("/", "\\")) or os.path.isabs(member.name):
        raise UnsafeArchive(member, "absolute name")
    target = os.path.realpath(os.path.join(dest_path, member.name))
    if os.path.commonpath([target, dest_path]) != dest_path:
        raise UnsafeArchive(member, "outside the destination")
    member.mode = (member.mode & 0o755) | (0o700 if member.isdir() else 0o600)  # as the data filter: no set-id bits
    member.uid = member.gid = 0
    member.uname = member.gname = ""
    return member


def unpack_tar(archive: Path, destination: Path) -> Path:
    """Extract a worker-made archive into `destination` (created); raises ArchiveRefused (tarfile.FilterError
    where tarfile has filters) on any member that is not a regular file or directory inside it."""
    destination.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        if HAS_FILTERS:
            tar.extractall(destination, filter=_only_files)
        else:
            dest_path = os.path.realpath(destination)
            members = [_check_without_filters(member, dest_path) for member in tar.getmembers()]
            tar.extractall(destination, members=members, numeric_owner=True)
    return destination
