"""A fast lane for the hottest calls, in front of FastAPI's per-request machinery.

Routing, dependency solving and body parsing in FastAPI cost more CPU than the queue work
behind a one-job call. `FastLane` (the innermost ASGI middleware) serves the plain, valid
case of these calls itself, with the same models, guards and route functions:

- `POST /internal/queue/fetch` and `POST /internal/queue/submit` (node keys);
- `POST /v1/chat/completions` and `POST /v1/completions` (async with `Prefer:
  respond-async`, synchronous, or streamed) without an `Idempotency-Key` header;
- `POST /v1/jobs` (one job or a bulk submit) without an `Idempotency-Key` header.

Anything it is not sure about (another content type, a body that is not JSON or fails
validation, a missing, bad or wrong-role key) goes on untouched, body and all, to FastAPI,
which answers it exactly as before; nothing has happened by then (authentication and
validation have no side effects; the rate limiter is hit only once the request is
known to be served here). The body is parsed with the standard `json` module, as
Starlette does (orjson reads some inputs differently, e.g. integers beyond 64 bits).
Errors raised while serving get the same responses as the exception handlers give;
anything else propagates to the server-error handler as before.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

from openbeepboop.server.core.auth import KeyRing, require_role
from openbeepboop.server.errors import DomainError
from openbeepboop.server.models import ApiKey, Role
from openbeepboop.server.http import errors, routes_client, routes_node
from openbeepboop.server.http.guards import KeyRateLimiter, _bearer
from openbeepboop.server.http.inbound import (
    ChatCompletionBody,
    CompletionBody,
    FetchBody,
    SubmitResultsBody,
)

ASGIApp = Callable[..., Awaitable[None]]
Serve = Callable[[Request, Any, ApiKey], Awaitable[Response]]


async def _chat(request: Request, body: Any, key: ApiKey) -> Response:
    return await routes_client.chat_completions(
        request, body, key, prefer=request.headers.get("prefer"), idempotency_key=None
    )


async def _completion(request: Request, body: Any, key: ApiKey) -> Response:
    return await routes_client.completions(
        request, body, key, prefer=request.headers.get("prefer"), idempotency_key=None
    )


async def _create_jobs(request: Request, raw: Any, key: ApiKey) -> Response:
    return await routes_client.create_jobs(request, raw, key, idempotency_key=None)


def _no_idempotency_key(request: Request) -> bool:
    return "idempotency-key" not in request.headers


class _NotAnObject(ValueError):
    pass


def _json_object(data: Any) -> dict[str, Any]:
    """What FastAPI makes of a `dict[str, Any]` body: JSON objects only."""
    if not isinstance(data, dict):
        raise _NotAnObject
    return data


class _Lane:
    def __init__(
        self,
        parse: Callable[[Any], Any],
        role: Role,
        serve: Serve,
        when: Callable[[Request], bool] | None = None,
    ) -> None:
        self.parse = parse
        self.role = role
        self.serve = serve
        self.route: Any = None
        self.when = when


def _route(router: Any, path: str) -> Any:
    """The APIRoute FastAPI would match (it names the route in scope["route"])."""
    for route in router.routes:
        if getattr(route, "path", None) == path and "POST" in getattr(route, "methods", ()):
            return route
    raise LookupError(path)


def _lanes() -> dict[str, _Lane]:
    lanes = {
        "/internal/queue/fetch": _Lane(FetchBody.model_validate, Role.NODE, routes_node.fetch),
        "/internal/queue/submit": _Lane(
            SubmitResultsBody.model_validate, Role.NODE, routes_node.submit
        ),
        "/v1/chat/completions": _Lane(
            ChatCompletionBody.model_validate, Role.CLIENT, _chat, when=_no_idempotency_key
        ),
        "/v1/completions": _Lane(
            CompletionBody.model_validate, Role.CLIENT, _completion, when=_no_idempotency_key
        ),
        "/v1/jobs": _Lane(_json_object, Role.CLIENT, _create_jobs, when=_no_idempotency_key),
    }
    for path, lane in lanes.items():
        router = routes_client.router if path.startswith("/v1/") else routes_node.router
        lane.route = _route(router, path)
    return lanes


class FastLane:
    """See the module docstring."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.lanes = _lanes()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        lane = None
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            lane = self.lanes.get(scope["path"])
        if lane is None or not _json_only(scope):
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        if lane.when is not None and not lane.when(request):
            await self.app(scope, receive, send)
            return
        messages, body = await _read_body(receive)
        if body is None or not await self._serve(lane, request, body, scope, send):
            await self.app(scope, _replay(messages, receive), send)

    async def _serve(
        self, lane: _Lane, request: Request, body: bytes, scope: dict[str, Any], send: Any
    ) -> bool:
        state = request.app.state
        keyring: KeyRing = state.keyring
        try:
            key = await keyring.authenticate(_bearer(request))
            require_role(key, lane.role)
            parsed = lane.parse(json.loads(body))  # as Starlette does: orjson differs
        except (DomainError, ValidationError, ValueError):
            return False  # FastAPI gives the canonical answer
        scope["route"] = lane.route
        limiter: KeyRateLimiter = state.rate_limiter
        try:
            limiter.hit(key)
            response = await lane.serve(request, parsed, key)
        except DomainError as exc:
            response = errors.domain_error_response(exc)
        except RequestValidationError as exc:
            response = errors.validation_response(exc)
        await response(scope, request.receive, send)
        return True


def _json_only(scope: dict[str, Any]) -> bool:
    """Exactly one Content-Type, and it is plain JSON (what FastAPI parses as JSON)."""
    found = [v for k, v in scope["headers"] if k == b"content-type"]
    return len(found) == 1 and found[0].lower() in _JSON_TYPES


_JSON_TYPES = (b"application/json", b"application/json; charset=utf-8")


async def _read_body(receive: Any) -> tuple[list[dict[str, Any]], bytes | None]:
    """The messages received and the whole body (None if the stream did not end well)."""
    messages: list[dict[str, Any]] = []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages, None
        if not message.get("more_body", False):
            return messages, b"".join(m.get("body", b"") for m in messages)


def _replay(messages: list[dict[str, Any]], receive: Any) -> Any:
    """A `receive` that hands over the messages already read, then the real stream."""
    pending = list(messages)

    async def replay() -> dict[str, Any]:
        if pending:
            return pending.pop(0)
        message: dict[str, Any] = await receive()
        return message

    return replay
