"""The upload's multipart body, read as it arrives: never before the key is checked, never spooled.

Used by `POST /v1/files` (the file part `file`, held to GROVE_MAX_UPLOAD_BYTES) and by an upload's parts,
`POST /v1/uploads/{id}/parts` (the part `data`, held to GROVE_MAX_UPLOAD_PART_BYTES or what the upload's
declared bytes leave, api/services/uploads.py); the rules below are the same for both.

`POST /v1/files` declares no Form or File parameters, so no byte of its body is read before the route has
checked the key. The route then reads the body itself (`request.stream()`) from a worker thread, counting the
bytes as they arrive, and feeds them to python-multipart's streaming parser: the file part's bytes go straight
to the store's staging (`Storage.stage_chunks`); everything else is held to a few small named fields. Nothing
goes to the system temp dir, and the staged copy is removed when the upload is refused.

Refused (nothing is left on disk, and the rest of the body is never read: see `CloseUnreadUploads` in
api/limits.py):
- 413 `file_too_large`: a file part over GROVE_MAX_UPLOAD_BYTES, or a body over that plus MULTIPART_OVERHEAD;
  at once when the Content-Length declares it, else as soon as the count passes it.
- 400 naming the field: a body that is not multipart/form-data, a second file part, an unknown or repeated
  field, a field over MAX_FIELD_BYTES, a missing field, a body that ends before its closing boundary, and a
  body that stops arriving for BODY_IDLE_SECONDS.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Iterator, Mapping

import anyio
import anyio.from_thread
from anyio import CapacityLimiter
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from models.config import get_settings
from models.errors import InvalidRequest, PayloadTooLarge

FILE_FIELD = "file"
# Room for the boundaries, the parts' headers and the small fields.
MULTIPART_OVERHEAD = 64 * 1024
MAX_FIELD_BYTES = 4 * 1024
MAX_NAME_SHOWN = 100
# A body that stops arriving would hold its upload thread (api/routes/files.py) for as long as the client likes.
BODY_IDLE_SECONDS = 60.0

FieldCheck = Callable[[str], None]

# An upload holds its thread while the body arrives, at the client's pace: uploads (files and upload parts) run
# on threads of their own, so that slow ones never take the shared pool from the other routes. More wait their
# turn, their bodies unread.
UPLOAD_THREADS = 16
_upload_threads: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, CapacityLimiter] = weakref.WeakKeyDictionary()


def upload_limiter() -> CapacityLimiter:
    # One per event loop (a test runs several, one after the other): a limiter's waiters belong to one loop.
    loop = asyncio.get_running_loop()
    if loop not in _upload_threads:
        _upload_threads[loop] = CapacityLimiter(UPLOAD_THREADS)
    return _upload_threads[loop]


def upload_too_large(
    limit: int, whole_body: bool = False, field: str = FILE_FIELD, limit_name: str = "GROVE_MAX_UPLOAD_BYTES"
) -> PayloadTooLarge:
    part = "File" if field == FILE_FIELD else f"Part {field!r}"
    what, room = ("Request body", f" plus {MULTIPART_OVERHEAD} for the form") if whole_body else (part, "")
    return PayloadTooLarge(f"{what} exceeds the upload limit of {limit} bytes ({limit_name}){room}.", param=field)


def _decode(raw: bytes) -> str:
    # As Starlette's form parser does: UTF-8, else Latin-1 (which decodes any bytes).
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _invalid(reason: str, field: str = FILE_FIELD) -> InvalidRequest:
    return InvalidRequest(f"Invalid multipart body: {reason}.", param=field)


class _Body:
    """The request body as it arrives (`request.stream()`), pulled from a worker thread."""

    def __init__(self, request: Request, field: str):
        self._stream = request.stream()
        self._field = field

    async def _next(self) -> bytes | None:
        try:
            with anyio.fail_after(BODY_IDLE_SECONDS):
                return await anext(self._stream)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            raise InvalidRequest(
                f"The upload stalled: no bytes for {BODY_IDLE_SECONDS:g} s.", param=self._field
            ) from None
        except ClientDisconnect:
            raise InvalidRequest(
                "The client closed the connection before the upload was complete.", param=self._field
            ) from None

    def chunks(self) -> Iterator[bytes]:
        while (chunk := anyio.from_thread.run(self._next)) is not None:
            if chunk:
                yield chunk


class UploadForm:
    """One file part named `file_field` and the small fields of `fields`, each checked by its function as soon as
    it has arrived. Read in two steps, from a worker thread: `file_chunks()` yields the file's bytes (the fields
    sent before it are read on the way), then `finish()` reads the rest and returns the fields.

    The file part is held to `limit` bytes (default GROVE_MAX_UPLOAD_BYTES), named `limit_name` in the 413."""

    def __init__(
        self,
        request: Request,
        fields: Mapping[str, FieldCheck],
        file_field: str = FILE_FIELD,
        limit: int | None = None,
        limit_name: str = "GROVE_MAX_UPLOAD_BYTES",
    ):
        self._checks = fields
        self.file_field = file_field
        self._limit = get_settings().max_upload_bytes if limit is None else limit
        self._limit_name = limit_name
        content_type, options = parse_options_header(request.headers.get("content-type"))
        if content_type != b"multipart/form-data":
            raise InvalidRequest(
                f"{file_field}: Field required (send the upload as multipart/form-data).", param=file_field
            )
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self._limit + MULTIPART_OVERHEAD:
            raise self._too_large(whole_body=True)
        if not options.get(b"boundary"):
            raise self._invalid("no boundary in the Content-Type")
        callbacks = {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }
        try:
            # The parser bounds each part's headers (8, of 4 KiB each); the parts themselves are bounded here.
            self._parser = MultipartParser(options[b"boundary"], callbacks)
        except FormParserError as error:
            raise self._invalid(str(error)) from None
        self._body = _Body(request, file_field).chunks()
        self._received = 0
        self.filename: str | None = None
        self.fields: dict[str, str] = {}
        self._file_seen = self._file_done = self._ended = False
        self._file_bytes = 0
        self._pending: list[bytes] = []
        self._part_name: str | None = None
        self._field_value = bytearray()
        self._header_name = self._header_text = self._disposition = b""

    def _too_large(self, whole_body: bool = False) -> PayloadTooLarge:
        return upload_too_large(self._limit, whole_body, self.file_field, self._limit_name)

    def _invalid(self, reason: str) -> InvalidRequest:
        return _invalid(reason, self.file_field)

    # --- reading ------------------------------------------------------------------------------

    def _feed(self, chunk: bytes) -> None:
        try:
            self._parser.write(chunk)
        except FormParserError as error:
            raise self._invalid(str(error)) from None
        # Counted once parsed, so that a file part over the limit is refused as such (the chunk is in memory
        # either way): what passes this limit outside the file is boundaries, headers or epilogue.
        self._received += len(chunk)
        if self._received > self._limit + MULTIPART_OVERHEAD:
            raise self._too_large(whole_body=True)

    def file_chunks(self) -> Iterator[bytes]:
        """The file part's bytes as they arrive; returns when the part ends."""
        for chunk in self._body:
            self._feed(chunk)
            if self._pending:
                data = b"".join(self._pending)
                self._pending.clear()
                yield data
            if self._file_done:
                return
        if self._file_seen:
            raise self._invalid("the body ended inside the file part (a Content-Length shorter than the body?)")
        raise InvalidRequest(f"{self.file_field}: Field required.", param=self.file_field)

    def finish(self) -> dict[str, str]:
        """Read the rest of the body and return the fields, every one of `fields` present."""
        for chunk in self._body:
            self._feed(chunk)
        if not self._ended:
            raise self._invalid("the body ended before its closing boundary")
        for name in self._checks:
            if name not in self.fields:
                raise InvalidRequest(f"{name}: Field required.", param=name)
        return self.fields

    # --- parser callbacks ---------------------------------------------------------------------

    def _part_begin(self) -> None:
        self._part_name = None
        self._field_value.clear()
        self._disposition = b""

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_text += data[start:end]

    def _header_end(self) -> None:
        if self._header_name.strip().lower() == b"content-disposition":
            self._disposition = self._header_text
        self._header_name = self._header_text = b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise self._invalid('a part without a name in its Content-Disposition (form-data; name="...")')
        name = _decode(options[b"name"])
        if name == self.file_field:
            if self._file_seen:
                raise InvalidRequest(f"{name}: only one file part is accepted.", param=name)
            self._file_seen = True
            self.filename = _decode(options[b"filename"]) if b"filename" in options else None
        elif name not in self._checks:
            accepted = ", ".join(repr(n) for n in (self.file_field, *self._checks))
            shown = name[:MAX_NAME_SHOWN]  # a name is any header's length: not all of it is sent back
            raise InvalidRequest(f"{shown}: Unknown field (the upload takes {accepted}).", param=shown)
        elif name in self.fields:
            raise InvalidRequest(f"{name}: given more than once.", param=name)
        self._part_name = name

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part_name == self.file_field:
            self._file_bytes += end - start
            if self._file_bytes > self._limit:
                raise self._too_large()
            self._pending.append(data[start:end])
            return
        if len(self._field_value) + end - start > MAX_FIELD_BYTES:
            raise InvalidRequest(f"{self._part_name}: longer than {MAX_FIELD_BYTES} bytes.", param=self._part_name)
        self._field_value += data[start:end]

    def _part_end(self) -> None:
        if self._part_name == self.file_field:
            self._file_done = True
        elif self._part_name is not None:
            value = _decode(bytes(self._field_value))
            self._checks[self._part_name](value)
            self.fields[self._part_name] = value

    def _end(self) -> None:
        self._ended = True


def multipart_request_body(title: str, file_field: str, file_title: str, file_description: str, **fields) -> dict:
    """The OpenAPI requestBody of a route that reads its multipart body itself (UploadForm declares no Form or
    File parameters): one file field, then the text fields given as {name: extra schema keys}."""
    file_schema = {
        "type": "string",
        "contentMediaType": "application/octet-stream",
        "title": file_title,
        "description": file_description,
    }
    properties = {file_field: file_schema} | {
        name: {"type": "string", "title": name.capitalize(), **extra} for name, extra in fields.items()
    }
    return {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": properties,
                    "required": list(properties),
                    "additionalProperties": False,
                    "title": title,
                }
            }
        },
    }
