"""The Batches page (to be built)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from openbeepboop.server.web.pages import AnyViewer, render

router = APIRouter(include_in_schema=False)


@router.get("/batches")
async def batches_page(request: Request, seen: AnyViewer) -> Response:
    return render(request, "batches.html", {"title": "Batches"}, seen)
