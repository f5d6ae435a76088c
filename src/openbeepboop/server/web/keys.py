"""The Keys page (to be built)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from openbeepboop.server.web.pages import AdminViewer, render

router = APIRouter(include_in_schema=False)


@router.get("/keys")
async def keys_page(request: Request, seen: AdminViewer) -> Response:
    return render(request, "keys.html", {"title": "Keys"}, seen)
