"""Logging in and out of the web interface: an API key for a session cookie."""

from __future__ import annotations

import secrets

from fastapi import Request
from starlette.responses import RedirectResponse, Response

from openbeepboop.server.core.sessions import same_token
from openbeepboop.server.errors import AuthenticationFailed
from openbeepboop.server.http.guards import SESSION_COOKIE
from openbeepboop.server.http.state import app_state
from openbeepboop.server.models import Role
from openbeepboop.server.web.pages import (
    CSRF_FIELD,
    AnyViewer,
    check_reach,
    checked_form,
    page_router,
    render,
    secure_headers,
)

router = page_router()
LOGIN_COOKIE = "obb_login_csrf"  # the login form's own CSRF token (double submit)


def safe_next(value: object) -> str:
    """Where to go after logging in: a path on this server, else the overview."""
    if not isinstance(value, str) or not value.startswith("/") or value.startswith("//"):
        return "/"
    return "/" if any(c in value for c in "\\\r\n") else value


def _login_page(request: Request, error: str = "", status_code: int = 200) -> Response:
    token = secrets.token_urlsafe(24)
    response = render(
        request,
        "login.html",
        {
            "title": "Log in",
            "login_csrf": token,
            "next": safe_next(request.query_params.get("next")),
            "error": error,
        },
        status_code=status_code,
    )
    response.set_cookie(
        LOGIN_COOKIE,
        token,
        max_age=3600,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/login",
    )
    return response


@router.get("/login")
async def login_form(request: Request) -> Response:
    check_reach(request)
    return _login_page(request)


@router.post("/login")
async def login(request: Request) -> Response:
    check_reach(request)
    form = await request.form()
    token = form.get(CSRF_FIELD)
    if not same_token(
        token if isinstance(token, str) else None, request.cookies.get(LOGIN_COOKIE, "")
    ) or not request.cookies.get(LOGIN_COOKIE):
        return _login_page(request, "The form expired: try again.", 403)
    secret = form.get("api_key")
    if not isinstance(secret, str) or not secret.strip():
        return _login_page(request, "Paste an API key (obb_client_… or obb_admin_…).", 400)
    state = app_state(request)
    try:
        done = await state.sessions.login(secret)
    except AuthenticationFailed as exc:
        return _login_page(request, f"{exc}.", 401)
    if done.key.role is Role.NODE:
        await state.sessions.logout(done.token)
        return _login_page(request, "A node key cannot log in: use a client or admin key.", 403)
    response = RedirectResponse(safe_next(form.get("next")), status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        done.token,
        max_age=int(state.settings.web_session_seconds),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    response.delete_cookie(LOGIN_COOKIE, path="/login")
    return secure_headers(response)


@router.post("/logout")
async def logout(request: Request, seen: AnyViewer) -> Response:
    await checked_form(request, seen)
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        await app_state(request).sessions.logout(token)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return secure_headers(response)
