"""HTTP responses carrying a stored file's bytes, whatever the storage backend.

Every download is streamed (never held in memory whole) with Content-Length, an ETag that is the file's
sha256, and Range: from the local or shared directory through Starlette's FileResponse; from an S3 bucket
by passing the client's single byte range on to GetObject and relaying the answer (206 with its
Content-Range, 416 past the end). With `GROVE_S3_PRESIGNED_DOWNLOADS`, an S3 download is instead a 307
redirect to a presigned URL of the object.
"""

from __future__ import annotations

import mimetypes
import re
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import FileResponse, RedirectResponse, Response, StreamingResponse

from models.config import get_settings
from models.file import File
from models.storage import CHUNK, LocalStorage, get_storage

# One range of bytes; anything else (several ranges, other units, garbage) is ignored and the whole file
# sent, as HTTP allows. S3 itself serves a single range only.
SINGLE_RANGE = re.compile(r"bytes=(\d+-\d*|-\d+)")


class LargeChunkFileResponse(FileResponse):
    # Starlette reads 64 KiB per thread hop; 1 MiB quadruples download throughput on large artifacts.
    chunk_size = CHUNK


def content_disposition(filename: str) -> str:
    quoted = quote(filename)
    if quoted != filename:
        return f"attachment; filename*=utf-8''{quoted}"
    return f'attachment; filename="{filename}"'


def file_content(request: Request, file: File, media_type: str | None = None, attachment: bool = True) -> Response:
    """The file's bytes for `request`: whole, one range of them, or 304 when the client's copy is current."""
    etag = f'"{file.sha256}"'
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"etag": etag})
    headers = {"etag": etag, "x-content-sha256": file.sha256}
    filename = file.filename if attachment else None
    storage = get_storage()
    if isinstance(storage, LocalStorage):
        # FileResponse streams from disk in chunks and answers Range / If-Range against this ETag.
        return LargeChunkFileResponse(
            storage.path_of(file.storage_key), media_type=media_type, filename=filename, headers=headers
        )
    from models.storage_s3 import RangeNotSatisfiable

    if filename:
        headers["content-disposition"] = content_disposition(filename)
    settings = get_settings()
    if settings.s3_presigned_downloads:
        url = storage.presigned_url(
            file.storage_key, settings.s3_presign_expiry_seconds, headers.get("content-disposition")
        )
        return RedirectResponse(url, status_code=307, headers=headers)
    byte_range = (request.headers.get("range") or "").replace(" ", "")
    if_range = request.headers.get("if-range")
    if not SINGLE_RANGE.fullmatch(byte_range) or (if_range is not None and if_range != etag):
        byte_range = None
    try:
        stream = storage.open(file.storage_key, byte_range)
    except RangeNotSatisfiable:
        return Response(status_code=416, headers=headers | {"content-range": f"bytes */{file.bytes}"})
    headers |= {"accept-ranges": "bytes", "content-length": str(stream.content_length)}
    if stream.content_range:
        headers["content-range"] = stream.content_range
    return StreamingResponse(
        stream.chunks(),
        status_code=206 if stream.content_range else 200,
        media_type=media_type or mimetypes.guess_type(file.filename)[0] or "application/octet-stream",
        headers=headers,
    )
