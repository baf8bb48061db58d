"""Domain errors. Each carries its HTTP status; api/errors.py renders them all the same way.

The envelope follows OpenAI's: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations


class GroveError(Exception):
    status_code = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_dict(self) -> dict:
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}


class InvalidRequest(GroveError):
    status_code = 400
    type = "invalid_request_error"


class Unauthorized(GroveError):
    status_code = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(GroveError):
    status_code = 403
    type = "permission_error"
    code = "insufficient_scope"


class NotFound(GroveError):
    status_code = 404
    type = "invalid_request_error"
    code = "not_found"

    def __init__(self, kind: str, object_id: str, param: str | None = None):
        super().__init__(f"No {kind} found with id {object_id!r}.", param=param)


class Conflict(GroveError):
    status_code = 409
    type = "invalid_request_error"
    code = "conflict"


class PayloadTooLarge(GroveError):
    status_code = 413
    type = "invalid_request_error"
    code = "file_too_large"


class TooManyJobs(GroveError):
    status_code = 429
    type = "rate_limit_error"
    code = "too_many_jobs"


class TooManyStreams(GroveError):
    status_code = 429
    type = "rate_limit_error"
    code = "too_many_streams"


class RateLimited(GroveError):
    status_code = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class RangeNotSatisfiable(GroveError):
    status_code = 416
    type = "invalid_request_error"
    code = "range_not_satisfiable"


class ServiceUnavailable(GroveError):
    status_code = 503
    type = "server_error"
    code = "service_unavailable"
