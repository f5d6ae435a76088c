"""Domain errors. Each carries an OpenAI-style `code` (and `param` where one input is
to blame); the HTTP layer maps the class to a status in one place."""

from __future__ import annotations


class DomainError(Exception):
    """Base of every error the domain raises on purpose."""

    code: str = "server_error"

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param


class InvalidRequest(DomainError):
    """The request is malformed or a value is out of range (HTTP 400)."""

    code = "invalid_request"


class AuthenticationFailed(DomainError):
    """No key, or a key that is unknown or revoked (HTTP 401)."""

    code = "invalid_api_key"


class PermissionDenied(DomainError):
    """The key is valid but its role may not do this (HTTP 403)."""

    code = "permission_denied"


class NotFound(DomainError):
    """No such object, or not one this key may see (HTTP 404)."""

    code = "not_found"


class Conflict(DomainError):
    """The object is in a state that forbids this (HTTP 409)."""

    code = "conflict"


class IdempotencyMismatch(DomainError):
    """An idempotency key was reused with a different request body (HTTP 422)."""

    code = "idempotency_key_reused"


class PayloadTooLarge(DomainError):
    """The request body is over the configured limit (HTTP 413)."""

    code = "request_too_large"


class RateLimited(DomainError):
    """Too many requests or too many queued jobs for this key (HTTP 429)."""

    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float, code: str | None = None):
        super().__init__(message, code=code)
        self.retry_after = retry_after


class QuotaExceeded(RateLimited):
    """The share of this key used its quota of jobs or tokens for the hour (HTTP 429,
    OpenAI's `insufficient_quota`)."""

    code = "insufficient_quota"


class Unavailable(DomainError):
    """The service cannot answer now, e.g. no node serves the model (HTTP 503)."""

    code = "service_unavailable"

    def __init__(self, message: str, *, retry_after: float, code: str | None = None):
        super().__init__(message, code=code)
        self.retry_after = retry_after


class Timeout(DomainError):
    """A synchronous wait ran out before the job finished (HTTP 504)."""

    code = "timeout"


class JobFailed(DomainError):
    """A synchronous request's job failed on its node (HTTP 502 unless the node's
    error says the request itself was bad)."""

    code = "job_failed"
    # node error codes that blame the request, not the node (docs/node-protocol.md)
    REQUEST_CODES = frozenset(
        {
            "invalid_request",
            "invalid_value",
            "unsupported_parameter",
            "unsupported_content",
            "context_length_exceeded",
        }
    )

    def __init__(
        self, message: str, *, code: str | None = None, job_id: str = "", param: str | None = None
    ):
        super().__init__(message, code=code, param=param)
        self.job_id = job_id

    @property
    def bad_request(self) -> bool:
        """The node refused the request itself (HTTP 400, as OpenAI answers it)."""
        return self.code in self.REQUEST_CODES
