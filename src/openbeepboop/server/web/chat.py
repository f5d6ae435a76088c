"""The Chat page (to be built)."""

from __future__ import annotations

from fastapi import Request
from starlette.responses import Response

from openbeepboop.server.web.pages import AnyViewer, page_router, render

# the tag site.py looks for to answer errors as pages (FastAPI 0.165 hands the handler
# the route as declared here, without the tags include_router added)
router = page_router()


@router.get("/chat")
async def chat_page(request: Request, seen: AnyViewer) -> Response:
    return render(request, "chat.html", {"title": "Chat"}, seen)
