"""A fast lane for the hottest calls, in front of FastAPI's per-request machinery.

Routing, dependency solving, middleware and body parsing in FastAPI cost more CPU than the
queue work behind a one-job call. `FastLane` serves the plain, valid
case of these calls itself, by calling the same route functions with what FastAPI would
have given them:

- `POST /internal/queue/fetch` and `POST /internal/queue/submit` (node keys);
- `POST /v1/chat/completions` and `POST /v1/completions` (async with `Prefer:
  respond-async`, synchronous, or streamed) without an `Idempotency-Key` header;
- `POST /v1/jobs` (one job or a bulk submit) without an `Idempotency-Key` header.

It cannot drift from the routes: `lanes(routers)` reads each route's declared parameters
when the app is built (the body model it validates, the guard that authenticates, the
headers it reads) and refuses to build the app when a route declares anything the lane
does not supply. The lane then validates the body with the route's own model and
authenticates with the same `authenticate()` as the guard.

Anything it is not sure about (another content type, a body that is not JSON or fails
validation, a missing, bad or wrong-role key) goes on untouched, body and all, to FastAPI,
which answers it exactly as before; nothing has happened by then (validation and a
refused key have no side effects: the rate limiter counts a key only once it is known
good). The body is parsed as Starlette parses it (`json.loads`; orjson where the two
agree, see `parse_json`), and held to the same limits (bodies.py: `read_json`).

It sits in front of the app's whole middleware stack (`QueueApp`), and does for the calls
it serves what that stack would: counts them in the app's metrics, leaves a body over
`max_body_bytes` to the stack (which refuses it), answers an error with the app's own
exception handler for it, and an unexpected one with the catch-all's 500, re-raised.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from openbeepboop.server.errors import AuthenticationFailed, InvalidRequest, PermissionDenied
from openbeepboop.server.http.bodies import read_json
from openbeepboop.server.http.guards import authenticate, bearer, client_key, node_key
from openbeepboop.server.http.state import AppState
from openbeepboop.server.models import Role

ASGIApp = Callable[..., Awaitable[None]]
SERVED = (
    "/internal/queue/fetch",
    "/internal/queue/submit",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/jobs",
)
GUARDS = {client_key: Role.CLIENT, node_key: Role.NODE}
# headers a lane supplies: Prefer as sent; the lane serves only calls without an
# Idempotency-Key (FastAPI validates that one), so it passes None
HEADERS = {"prefer", "idempotency_key"}


@dataclass(frozen=True, slots=True)
class Lane:
    """How to serve one route: its body parser, role and parameter names."""

    route: APIRoute
    parse: Callable[[Any], Any]
    role: Role
    request_name: str | None
    body_name: str
    key_name: str
    headers: frozenset[str]

    async def serve(self, request: Request, body: Any, key: Any) -> Response:
        kwargs: dict[str, Any] = {self.body_name: body, self.key_name: key}
        if self.request_name is not None:
            kwargs[self.request_name] = request
        if "prefer" in self.headers:
            kwargs["prefer"] = request.headers.get("prefer")
        if "idempotency_key" in self.headers:
            kwargs["idempotency_key"] = None
        response: Response = await self.route.endpoint(**kwargs)
        return response


class LaneMismatch(RuntimeError):
    """A route the lane serves declares something the lane does not supply."""


def lanes(routers: Sequence[APIRouter]) -> dict[str, Lane]:
    """A lane for each served route, found among `routers` (as declared: include them
    without extra dependencies); LaneMismatch when a route cannot be served (the app must
    not start with a lane that would call it wrongly)."""
    found: dict[str, Lane] = {}
    for path in SERVED:
        routes = [
            r
            for router in routers
            for r in router.routes
            if isinstance(r, APIRoute) and r.path == path and "POST" in (r.methods or ())
        ]
        if len(routes) != 1:
            raise LaneMismatch(f"the fast lane needs exactly one POST {path} route")
        found[path] = _lane(routes[0])
    return found


def _lane(route: APIRoute) -> Lane:
    d: Dependant = route.dependant
    where = f"POST {route.path} ({route.endpoint.__name__})"
    extra = [p.name for p in (*d.path_params, *d.query_params, *d.cookie_params)]
    extra += [p.name for p in d.header_params if p.name not in HEADERS]
    if extra or d.background_tasks_param_name or d.response_param_name:
        raise LaneMismatch(f"{where} declares parameters the fast lane does not supply")
    if len(d.body_params) != 1 or len(d.dependencies) != 1:
        raise LaneMismatch(f"{where} must take one body and one key guard for the fast lane")
    [body], [guard] = d.body_params, d.dependencies
    if guard.call not in GUARDS or guard.name is None or guard.dependencies:
        raise LaneMismatch(f"{where}: the fast lane knows only the client and node key guards")
    return Lane(
        route=route,
        parse=_parser(body.field_info.annotation, where),
        role=GUARDS[guard.call],
        request_name=d.request_param_name,
        body_name=body.name,
        key_name=guard.name,
        headers=frozenset(p.name for p in d.header_params),
    )


def _parser(annotation: Any, where: str) -> Callable[[Any], Any]:
    """The validation FastAPI applies to a body of this type (a model or a JSON object)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation.model_validate
    if getattr(annotation, "__origin__", None) is dict:
        return _json_object
    raise LaneMismatch(f"{where}: the fast lane cannot validate a body of type {annotation}")


