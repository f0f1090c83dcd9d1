"""OpenAI-style errors the gateway answers with, instead of routing a request.

Every refusal is a ``GatewayError``: it carries the HTTP status, the OpenAI
``{"error": {message, type, param, code}}`` body and the ``x-error-<cause>``
header AIBrix users grep their logs for. The ext_proc layer turns it into an
ImmediateResponse; nothing else needs to know how.
"""

from __future__ import annotations

import orjson


def error_type(status: int) -> str:
    """OpenAI's error ``type`` for an HTTP status."""
    if status in (400, 404, 405, 409, 413, 415, 422):
        return "invalid_request_error"
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    if status == 503:
        return "overloaded_error"
    return "api_error"


class GatewayError(Exception):
    """A request the gateway refuses; ``cause`` names the ``x-error-<cause>`` header."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        cause: str,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.cause = cause
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> bytes:
        return orjson.dumps(
            {
                "error": {
                    "message": self.message,
                    "type": error_type(self.status),
                    "param": self.param,
                    "code": self.code,
                }
            }
        )

    def response_headers(self) -> dict[str, str]:
        return {"content-type": "application/json", f"x-error-{self.cause}": "true", **self.headers}


def bad_request(message: str, *, cause: str, code: str, param: str | None = None) -> GatewayError:
    return GatewayError(400, message, cause=cause, code=code, param=param)


def internal_error() -> GatewayError:
    """The gateway's own failure (a bug): logged where it happened, answered without details."""
    return GatewayError(
        500, "The gateway failed to process the request.", cause="internal", code="internal_error"
    )
