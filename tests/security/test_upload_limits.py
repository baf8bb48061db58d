"""Issue 16, "an anonymous upload fills the disk": hostile `POST /v1/files` requests against a live API server.

A 2,000 MiB chunked upload without a key used to be spooled to a temp file before the key was checked and
before the size limit applied. Now the key is checked before a byte of the body is read, the body is counted as
it arrives, the file part goes straight to the store's staging and nothing else is kept but a few small fields.

Each row is one attack, sent over a raw socket so that a chunked body really is chunked and the client can see
the answer arrive while it still has bytes to send, with the status, `param` and `code` it must get. After each
row: no file row anywhere, the store's tmp/ and the server's TMPDIR (files and the server's open file
descriptors, so that an unnamed spool file counts) hold what they held before, and the server still answers.
While the body is sent (after every MiB, and when the answer comes) a request without a valid key has written
nothing at all; with one, only the store's staging holds the file, never past the limit.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import select
import shutil
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func
from sqlalchemy import select as sql_select

from models.file import File
from tests.conftest import Stack, prompt_completion_rows

LIMIT = 256 * 1024  # GROVE_MAX_UPLOAD_BYTES of the server under test
MB = 1024 * 1024
PIECE = 64 * 1024
ANSWER_WITHIN_SECONDS = 1.0
BOUNDARY = "grove-hostile-boundary"
FILE_HEAD = 'Content-Disposition: form-data; name="file"; filename="data.jsonl"\r\nContent-Type: application/jsonl'
PURPOSE = ('Content-Disposition: form-data; name="purpose"', b"fine-tune")
LINE = json.dumps({"prompt": "a ->", "completion": " b"}).encode() + b"\n"


# --- the server and what it holds ------------------------------------------------------------------


@dataclass
class Server:
    stack: Stack
    temp_dir: Path  # the server's TMPDIR
    staging_dir: Path  # the store's tmp/
    keys: dict[str, str | None]

    def disk(self) -> dict[str, int]:
        """Every file under the server's TMPDIR and the store's tmp/ with its size, and every file there that the
        server holds open, deleted or never named (a spooled temp file is; it still fills the disk)."""
        roots = (self.temp_dir, self.staging_dir)
        found = {}
        for root in roots:
            for path in root.rglob("*") if root.exists() else ():
                with contextlib.suppress(FileNotFoundError):
                    if path.is_file():
                        found[str(path)] = path.stat().st_size
        for fd in Path(f"/proc/{self.stack.api.pid}/fd").iterdir():
            with contextlib.suppress(FileNotFoundError):
                target = os.readlink(fd)
                # Only what has no name there any more (deleted, or never named): a named file is counted above.
                if target.startswith(tuple(str(root) for root in roots)) and target not in found:
                    found[f"open: {target}"] = fd.stat().st_size
        return found

    def file_rows(self) -> int:
        """File rows in the server's database."""
        with self.stack.session() as session:
            return count_files(session)

    def alive(self) -> bool:
        return (
            self.stack.api.poll() is None and httpx.get(f"{self.stack.base_url}/readyz", timeout=5).status_code == 200
        )


def count_files(session) -> int:
    return session.scalar(sql_select(func.count()).select_from(File))


def file_rows() -> int:
    """File rows in the in-process app's database."""
    from models.db import session_scope

    with session_scope() as session:
        return count_files(session)


