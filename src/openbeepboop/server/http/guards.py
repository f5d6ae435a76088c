"""Request guards: the body-size cap (ASGI middleware), `authenticate` (key, role, rate
limit: the one check every entry uses), and the FastAPI dependencies that apply it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl

from fastapi import Request
from starlette.exceptions import HTTPException

from openbeepboop.server.core.auth import require_role
from openbeepboop.server.core.sessions import same_token
from openbeepboop.server.errors import PermissionDenied
from openbeepboop.server.http.errors import error_body
from openbeepboop.server.http.state import AppState, app_state
from openbeepboop.server.models import ApiKey, Role

ASGIApp = Callable[..., Awaitable[None]]


class BodyLimit:
    """Refuse bodies over `max_bytes` (or `per_path[path]`) with 413, by header or by
    counting the stream."""

    def __init__(
        self, app: ASGIApp, max_bytes: int, per_path: dict[str, int] | None = None
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.per_path = per_path or {}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.per_path.get(scope["path"], self.max_bytes)
        if self._declared_too_big(scope, limit):
            await self._refuse(send, limit)
            return
        seen = 0
        sent = False

        async def counting_receive() -> dict[str, Any]:
            nonlocal seen
            message: dict[str, Any] = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge(limit)
            return message

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal sent
            if message["type"] == "http.response.start":
                sent = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not sent:
                await self._refuse(send, limit)

    def _declared_too_big(self, scope: dict[str, Any], limit: int) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    return int(value) > limit
                except ValueError:
                    return False
        return False

    async def _refuse(self, send: Any, limit: int) -> None:
        body = error_body(
            f"request body is larger than the limit of {limit} bytes",
            "invalid_request_error",
            "request_too_large",
            None,
        )
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


class StorableUrl:
    """Refuse a URL whose path or query holds a NUL (`%00`): no store can keep or look up
    such an id (the other unstorable strings, lone surrogates, cannot come out of a URL:
    it is read as UTF-8 with replacement characters)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            param = _nul_in_url(scope)
            if param is not None:
                await _refuse_url(scope, send, param)
                return
        await self.app(scope, receive, send)


def _nul_in_url(scope: dict[str, Any]) -> str | None:
    """Where a NUL sits in the URL: `path`, a query parameter's name, or None."""
    if "\x00" in scope["path"]:
        return "path"
    query: bytes = scope.get("query_string", b"")
    if b"%00" not in query:
        return None
    for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if "\x00" in name or "\x00" in value:
            return name.replace("\x00", "") or "query"
    return "query"


async def _refuse_url(scope: dict[str, Any], send: Any, param: str) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    body = error_body(
        f"invalid value for '{param}': the URL holds a NUL character (%00), which cannot be stored",
        "invalid_request_error",
        "invalid_string",
        param,
    )
    await send(
        {
            "type": "http.response.start",
            "status": 400,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


class _TooLarge(HTTPException):
    """Raised while the app reads an over-long streamed body. An HTTPException, because
    FastAPI turns any other error met while reading the body into a bare 400."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"request body is larger than the limit of {max_bytes} bytes")


def bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


async def authenticate(state: AppState, secret: str | None, *roles: Role) -> ApiKey:
    """The key behind `secret` if it may act in one of `roles` (an admin key always may),
    counted against its rate limit: the one check of the routes, the fast lane and the
    WebSocket. AuthenticationFailed and PermissionDenied come before the count,
    RateLimited after it."""
    key = await state.keyring.authenticate(secret)
    require_role(key, *roles)
    await state.rate_limiter.hit(key)
    return key


SESSION_COOKIE = "obb_session"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


async def session_key(request: Request, *roles: Role) -> ApiKey:
    """The key behind the web interface's session cookie, in one of `roles`, counted
    against its rate limit. A call that changes something must also carry the session's
    CSRF token in `X-CSRF-Token` (the pages' scripts send it)."""
    state = app_state(request)
    key, session = await state.sessions.resolve(request.cookies.get(SESSION_COOKIE))
    if request.method not in SAFE_METHODS and not same_token(
        request.headers.get(CSRF_HEADER), session.csrf
    ):
        raise PermissionDenied(
            "a call with the session cookie must carry the session's token in 'X-CSRF-Token'",
            code="csrf_failed",
        )
    require_role(key, *roles)
    await state.rate_limiter.hit(key)
    return key


def _key_of(request: Request, *roles: Role) -> Awaitable[ApiKey]:
    """The key of an `Authorization: Bearer` header, else of the session cookie."""
    secret = bearer(request.headers.get("authorization"))
    if secret is None and SESSION_COOKIE in request.cookies:
        return session_key(request, *roles)
    return authenticate(app_state(request), secret, *roles)


async def client_key(request: Request) -> ApiKey:
    """A client (or admin) key."""
    return await _key_of(request, Role.CLIENT)


async def node_key(request: Request) -> ApiKey:
    """A node (or admin) key."""
    return await _key_of(request, Role.NODE)


async def any_key(request: Request) -> ApiKey:
    """Any valid key."""
    return await _key_of(request, Role.CLIENT, Role.NODE)


async def admin_key(request: Request) -> ApiKey:
    """An admin key."""
    return await _key_of(request, Role.ADMIN)
