"""Every error leaves the server in OpenAI's shape:
`{"error": {"message", "type", "param", "code"}}`, with the right status."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from openbeepboop.server import errors as e

log = logging.getLogger("openbeepboop.server")

# domain error -> (HTTP status, OpenAI error type)
STATUS: dict[type[e.DomainError], tuple[int, str]] = {
    e.InvalidRequest: (400, "invalid_request_error"),
    e.AuthenticationFailed: (401, "authentication_error"),
    e.PermissionDenied: (403, "permission_error"),
    e.NotFound: (404, "not_found_error"),
    e.Conflict: (409, "conflict_error"),
    e.PayloadTooLarge: (413, "invalid_request_error"),
    e.IdempotencyMismatch: (422, "invalid_request_error"),
    e.RateLimited: (429, "rate_limit_error"),
    e.QuotaExceeded: (429, "insufficient_quota"),
    e.JobFailed: (502, "upstream_error"),
    e.Unavailable: (503, "service_unavailable_error"),
    e.Timeout: (504, "timeout_error"),
}


class BodyRefused(StarletteHTTPException):
    """A domain error met while FastAPI reads a body (it passes only HTTP errors on)."""

    def __init__(self, error: e.DomainError) -> None:
        super().__init__(STATUS.get(type(error), (400, ""))[0], error.message)
        self.error = error


HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def error_body(message: str, type_: str, code: str | None, param: str | None) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


def error_response(
    status: int,
    message: str,
    type_: str,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    return Response(
        error_body(message, type_, code, param),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def domain_error_response(exc: e.DomainError) -> Response:
    status, type_ = STATUS.get(type(exc), (500, "server_error"))
    if isinstance(exc, e.JobFailed) and exc.bad_request:
        status, type_ = 400, "invalid_request_error"
    headers: dict[str, str] = {}
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, round(retry_after)))
    if isinstance(exc, e.IdempotencyMismatch):
        headers["x-should-retry"] = "false"
    if isinstance(exc, e.JobFailed) and exc.job_id:
        headers["x-openbeepboop-job-id"] = exc.job_id
    return error_response(status, exc.message, type_, exc.code, exc.param, headers)


def _param(loc: tuple[Any, ...]) -> str | None:
    # Drop only the leading location: a job's own `body` field must stay in the name.
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc)
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


def validation_response(exc: RequestValidationError) -> Response:
    errs = exc.errors()
    if not errs:
        return error_response(400, "invalid request", "invalid_request_error", "invalid_request")
    first = errs[0]
    if first.get("type") == "json_invalid":
        return error_response(
            400,
            f"the body is not valid JSON: {first.get('ctx', {}).get('error', 'parse error')}",
            "invalid_request_error",
            "invalid_json",
        )
    param = _param(tuple(first.get("loc", ())))
    message = str(first.get("msg", "invalid value"))
    if first.get("type") == "missing":
        message = f"missing required parameter '{param}'" if param else "the body is missing"
    elif param:
        message = f"invalid value for '{param}': {message}"
    if first.get("type") == "model_attributes_type" and param is None:
        message = "the body must be a JSON object"
    return error_response(400, message, "invalid_request_error", "invalid_value", param)


def install(app: FastAPI) -> None:
    """Register the handlers that turn every failure into OpenAI's error shape."""

    async def on_domain(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, e.DomainError)
        return domain_error_response(exc)

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        content_type = request.headers.get("content-type", "")
        body_errors = [err for err in exc.errors() if tuple(err.get("loc", ())) == ("body",)]
        if body_errors and content_type and "json" not in content_type:
            return error_response(
                400,
                f"the body must be JSON sent with 'Content-Type: application/json' "
                f"(got {content_type!r})",
                "invalid_request_error",
                "invalid_content_type",
            )
        return validation_response(exc)

    async def on_http(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if isinstance(exc, BodyRefused):
            return domain_error_response(exc.error)
        status = exc.status_code
        message = str(exc.detail) if exc.detail else "error"
        if status == 404:
            message = "no such route; see /openapi.json for the API"
        type_ = "invalid_request_error" if status < 500 else "server_error"
        headers = dict(exc.headers or {})
        return error_response(status, message, type_, HTTP_CODES.get(status), None, headers)

    async def on_crash(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error", "server_error", "internal_error")

    app.add_exception_handler(e.DomainError, on_domain)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_crash)
