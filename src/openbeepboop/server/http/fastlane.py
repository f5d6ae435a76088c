"""A fast lane for the hottest calls, in front of FastAPI's per-request machinery.

Routing, dependency solving and body parsing in FastAPI cost more CPU than the queue work
behind a one-job call. `FastLane` (the innermost ASGI middleware) serves the plain, valid
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
agree, see `parse_json`). An error raised while
serving is answered by the app's own exception handler for it; anything without one
propagates to the server-error handler, as from a route.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import APIRouter
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from openbeepboop.server.errors import AuthenticationFailed, PermissionDenied
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

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        lane = None
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            lane = self.lanes.get(scope["path"])
        if lane is None or not _json_only(scope, lane):
            await self.app(scope, receive, send)
            return
        messages, body = await _read_body(receive)
        if body is None or not await self._serve(lane, Request(scope, receive), body, send):
            await self.app(scope, _replay(messages, receive), send)

    async def _serve(self, lane: Lane, request: Request, body: bytes, send: Any) -> bool:
        try:
            parsed = lane.parse(parse_json(body))
        except (ValidationError, ValueError):
            return False  # FastAPI gives the canonical answer
        secret = bearer(request.headers.get("authorization"))
        try:
            key = await authenticate(self.state, secret, lane.role)
        except (AuthenticationFailed, PermissionDenied):
            return False  # as for a bad body: nothing was counted or done
        except Exception as exc:
            return await self._answer(request, exc, send)
        request.scope["route"] = lane.route
        try:
            response = await lane.serve(request, parsed, key)
        except Exception as exc:
            return await self._answer(request, exc, send)
        await response(request.scope, request.receive, send)
        return True

    async def _answer(self, request: Request, exc: Exception, send: Any) -> bool:
        """Answer `exc` as the app's exception handler for it would."""
        handler = _handler(request, exc)
        if handler is None:
            raise exc
        response = await handler(request, exc)
        await response(request.scope, request.receive, send)
        return True


def parse_json(body: bytes) -> Any:
    """The body exactly as Starlette's `json.loads` reads it, with orjson (4x faster)
    where the two agree. orjson refuses most of what they read differently (NaN and
    Infinity, lone surrogates, UTF-16 bodies, overflowing floats); the one thing it reads
    differently, an integer beyond 64 bits (as a float), needs 19 digits in a row, and a
    body with such a run goes to `json.loads`."""
    if _LONG_DIGITS.search(body) is None:
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
    return json.loads(body)


def _handler(request: Request, exc: Exception) -> Any:
    """The app's exception handler for `exc` (by class, nearest first), short of the
    catch-all for `Exception`, which answers from the outermost middleware."""
    handlers = request.app.exception_handlers
    for cls in type(exc).__mro__:
        if cls is Exception:
            return None
        if cls in handlers:
            return handlers[cls]
    return None


def _json_only(scope: dict[str, Any], lane: Lane) -> bool:
    """Exactly one Content-Type, and it is plain JSON (what FastAPI parses as JSON); and
    no Idempotency-Key where the route would read one."""
    content_types = 0
    json_type = False
    for name, value in scope["headers"]:
        if name == b"content-type":
            content_types += 1
            json_type = value.lower() in _JSON_TYPES
        elif name == b"idempotency-key" and "idempotency_key" in lane.headers:
            return False
    return content_types == 1 and json_type


_JSON_TYPES = (b"application/json", b"application/json; charset=utf-8")
_LONG_DIGITS = re.compile(rb"\d{19}")


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
