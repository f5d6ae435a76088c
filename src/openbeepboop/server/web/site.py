"""`install(app, settings)`: the web interface's pages and static files on an app."""

from __future__ import annotations

from fastapi import FastAPI, Request
from starlette.responses import RedirectResponse, Response
from starlette.staticfiles import StaticFiles

from openbeepboop.server.settings import ServerSettings
from openbeepboop.server.web import batches, chat, jobs, keys, login, nodes, overview
from openbeepboop.server.web.pages import LoginNeeded, login_url, make_templates, web_dir


def install(app: FastAPI, settings: ServerSettings) -> None:
    """Add the pages at `/` and the static files at `/static` (nothing when `web_ui` is
    off). Their routes are not in the OpenAPI document: they are not the API."""
    if settings.web_ui == "off":
        return
    app.state.web_templates = make_templates()
    app.mount("/static", StaticFiles(directory=web_dir() / "static"), name="static")
    for module in (login, overview, nodes, jobs, batches, chat, keys):
        app.include_router(module.router)
    app.add_exception_handler(LoginNeeded, _to_login)


async def _to_login(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LoginNeeded)
    if request.headers.get("hx-request"):  # an htmx fragment: reload the whole page there
        return Response(status_code=401, headers={"HX-Redirect": login_url(exc.next_path)})
    return RedirectResponse(login_url(exc.next_path), status_code=303)