class _NotAnObject(ValueError):
    pass


def _json_object(data: Any) -> dict[str, Any]:
    """What FastAPI makes of a `dict[str, Any]` body: JSON objects only."""
    if not isinstance(data, dict):
        raise _NotAnObject
    return data


class FastLane:
    """See the module docstring."""

    def __init__(self, app: ASGIApp, lanes: dict[str, Lane], state: AppState) -> None:
        self.app = app
        self.lanes = lanes
        self.state = state
        self.max_bytes = state.settings.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        lane = None
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            lane = self.lanes.get(scope["path"])
        if lane is None or not _plain(scope, lane, self.max_bytes):
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        messages, body = await _read_body(receive, self.max_bytes)
        status: int | None = 500  # if serving raises, as the metrics middleware counts it
        try:
            if body is None:
                status = None
            else:
                status = await self._serve(lane, Request(scope, receive), body, send)
        finally:
            if status is not None:
                elapsed = time.perf_counter() - start
                self.state.metrics.observe("POST", lane.route.path, status, elapsed)
        if status is None:
            await self.app(scope, _replay(messages, receive), send)

    async def _serve(self, lane: Lane, request: Request, body: bytes, send: Any) -> int | None:
        """The status answered, or None when FastAPI is to answer instead."""
        try:
            parsed = lane.parse(read_json(body))
        except (ValidationError, ValueError, InvalidRequest):
            return None  # FastAPI gives the canonical answer
        secret = bearer(request.headers.get("authorization"))
        try:
            key = await authenticate(self.state, secret, lane.role)
        except (AuthenticationFailed, PermissionDenied):
            return None  # as for a bad body: nothing was counted or done
        except Exception as exc:
            response = await self._on_error(request, exc, send)
        else:
            request.scope["route"] = lane.route
            try:
                response = await lane.serve(request, parsed, key)
            except Exception as exc:
                response = await self._on_error(request, exc, send)
        await response(request.scope, request.receive, send)
        return response.status_code

    async def _on_error(self, request: Request, exc: Exception, send: Any) -> Response:
        """The response of the app's exception handler for `exc`. With none but the
        catch-all, that one's answer is sent and `exc` raised, as Starlette's
        ServerErrorMiddleware does (the server then logs it)."""
        handlers = request.app.exception_handlers
        handler = next((handlers[c] for c in type(exc).__mro__ if c in handlers), None)
        if handler is None or handler is handlers.get(Exception):
            if handler is not None:
                crashed: Response = await handler(request, exc)
                await crashed(request.scope, request.receive, send)
            raise exc
        response: Response = await handler(request, exc)
        return response


def _plain(scope: Scope, lane: Lane, max_bytes: int) -> bool:
    """Exactly one Content-Type, and it is plain JSON (what FastAPI parses as JSON); no
    Idempotency-Key where the route would read one; no declared length over the limit."""
    content_types = 0
    json_type = False
    for name, value in scope["headers"]:
        if name == b"content-type":
            content_types += 1
            json_type = value.lower() in _JSON_TYPES
        elif name == b"idempotency-key":
            if "idempotency_key" in lane.headers:
                return False
        elif name == b"content-length" and not (value.isdigit() and int(value) <= max_bytes):
            return False
    return content_types == 1 and json_type


_JSON_TYPES = (b"application/json", b"application/json; charset=utf-8")


async def _read_body(receive: Any, max_bytes: int) -> tuple[list[dict[str, Any]], bytes | None]:
    """The messages received and the whole body (None if the stream did not end well, or
    went past `max_bytes`: the app's own body limit then answers)."""
    messages: list[dict[str, Any]] = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages, None
        size += len(message.get("body", b""))
        if size > max_bytes:
            return messages, None
        if not message.get("more_body", False):
            if len(messages) == 1:
                return messages, message.get("body", b"")
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
