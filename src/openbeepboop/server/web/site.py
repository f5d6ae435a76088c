"""`install(app, settings)`: the web interface's pages and static files on an app."""

from __future__ import annotations

import inspect
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.responses import RedirectResponse, Response
from starlette.staticfiles import StaticFiles

from openbeepboop.server import errors as e
from openbeepboop.server.http.errors import STATUS
from openbeepboop.server.settings import ServerSettings
from openbeepboop.server.web import batches, chat, jobs, keys, login, nodes, overview, swarm
from openbeepboop.server.web.pages import (
    WEB_TAG,
    LoginNeeded,
    login_url,
    make_templates,
    render,
    web_dir,
)


def install(app: FastAPI, settings: ServerSettings) -> None:
    """Add the pages at `/` and the static files at `/static` (nothing when `web_ui` is
    off). Their routes are not in the OpenAPI document: they are not the API."""
    if settings.web_ui == "off":
        return
    app.state.web_templates = make_templates()
    app.state.web_swarm_feed = swarm.SwarmFeed()
    app.mount("/static", StaticFiles(directory=web_dir() / "static"), name="static")
    for module in (login, overview, nodes, swarm, jobs, batches, chat, keys):
        app.include_router(module.router)
    app.add_exception_handler(LoginNeeded, _to_login)
    _errors_as_pages(app)


async def _to_login(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LoginNeeded)
    if request.headers.get("hx-request"):  # an htmx fragment: reload the whole page there
        return Response(status_code=401, headers={"HX-Redirect": login_url(exc.next_path)})
    return RedirectResponse(login_url(exc.next_path), status_code=303)


def _is_page(request: Request) -> bool:
    route = request.scope.get("route")
    return WEB_TAG in (getattr(route, "tags", None) or ())


def _errors_as_pages(app: FastAPI) -> None:
    """A page's domain error (a job that is not yours, a bad filter) answers as a page
    with the message and the status; the API's errors keep OpenAI's shape."""
    api_domain = app.exception_handlers[e.DomainError]
    api_validation = app.exception_handlers[RequestValidationError]

    async def on_domain(request: Request, exc: Exception) -> Response:
        if not _is_page(request) or not isinstance(exc, e.DomainError):
            return await _delegate(api_domain, request, exc)
        status = STATUS.get(type(exc), (500, ""))[0]
        return _error_page(request, status, exc.message)

    async def on_validation(request: Request, exc: Exception) -> Response:
        if not _is_page(request) or not isinstance(exc, RequestValidationError):
            return await _delegate(api_validation, request, exc)
        first = (exc.errors() or [{}])[0]
        where = ".".join(str(p) for p in first.get("loc", ())[1:])
        message = f"invalid value for '{where}': {first.get('msg', 'invalid value')}"
        return _error_page(request, 400, message)

    app.add_exception_handler(e.DomainError, on_domain)
    app.add_exception_handler(RequestValidationError, on_validation)


async def _delegate(handler: Any, request: Request, exc: Exception) -> Response:
    out = handler(request, exc)
    answer: Response = await out if inspect.isawaitable(out) else out
    return answer


def _error_page(request: Request, status: int, message: str) -> Response:
    if request.headers.get("hx-request"):  # an htmx swap shows the message in place
        return render(request, "error_fragment.html", {"message": message}, None, status)
    return render(
        request,
        "error.html",
        {"title": f"Error {status}", "status": status, "message": message},
        None,
        status,
    )
