"""Typed client errors carrying the server's status, code and message."""

from __future__ import annotations

from typing import Any


class OpenBeepBoopError(Exception):
    """Base of every error the client raises."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        param: str | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.param = param
        self.body = body

    def __str__(self) -> str:
        where = f" (HTTP {self.status}, {self.code})" if self.status else ""
        return f"{self.message}{where}"


class APIConnectionError(OpenBeepBoopError):
    """The server could not be reached (down, wrong URL, network)."""


class StreamInterruptedError(APIConnectionError):
    """A job's event stream was lost and could not be resumed. `content` says whether
    part of the answer had come already (it is never sent again: the caller decides);
    `job` is the job, which may still finish on its server."""

    def __init__(self, message: str, *, job: Any, content: bool) -> None:
        super().__init__(message, code="stream_interrupted")
        self.job = job
        self.content = content


class APIStatusError(OpenBeepBoopError):
    """The server answered with an error status."""


class BadRequestError(APIStatusError):
    """400 (and 413, 422): the request was wrong; `param` names what."""


class AuthenticationError(APIStatusError):
    """401: no key, an unknown key or a revoked key."""


class PermissionDeniedError(APIStatusError):
    """403: the key's role may not do this."""


class NotFoundError(APIStatusError):
    """404: no such job (or not one of yours)."""


class RateLimitError(APIStatusError):
    """429: slow down; `retry_after` seconds is the server's advice."""

    retry_after: float | None = None


class ServerError(APIStatusError):
    """5xx: the server or a node failed."""


class JobFailedError(OpenBeepBoopError):
    """The job ended `failed`, `cancelled` or `expired`; `job` holds it."""

    def __init__(self, message: str, *, job: Any, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.job = job


class JobTimeoutError(OpenBeepBoopError, TimeoutError):
    """A wait ran out before the job finished (the job goes on)."""


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: BadRequestError,
    413: BadRequestError,
    422: BadRequestError,
    429: RateLimitError,
}


def from_response(status: int, body: Any, headers: Any = None) -> APIStatusError:
    """The typed error for an HTTP error answer in OpenAI's error shape."""
    error = body.get("error", {}) if isinstance(body, dict) else {}
    if not isinstance(error, dict):
        error = {"message": str(error)}
    message = str(error.get("message") or f"HTTP {status}")
    cls = _BY_STATUS.get(status, ServerError if status >= 500 else APIStatusError)
    exc = cls(message, status=status, code=error.get("code"), param=error.get("param"), body=body)
    if isinstance(exc, RateLimitError) and headers is not None:
        try:
            exc.retry_after = float(headers.get("retry-after"))
        except (TypeError, ValueError):
            exc.retry_after = None
    return exc