@pytest.fixture(scope="module")
def server(database, tmp_path_factory) -> Iterator[Server]:
    from api.services.keys import create_admin_key, get_or_create_project, issue, revoke

    root = tmp_path_factory.mktemp("upload-limits")
    temp_dir = root / "server-tmp"
    temp_dir.mkdir()
    stack = Stack(
        "upload-limits",
        {
            "GROVE_MAX_UPLOAD_BYTES": str(LIMIT),
            "GROVE_STORAGE_DIR": str(root / "storage"),
            "TMPDIR": str(temp_dir),
            "GROVE_RUN_RECONCILER": "false",
            "GROVE_RUN_WEBHOOK_SENDER": "false",
            "GROVE_LOG_LEVEL": "WARNING",
        },
    ).start(worker=False)
    with stack.session() as session:
        project = get_or_create_project(session, f"upload-limits-{uuid.uuid4().hex[:8]}")
        valid = issue(session, project)[1]
        revoked_row, revoked = issue(session, project)
        revoke(session, revoked_row.id)
        admin = create_admin_key(session)
    keys = {"none": None, "valid": valid, "revoked": revoked, "admin": admin}
    try:
        yield Server(stack, temp_dir, root / "storage" / "tmp", keys)
    finally:
        stack.stop()


# --- a raw HTTP client --------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    error: dict | None  # None for an answer that is not the JSON error envelope
    seconds: float  # from the end of the request head to the first byte of the answer
    sent: int  # body bytes on the wire by then
    body_left: bool  # the client still had bytes to send when the answer came
    closed: bool  # the server closed the connection after answering
    disks: list[dict[str, int]]  # the server's temp files, seen after every MiB sent and when the answer came


def _read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    sock.settimeout(10)
    while True:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if sep:
            status_line, *lines = head.decode("latin-1").split("\r\n")
            status = int(status_line.split()[1])
            if status == 100:  # an interim answer: the real one follows
                data = rest
                continue
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
            if len(rest) >= int(headers.get("content-length", 0)):
                return status, headers, rest[: int(headers.get("content-length", 0))]
        try:
            more = sock.recv(65536)
        except ConnectionResetError:
            more = b""
        if not more:
            raise AssertionError(f"connection ended before a complete answer: {data[:500]!r}")
        data += more


def _closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(1)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


# A body piece that makes the client stop writing until the answer has come (or 10 s have passed).
WAIT_FOR_ANSWER: bytes = object()  # type: ignore[assignment]  # told apart by identity


