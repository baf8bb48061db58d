"""GET /: a small read-only page for humans (jobs, progress, loss curve, events), static, no build step."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

router = APIRouter(include_in_schema=False)
PAGE = Path(__file__).resolve().parent.parent / "static" / "index.html"


@router.get("/")
def index() -> FileResponse:
    return FileResponse(PAGE, media_type="text/html", headers={"cache-control": "no-cache"})
