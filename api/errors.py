"""One place that turns exceptions into the OpenAI error envelope."""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.errors import GroveError, InvalidRequest, ServiceUnavailable

log = logging.getLogger(__name__)


def error_response(error: GroveError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": error.to_dict()}, status_code=error.status_code, headers=headers)


# Pydantic puts the union member it tried into the location ("n_epochs", "constrained-int"); a field
# name never looks like these.
_UNION_TAG = re.compile(r"^(int|float|str|bool|list|dict|none|constrained-\w+|function-\w+.*|\w+\[.*\])$")


def _param_from_loc(loc: tuple) -> str | None:
    # ("body", "hyperparameters", "n_epochs") -> "hyperparameters.n_epochs"
    parts = [str(p) for p in loc[1:] if not (isinstance(p, str) and _UNION_TAG.match(p))]
    return ".".join(parts) or (str(loc[0]) if loc else None)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GroveError)
    async def _grove_error(_: Request, exc: GroveError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        param = _param_from_loc(tuple(first.get("loc", ())))
        message = first.get("msg", "Invalid request.")
        if first.get("type") == "extra_forbidden":
            message = "Unknown field."
        if first.get("type") == "json_invalid":
            message = "Request body is not valid JSON."
        return error_response(InvalidRequest(f"{param}: {message}" if param else message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = GroveError(str(exc.detail))
        error.status_code = exc.status_code
        error.type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(error, headers=getattr(exc, "headers", None))

    @app.exception_handler(OperationalError)
    async def _database_down(_: Request, exc: OperationalError) -> JSONResponse:
        log.warning("database unavailable: %s", exc)
        return error_response(
            ServiceUnavailable("The database is unavailable; retry shortly."), headers={"Retry-After": "5"}
        )

    @app.exception_handler(DBAPIError)
    async def _database_error(_: Request, exc: DBAPIError) -> JSONResponse:
        if exc.connection_invalidated:
            return error_response(
                ServiceUnavailable("The database connection was lost; retry shortly."),
                headers={"Retry-After": "5"},
            )
        log.exception("database error")
        return error_response(GroveError("Internal server error."))