def send(
    server: Server, key: str | None, head_lines: list[str], body: Iterator[bytes], path: str = "/v1/files"
) -> Answer:
    """Send the head, then the body piece by piece until the server answers or the body has all been sent."""
    auth = [f"Authorization: Bearer {key}"] if key else []
    head = "\r\n".join([f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{server.stack.port}", *auth, *head_lines])
    sock = socket.create_connection(("127.0.0.1", server.stack.port), timeout=10)
    try:
        sock.sendall(head.encode() + b"\r\n\r\n")
        started = time.monotonic()
        pending, sent, body_done, disks = b"", 0, False, []
        while time.monotonic() < started + 60:
            # Before every write: has the answer come?
            readable, writable, _ = select.select([sock], [] if body_done else [sock], [], 1)
            if readable:
                break
            if not writable:
                continue
            if not pending:
                pending = next(body, b"")
                if pending is WAIT_FOR_ANSWER:
                    pending = b""
                    select.select([sock], [], [], 10)
                else:
                    body_done = pending == b""
                continue
            try:
                written = sock.send(pending)
            except (BrokenPipeError, ConnectionResetError):
                break  # the server stopped listening: its answer is (or should be) there to read
            if (sent + written) // MB > sent // MB:
                disks.append(server.disk())
            sent += written
            pending = pending[written:]
        else:
            raise AssertionError(f"no answer within 60 s; {sent} body bytes sent")
        seconds = time.monotonic() - started
        disks.append(server.disk())
        body_left = not body_done and bool(pending or next(body, b""))
        status, headers, raw = _read_answer(sock)
        closed = _closed_by_server(sock)
    finally:
        sock.close()
    json_answer = headers.get("content-type", "").startswith("application/json")
    error = json.loads(raw)["error"] if status >= 400 and json_answer else None
    return Answer(status, headers, error, seconds, sent, body_left, closed, disks)


# --- bodies ---------------------------------------------------------------------------------------------


def file_bytes(size: int) -> Iterator[bytes]:
    """`size` bytes of JSONL, made as they are sent."""
    lines = LINE * (PIECE // len(LINE))
    while size > 0:
        piece = lines[:size]
        size -= len(piece)
        yield piece


Part = tuple[str, "bytes | Callable[[], Iterator[bytes]]"]


def form(*parts: Part, close: bool = True) -> Iterator[bytes]:
    """A multipart body made as it is sent: each part is its headers and its bytes (or a maker of them)."""
    for headers, data in parts:
        yield f"--{BOUNDARY}\r\n{headers}\r\n\r\n".encode()
        yield from [data] if isinstance(data, bytes) else data()
        yield b"\r\n"
    if close:
        yield f"--{BOUNDARY}--\r\n".encode()


def chunked(pieces: Iterator[bytes]) -> Iterator[bytes]:
    for piece in pieces:
        yield b"%x\r\n%s\r\n" % (len(piece), piece)
    yield b"0\r\n\r\n"


def huge(size: int = 50 * MB) -> Part:
    return FILE_HEAD, lambda: file_bytes(size)


MULTIPART = f"Content-Type: multipart/form-data; boundary={BOUNDARY}"
CHUNKED = "Transfer-Encoding: chunked"
SMALL_FILE = (FILE_HEAD, b"".join(json.dumps(r).encode() + b"\n" for r in prompt_completion_rows(12)))


@dataclass
class Attack:
    key: str  # the key the request carries: none, valid, revoked, admin
    head: list[str]  # the headers besides Host and Authorization
    body: Callable[[], Iterator[bytes]]  # the bytes on the wire after the head
    status: int
    param: str | None
    code: str | None
    # The answer must come within ANSWER_WITHIN_SECONDS while the client still has bytes to send (bodies of
    # 50 MB: more than the socket buffers hold), and close the connection, the rest of the body unread.
    answered_early: bool = True
    closes: bool = True


def upload(*parts: Part, close: bool = True) -> Callable[[], Iterator[bytes]]:
    return lambda: chunked(form(*parts, close=close))


def with_length(*parts: Part, extra: tuple[str, ...] = ()) -> tuple[list[str], Callable[[], Iterator[bytes]]]:
    length = sum(len(piece) for piece in form(*parts))
    return [MULTIPART, f"Content-Length: {length}", *extra], lambda: form(*parts)


def lying_length() -> Iterator[bytes]:
    # 4 KiB, as declared; then a wait for the answer, which lets the route answer them before uvicorn reads the
    # bytes that follow as a (malformed) next request and closes the connection first; then 50 MB more.
    whole = form(PURPOSE, huge())
    declared = b""
    for piece in whole:
        declared += piece
        if len(declared) >= 4096:
            break
    yield declared[:4096]
    yield WAIT_FOR_ANSWER
    yield declared[4096:]
    yield from whole


def endless_epilogue() -> Iterator[bytes]:
    # A complete, valid form, then bytes after its closing boundary (which the parser discards) that never end.
    yield from chunked(itertools.chain(form(PURPOSE, SMALL_FILE), itertools.repeat(b"\r\n" * (PIECE // 2))))


ATTACKS = {
    "no-key-50MB-chunked": Attack("none", [MULTIPART, CHUNKED], upload(PURPOSE, huge()), 401, None, "invalid_api_key"),
    # Nothing is read, so uvicorn never sends the 100 Continue: a polite client would not even start.
    "no-key-50MB-content-length-expect-continue": Attack(
        "none", *with_length(PURPOSE, huge(), extra=("Expect: 100-continue",)), 401, None, "invalid_api_key"
    ),
    "revoked-key-50MB-chunked": Attack(
        "revoked", [MULTIPART, CHUNKED], upload(PURPOSE, huge()), 401, None, "invalid_api_key"
    ),
    "admin-key-50MB-chunked": Attack(
        "admin", [MULTIPART, CHUNKED], upload(PURPOSE, huge()), 403, None, "insufficient_scope"
    ),
    "file-past-the-limit-chunked": Attack(
        "valid", [MULTIPART, CHUNKED], upload(PURPOSE, huge()), 413, "file", "file_too_large"
    ),
    "file-past-the-limit-in-one-chunk": Attack(
        "valid",
        [MULTIPART, CHUNKED],
        lambda: chunked(iter([b"".join(form(PURPOSE, huge(2 * LIMIT)))])),
        413,
        "file",
        "file_too_large",
        answered_early=False,
    ),
    "file-past-the-limit-purpose-last": Attack(
        "valid", [MULTIPART, CHUNKED], upload(huge(), PURPOSE), 413, "file", "file_too_large"
    ),
    "body-past-the-limit-after-the-form": Attack(
        "valid", [MULTIPART, CHUNKED], endless_epilogue, 413, "file", "file_too_large"
    ),
    "declared-length-past-the-limit": Attack("valid", *with_length(PURPOSE, huge()), 413, "file", "file_too_large"),
    # The server reads the 4 KiB declared, which end inside the file part: refused, not stored cut short.
    # The declared body was read in full, so the connection stays open (uvicorn refuses what follows).
    "content-length-lying-small": Attack(
        "valid", [MULTIPART, "Content-Length: 4096"], lying_length, 400, "file", None, closes=False
    ),
    "two-file-parts": Attack("valid", [MULTIPART, CHUNKED], upload(PURPOSE, SMALL_FILE, huge()), 400, "file", None),
    "unknown-field": Attack(
        "valid",
        [MULTIPART, CHUNKED],
        upload(('Content-Disposition: form-data; name="model"', b"x"), PURPOSE, huge()),
        400,
        "model",
        None,
    ),
    "unknown-field-carrying-a-file": Attack(
        "valid",
        [MULTIPART, CHUNKED],
        upload(PURPOSE, ('Content-Disposition: form-data; name="data"; filename="x.jsonl"', b"{}"), SMALL_FILE),
        400,
        "data",
        None,
        answered_early=False,
    ),
    "field-of-50MB": Attack(
        "valid",
        [MULTIPART, CHUNKED],
        upload(('Content-Disposition: form-data; name="purpose"', lambda: file_bytes(50 * MB)), SMALL_FILE),
        400,
        "purpose",
        None,
    ),
    "repeated-field": Attack("valid", [MULTIPART, CHUNKED], upload(PURPOSE, PURPOSE, huge()), 400, "purpose", None),
    "ten-thousand-unknown-fields": Attack(
        "valid",
        [MULTIPART, CHUNKED],
        upload(*[(f'Content-Disposition: form-data; name="f{i}"', b"x") for i in range(10_000)], SMALL_FILE),
        400,
        "f0",
        None,
        answered_early=False,
    ),
    "no-closing-boundary": Attack(
        "valid", [MULTIPART, CHUNKED], upload(PURPOSE, SMALL_FILE, close=False), 400, "file", None, answered_early=False
    ),
    "not-multipart-50MB": Attack(
        "valid",
        ["Content-Type: application/octet-stream", CHUNKED],
        lambda: chunked(file_bytes(50 * MB)),
        400,
        "file",
        None,
    ),
}


@pytest.mark.parametrize("attack", ATTACKS.values(), ids=ATTACKS.keys())
def test_hostile_upload_is_refused_and_leaves_nothing(server, attack: Attack):
    disk_before, rows_before = server.disk(), server.file_rows()

    answer = send(server, server.keys[attack.key], attack.head, attack.body())

    assert answer.status == attack.status, answer
    assert answer.error is not None, answer
    assert (answer.error["param"], answer.error["code"]) == (attack.param, attack.code), answer.error
    if attack.answered_early:
        assert answer.body_left, f"answered only once the whole body was sent ({answer.sent} bytes)"
        assert answer.seconds < ANSWER_WITHIN_SECONDS, answer
    if attack.answered_early and attack.closes:
        assert answer.closed, "an upload answered before its body was read must close its connection"
    if attack.key == "valid":
        # The file part is staged as it arrives, into the store's tmp/ only, never past the limit.
        held = max(sum(disk.values()) for disk in answer.disks) - sum(disk_before.values())
        assert held <= LIMIT, f"{held} bytes held on disk while the connection was open"
        assert not any(server.temp_dir.name in path for disk in answer.disks for path in disk), answer.disks
    else:
        assert all(disk == disk_before for disk in answer.disks), "a request without a valid key wrote to disk"
    assert server.disk() == disk_before
    assert server.file_rows() == rows_before
    assert server.alive()


def test_the_issue_attack_2000MiB_anonymous_chunked(server, capsys):
    """The issue's attack, measured: a 2,000 MiB chunked upload without a key (run with -s to see the figures;
    the machine's used disk is shown, not asserted: other processes write to it too)."""
    disk_before, used_before = server.disk(), shutil.disk_usage(server.temp_dir).used
    answer = send(server, None, [MULTIPART, CHUNKED], upload(PURPOSE, huge(2000 * MB))())
    disk_after, used_after = server.disk(), shutil.disk_usage(server.temp_dir).used
    assert answer.status == 401 and answer.body_left and answer.closed
    assert answer.seconds < ANSWER_WITHIN_SECONDS
    assert all(disk == disk_before for disk in answer.disks) and disk_after == disk_before
    with capsys.disabled():
        sizes = [sum(d.values()) for d in (disk_before, answer.disks[-1], disk_after)]
        print(
            f"\nanonymous 2,000 MiB chunked upload: 401 after {answer.seconds * 1000:.1f} ms, "
            f"{answer.sent} body bytes sent by then; TMPDIR + store tmp/ bytes before/at the answer/after: "
            f"{sizes}; machine's used disk {used_after - used_before:+d} bytes"
        )


def test_a_chunked_upload_within_the_limit_is_stored(server):
    """The control row: the same raw client, a valid key, a small chunked upload with its purpose last."""
    rows_before = server.file_rows()
    answer = send(server, server.keys["valid"], [MULTIPART, CHUNKED], upload(SMALL_FILE, PURPOSE)())
    assert answer.status == 200 and not answer.closed, answer
    assert server.file_rows() == rows_before + 1
    assert not any(Path(p).is_relative_to(server.staging_dir) for p in server.disk())


def test_a_stalled_upload_is_dropped(app, key, monkeypatch):
    """A body that stops arriving is refused after BODY_IDLE_SECONDS: it would hold an upload thread forever."""
    import anyio

    from api import upload_form
    from models.config import get_settings

    monkeypatch.setattr(upload_form, "BODY_IDLE_SECONDS", 0.3)

    async def stalling_body() -> AsyncIterator[bytes]:
        yield b"".join(form(PURPOSE, (FILE_HEAD, b"")))[:-40]
        await anyio.sleep(30)

    async def attempt() -> tuple[httpx.Response, float]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://grove") as client:
            started = time.monotonic()
            response = await client.post(
                "/v1/files",
                headers={"Authorization": f"Bearer {key}", "Content-Type": MULTIPART.partition(": ")[2]},
                content=stalling_body(),
            )
            return response, time.monotonic() - started

    staging = get_settings().storage_dir / "tmp"
    rows_before, staged_before = file_rows(), sorted(staging.iterdir())
    response, seconds = anyio.run(attempt)
    assert response.status_code == 400 and response.json()["error"]["param"] == "file", response.text
    assert "stalled" in response.json()["error"]["message"] and seconds < 10
    assert file_rows() == rows_before and sorted(staging.iterdir()) == staged_before
