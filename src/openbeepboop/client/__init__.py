"""The OpenBeepBoop client library: `Client` (blocking) and `AsyncClient`."""

from openbeepboop.client._async import AsyncClient, AsyncJob
from openbeepboop.client._sync import Client, Job
from openbeepboop.client.errors import (
    APIConnectionError,
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    JobFailedError,
    JobTimeoutError,
    NotFoundError,
    OpenBeepBoopError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    StreamInterruptedError,
)
from openbeepboop.client.run_types import RunAbortedError, RunOutcome, RunResult

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "AsyncClient",
    "AsyncJob",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "Job",
    "JobFailedError",
    "JobTimeoutError",
    "NotFoundError",
    "OpenBeepBoopError",
    "PermissionDeniedError",
    "RateLimitError",
    "RunAbortedError",
    "RunOutcome",
    "RunResult",
    "ServerError",
    "StreamInterruptedError",
]
