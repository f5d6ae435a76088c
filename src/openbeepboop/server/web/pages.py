"""What every page shares: the templates, the viewer (the key behind the session
cookie), the loopback gate, CSRF-checked forms, and the security headers of a page."""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from starlette.datastructures import FormData
from starlette.responses import HTMLResponse, Response
from starlette.templating import Jinja2Templates

from openbeepboop import __version__
from openbeepboop.server.core.sessions import same_token
from openbeepboop.server.errors import AuthenticationFailed, NotFound, PermissionDenied
from openbeepboop.server.http.guards import SESSION_COOKIE
from openbeepboop.server.http.state import app_state
from openbeepboop.server.models import ApiKey, Role, WebSession

# Scripts only from this server (no inline script, no eval); styles may be set inline by
# the chart library; the API and event streams are same-origin.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; "
        "base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
CSRF_FIELD = "csrf_token"
WEB_TAG = "web"  # the tag of every page's route: their errors answer as pages (site.py)


def page_router() -> APIRouter:
    """A router of pages: not in the OpenAPI document (they are not the API), tagged
    so that their errors answer as pages."""
    return APIRouter(include_in_schema=False, tags=[WEB_TAG])


def web_dir() -> Path:
    """The package folder holding `templates/` and `static/`."""
    return Path(str(resources.files("openbeepboop.server.web")))


def make_templates() -> Jinja2Templates:
    """The page templates, autoescaped, with the filters the pages use."""
    templates = Jinja2Templates(directory=web_dir() / "templates")
    templates.env.filters["ago"] = ago
    templates.env.filters["when"] = when
    templates.env.globals["version"] = __version__
    return templates


def ago(ts: float | None, now: float | None = None) -> str:
    """'12 s ago', '3 min ago', '2 h ago', '4 d ago' ('' for None)."""
    if ts is None:
        return ""
    seconds = max(0.0, (time.time() if now is None else now) - ts)
    for unit, size in (("d", 86_400), ("h", 3_600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return f"{int(seconds)} s ago"


def when(ts: float | None) -> str:
    """An ISO-8601 UTC time to the second ('' for None)."""
    if ts is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) + "Z"


class LoginNeeded(Exception):
    """A page asked for without a live session: the handler sends the browser to /login."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


@dataclass(frozen=True, slots=True)
class Viewer:
    """Who is looking: the key behind the session, and the session (its CSRF token)."""

    key: ApiKey
    session: WebSession

    @property
    def admin(self) -> bool:
        return self.key.role is Role.ADMIN

    @property
    def owner(self) -> str | None:
        """Whose jobs and batches this viewer sees: its own, or everyone's (admin)."""
        return None if self.admin else self.key.id

    @property
    def csrf(self) -> str:
        return self.session.csrf


def check_reach(request: Request) -> None:
    """404 for a browser off this machine when the interface is loopback-only."""
    if app_state(request).settings.web_ui != "loopback":
        return
    host = request.client.host if request.client else ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise NotFound("the web interface answers only on this machine (web_ui = loopback)")


async def viewer(request: Request) -> Viewer:
    """The viewer of a page; LoginNeeded without a live session (or with a node key)."""
    check_reach(request)
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    try:
        key, session = await app_state(request).sessions.resolve(
            request.cookies.get(SESSION_COOKIE)
        )
    except AuthenticationFailed:
        raise LoginNeeded(here) from None
    if key.role is Role.NODE:
        raise LoginNeeded(here)
    return Viewer(key=key, session=session)


async def admin_viewer(request: Request) -> Viewer:
    """The viewer of an admin page: 403 for a client key."""
    seen = await viewer(request)
    if not seen.admin:
        raise PermissionDenied("this page is for admin keys")
    return seen


AnyViewer = Annotated[Viewer, Depends(viewer)]
AdminViewer = Annotated[Viewer, Depends(admin_viewer)]


async def checked_form(request: Request, seen: Viewer) -> FormData:
    """The posted form, once its CSRF token (field or `X-CSRF-Token` header) matches the
    session's; PermissionDenied otherwise."""
    form = await request.form()
    given = form.get(CSRF_FIELD)
    token = given if isinstance(given, str) else request.headers.get("x-csrf-token")
    if not same_token(token, seen.csrf):
        raise PermissionDenied("the form's CSRF token does not match this session; reload")
    return form


def render(
    request: Request,
    name: str,
    context: dict[str, Any],
    seen: Viewer | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    """A page (or an htmx fragment) from a template, with the security headers."""
    templates: Jinja2Templates = request.app.state.web_templates
    full = {"viewer": seen, "csrf": seen.csrf if seen else "", "path": request.url.path}
    response = templates.TemplateResponse(
        request, name, {**full, **context}, status_code=status_code
    )
    response.headers.update(SECURITY_HEADERS)
    return response


def secure_headers(response: Response) -> Response:
    """The security headers on a response that is not a template (a redirect, a stream)."""
    response.headers.update(SECURITY_HEADERS)
    return response


def login_url(next_path: str) -> str:
    return "/login?next=" + quote(next_path, safe="/")
