"""What a DSPy call becomes on the server, and back: the job's body and fields, its
idempotency key, and our client's errors as the `dspy.lm15` errors DSPy expects of an
engine (from their class it decides whether to retry)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from dspy import lm15

from openbeepboop.client import (
    APIConnectionError,
    AuthenticationError,
    BadRequestError,
    JobTimeoutError,
    NotFoundError,
    OpenBeepBoopError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
)

ENDPOINT = "/v1/chat/completions"
KEY_PREFIX = "obb-dspy-"


@dataclass(frozen=True)
class JobOptions:
    """What every job of a `JobsEngine` carries besides the request (all optional).

    - `run`: a name for the run ("eval-gsm8k-v3"); it goes into every idempotency key
      (another name runs everything again as new jobs) and into the jobs' metadata as
      `run` (unless `metadata` has one).
    - `priority`, `max_attempts`, `ttl_seconds`, `metadata`, `node`, `node_labels`: the
      job knobs of docs/client.md.
    - `server_cache`: the server's response cache for these requests, `"use"`, `"skip"`
      or `"refresh"` (the body field `cache`); None leaves it to the server.
    - `wait_timeout`: seconds to wait for a job before DSPy sees a timeout (it retries,
      finding the same job); None waits as long as the queue takes.
    """

    run: str | None = None
    priority: int | None = None
    max_attempts: int | None = None
    ttl_seconds: float | None = None
    metadata: Mapping[str, Any] | None = None
    node: str | None = None
    node_labels: Mapping[str, str] | None = None
    server_cache: Literal["use", "skip", "refresh"] | None = None
    wait_timeout: float | None = None

    def knobs(self) -> dict[str, Any]:
        """The fields sent beside the OpenAI body (our job fields, and `cache`)."""
        metadata = dict(self.metadata or {})
        if self.run is not None:
            metadata.setdefault("run", self.run)
        values = {
            "priority": self.priority,
            "max_attempts": self.max_attempts,
            "ttl_seconds": self.ttl_seconds,
            "metadata": metadata or None,
            "node": self.node,
            "node_labels": dict(self.node_labels) if self.node_labels else None,
            "cache": self.server_cache,
        }
        return {k: v for k, v in values.items() if v is not None}


def idempotency_key(
    body: Mapping[str, Any],
    knobs: Mapping[str, Any],
    run: str | None,
    rollout: Any = None,
    candidate: int = 0,
) -> str:
    """The key of one request: a hash of the run's name, the endpoint, the OpenAI body
    and the job fields (the server checks all of these on a replay); and, when given,
    DSPy's `rollout_id` and the candidate's index within one call (`n` > 1)."""
    identity: dict[str, Any] = {"run": run, "url": ENDPOINT, "body": body, "knobs": knobs}
    if rollout is not None:
        identity["rollout"] = rollout
    if candidate:
        identity["candidate"] = candidate
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return KEY_PREFIX + hashlib.sha256(canonical.encode()).hexdigest()


def again_key(key: str, failed_job: str) -> str:
    """The key under which a job that failed in an earlier run is submitted again."""
    return KEY_PREFIX + hashlib.sha256(f"{key}|{failed_job}".encode()).hexdigest()


def chat_body(request: lm15.Request) -> dict[str, Any]:
    """The Chat Completions body of a DSPy request, as DSPy's own OpenAI-compatible
    wire writes it (messages, tools, response_format, sampling), with `max_tokens`."""
    wire = lm15.OpenAIChatLM(
        api_key="unused",  # nothing is sent: only the body is built
        base_url="http://unused/v1",
        compat=lm15.OpenAIChatCompat(max_tokens_field="max_tokens"),
    )
    body: dict[str, Any] = json.loads(wire.build_request(request, False).body)
    body.pop("stream", None)
    return body


def lm_error(exc: OpenBeepBoopError) -> Exception:
    """Our client's error as the `dspy.lm15` error DSPy expects from an engine (DSPy
    decides from its class whether to retry)."""
    if isinstance(exc, APIConnectionError):
        transport: Exception = lm15.TransportError(exc.message)
        return transport
    kind: Any = lm15.ProviderError
    extra: dict[str, Any] = {}
    if isinstance(exc, AuthenticationError | PermissionDeniedError):
        kind = lm15.AuthError
    elif isinstance(exc, RateLimitError):
        kind, extra = lm15.RateLimitError, {"retry_after": exc.retry_after}
    elif isinstance(exc, BadRequestError | NotFoundError):
        kind = lm15.InvalidRequestError
    elif isinstance(exc, JobTimeoutError):
        kind = lm15.TimeoutError
    elif isinstance(exc, ServerError):
        kind = lm15.ServerError
    error: Exception = kind(exc.message, provider="openbeepboop", status=exc.status, **extra)
    return error
