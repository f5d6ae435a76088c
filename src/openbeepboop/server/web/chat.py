"""The Chat page (to be built)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from openbeepboop.server.web.pages import AnyViewer, render

# the tag site.py looks for to answer errors as pages (FastAPI 0.165 hands the handler
# the route as declared here, without the tags include_router added)
router = APIRouter(include_in_schema=False, tags=["web"])


@router.get("/chat")
async def chat_page(request: Request, seen: AnyViewer) -> Response:
    return render(request, "chat.html", {"title": "Chat"}, seen)
