"""One place that turns exceptions into the OpenAI error envelope."""

from __future__ import annotations

import json
import logging
import re
import sys

from botocore.exceptions import BotoCoreError, ClientError
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import DataError, DBAPIError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.errors import GroveError, InvalidRequest, ServiceUnavailable
from models.request_body import find_value

log = logging.getLogger(__name__)


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorEnvelope(BaseModel):
    """Every error response of the API, whatever its status."""

    error: ErrorBody


# The statuses /v1 routes answer with the envelope (documented on each operation of the OpenAPI spec). 422 is
# never sent: request validation errors are 400s.
ERROR_STATUSES = {
    400: "Invalid request; `param` names the field.",
    401: "Missing or wrong API key.",
    403: "The key's scope does not reach this route (an admin key on a project route, or the other way round).",
    404: "Not found, also for another project's objects.",
    409: "Conflict with the object's state.",
    413: "Upload or request body too large.",
    429: "Rate limit or unfinished-jobs limit reached (see Retry-After when present).",
    503: "The database or the artifact store is unavailable; retry (see Retry-After).",
}


def document_errors(app: FastAPI) -> None:
    """OpenAPI: the error envelope on every /v1 operation, and no 422 (FastAPI's default, never sent here)."""
    build = app.openapi

    def openapi() -> dict:
        schema = build()  # FastAPI's, cached until the routes change
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        if "ErrorEnvelope" in components:
            return schema
        envelope = ErrorEnvelope.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(envelope.pop("$defs", {}))
        components["ErrorEnvelope"] = envelope
        content = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorEnvelope"}}}
        for path, operations in schema.get("paths", {}).items():
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                if path.startswith("/v1/"):
                    for status, description in ERROR_STATUSES.items():
                        responses.setdefault(str(status), {"description": description, "content": content})
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        return schema

    app.openapi = openapi


def error_response(error: GroveError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": error.to_dict()}, status_code=error.status_code, headers=headers)


# Pydantic puts the union member it tried into the location ("n_epochs", "constrained-int"); a field
# name never looks like these.
_UNION_TAG = re.compile(r"^(int|float|str|bool|list|dict|none|constrained-\w+|function-\w+.*|\w+\[.*\])$")


def _param_from_loc(loc: tuple) -> str | None:
    # ("body", "hyperparameters", "n_epochs") -> "hyperparameters.n_epochs"
    parts = [str(p) for p in loc[1:] if not (isinstance(p, str) and _UNION_TAG.match(p))]
    return ".".join(parts) or (str(loc[0]) if loc else None)


# Bytes that are not UTF-8, decoded with surrogateescape, become the code points U+DC80 to U+DCFF.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


def _escaped_byte(value: object) -> str | None:
    if isinstance(value, str) and _ESCAPED_BYTE.search(value):
        return "is not valid UTF-8"
    return None


async def _unreadable_body(request: Request, cause: BaseException) -> InvalidRequest | None:
    """Why FastAPI could not read a JSON body, as FastAPI's own answer ("There was an error parsing the body")
    does not say; None when the cause is none of these."""
    if isinstance(cause, RecursionError):
        return InvalidRequest("Request body: arrays and objects are nested too deeply to read.")
    if isinstance(cause, UnicodeDecodeError):
        where = f"byte 0x{cause.object[cause.start]:02x} at offset {cause.start} of the body"
        # Decoded again, keeping the bytes that are not UTF-8, to say which field holds them.
        try:
            decoded = json.loads((await request.body()).decode("utf-8", "surrogateescape"))
        except (ValueError, RecursionError):
            return InvalidRequest(f"Request body is not valid UTF-8 ({where}).")
        found = find_value(decoded, _escaped_byte)
        if found is None or not found.loc:
            what = "a field name" if found is not None and found.in_key else "it"
            return InvalidRequest(f"Request body is not valid UTF-8: {what} holds {where}.")
        param = _param_from_loc(("body", *found.loc))
        if found.in_key:
            return InvalidRequest(f"{param}: a key of this object is not valid UTF-8 ({where}).", param=param)
        return InvalidRequest(f"{param}: not valid UTF-8 ({where}).", param=param)
    if isinstance(cause, ValueError) and "integer string conversion" in str(cause):
        # How json.loads refuses an integer literal longer than sys.get_int_max_str_digits().
        return InvalidRequest(
            f"Request body holds a number of more than {sys.get_int_max_str_digits()} digits, which no field takes."
        )
    return None


def install_error_handlers(app: FastAPI) -> None:
    document_errors(app)

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
            # Its location is ("body", the character offset): no field to name.
            reason = (first.get("ctx") or {}).get("error")
            where = (
                f": {reason.removesuffix(' at')} at character {first['loc'][-1]}" if reason and first.get("loc") else ""
            )
            param, message = None, f"Request body is not valid JSON{where}."
        return error_response(InvalidRequest(f"{param}: {message}" if param else message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.__cause__ is not None:
            unreadable = await _unreadable_body(request, exc.__cause__)
            if unreadable is not None:
                return error_response(unreadable)
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

    @app.exception_handler(BotoCoreError)
    @app.exception_handler(ClientError)
    async def _storage_down(_: Request, exc: Exception) -> JSONResponse:
        # Only the S3 backend raises these; a missing object is already a FileNotFoundError (404).
        log.warning("artifact store unavailable: %s", exc)
        return error_response(
            ServiceUnavailable("The artifact store is unavailable; retry shortly."), headers={"Retry-After": "5"}
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Still a 500, but in the error envelope (with the request id in the logs), never a bare text page.
        log.exception("unhandled error", exc_info=exc)
        return error_response(GroveError("Internal server error."))

    @app.exception_handler(DataError)
    async def _unstorable_value(_: Request, exc: DataError) -> JSONResponse:
        # The database refused a value the request carried (a NUL character in a string, a number out of its
        # column's range): the request is at fault, not the server.
        reason = str(exc.orig).splitlines()[0] if exc.orig is not None else "invalid value"
        return error_response(InvalidRequest(f"The request holds a value the database cannot take: {reason}."))

    @app.exception_handler(DBAPIError)
    async def _database_error(_: Request, exc: DBAPIError) -> JSONResponse:
        if exc.connection_invalidated:
            return error_response(
                ServiceUnavailable("The database connection was lost; retry shortly."),
                headers={"Retry-After": "5"},
            )
        log.exception("database error")
        return error_response(GroveError("Internal server error."))
