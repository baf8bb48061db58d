"""Archives built by workers hold only regular files under one root; hostile archives are not extracted.

The packers are the real ones (fine_tune.pack_adapter and pack_dir, export._pack) run on a directory laid
with the traps a work directory could hold: symlinks to a file and to a directory outside it, a fifo.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from worker import archives
from worker.archives import UnsafeArchive, pack_tar, unpack_tar
from worker.export import _pack as pack_onnx_package
from worker.fine_tune import pack_adapter, pack_dir


@pytest.fixture
def trapped(tmp_path) -> tuple[Path, Path]:
    """A directory with two real files (one nested) and links out of it; and the outside it must not reach."""
    outside = tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "secret.txt").write_text("server secret")
    (outside / "dir" / "deep.txt").write_text("also secret")
    root = tmp_path / "adapter"
    (root / "sub").mkdir(parents=True)
    (root / "adapter_config.json").write_text("{}")
    (root / "manifest.json").write_text("{}")
    (root / "sub" / "weights.bin").write_bytes(b"w" * 10)
    (root / "link-to-file").symlink_to(outside / "secret.txt")
    (root / "link-to-dir").symlink_to(outside / "dir", target_is_directory=True)
    (root / "sub" / "abs-link").symlink_to("/etc/passwd")
    os.mkfifo(root / "a-fifo")
    return root, outside


def _members(archive: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(archive) as tar:
        return tar.getmembers()


@pytest.mark.parametrize("packer", ["pack_adapter", "pack_dir", "onnx_package"])
def test_worker_archives_hold_only_regular_files_under_one_root(trapped, tmp_path, packer):
    root, _ = trapped
    archive = tmp_path / "out.tar"
    if packer == "pack_adapter":
        pack_adapter(root, archive, {"job": "x"})
        expected = {"adapter_config.json", "manifest.json", "grove-manifest.json", "sub/weights.bin"}
    elif packer == "pack_dir":
        pack_dir(root, archive)
        expected = {"adapter_config.json", "manifest.json", "sub/weights.bin"}
    else:
        pack_onnx_package(root, archive)
        expected = {"adapter_config.json", "manifest.json", "sub/weights.bin"}
    members = _members(archive)
    assert {m.name for m in members} == expected
    for member in members:
        assert member.isreg(), member.name
        assert not member.name.startswith("/") and ".." not in Path(member.name).parts, member.name
    with tarfile.open(archive) as tar:
        contents = b"".join(tar.extractfile(m).read() for m in members)
    assert b"secret" not in contents
    if packer == "onnx_package":
        assert members[0].name == "manifest.json"  # the package's manifest first
    # And the archive extracts cleanly with the strict reader.
    assert (unpack_tar(archive, tmp_path / "back") / "sub" / "weights.bin").read_bytes() == b"w" * 10


def _hostile(path: Path, member: tarfile.TarInfo, data: bytes = b"x") -> Path:
    with tarfile.open(path, "w") as tar:
        tar.addfile(tarfile.TarInfo("ok.txt"), io.BytesIO(b""))  # a harmless member first
        if member.isreg():
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
        else:
            tar.addfile(member)
    return path


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.fixture(params=["tarfile filters", "without filters"] if archives.HAS_FILTERS else ["without filters"])
def extraction(request, monkeypatch) -> type[Exception]:
    """Both ways of extracting: with tarfile's filters (Python 3.11.4 on) and the checks made without them
    (Debian 12's 3.11.2), which raise UnsafeArchive."""
    if request.param == "without filters":
        monkeypatch.setattr(archives, "HAS_FILTERS", False)
        return UnsafeArchive
    return tarfile.FilterError


@pytest.mark.parametrize(
    "member",
    [
        tarfile.TarInfo("../escaped.txt"),
        tarfile.TarInfo("sub/../../escaped.txt"),
        tarfile.TarInfo("/tmp/grove-absolute-escape.txt"),
        _link("inner-link", "/etc/passwd", tarfile.SYMTYPE),
        _link("rel-link", "../../outside", tarfile.SYMTYPE),
        _link("harmless-looking", "ok.txt", tarfile.SYMTYPE),  # inside, but not a regular file
        _link("hard", "/etc/passwd", tarfile.LNKTYPE),
        _link("fifo", "", tarfile.FIFOTYPE),
        _link("dev", "", tarfile.CHRTYPE),
    ],
    ids=lambda m: m.name,
)
def test_hostile_archive_members_are_refused(tmp_path, member, extraction):
    dest = tmp_path / "work" / "dest"
    archive = _hostile(tmp_path / "hostile.tar", member)
    with pytest.raises(extraction):
        unpack_tar(archive, dest)
    assert not (tmp_path / "work" / "escaped.txt").exists() and not (tmp_path / "escaped.txt").exists()
    assert not Path("/tmp/grove-absolute-escape.txt").exists()
    assert not any(p.is_symlink() for p in dest.rglob("*"))


def test_a_worker_archive_round_trips_either_way(tmp_path, trapped, extraction):
    root, _ = trapped
    archive = pack_tar(root, tmp_path / "a.tar")
    dest = unpack_tar(archive, tmp_path / "dest")
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert files == ["adapter_config.json", "manifest.json", "sub/weights.bin"]
    assert (dest / "sub" / "weights.bin").read_bytes() == b"w" * 10
    assert all(not (p.stat().st_mode & 0o7022) for p in dest.rglob("*"))  # no set-id bits, no group/other write
