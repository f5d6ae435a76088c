"""Server-Sent Events for the live pages: one event's bytes, and the streaming response
(the pages' security headers, no buffering by a proxy)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from starlette.responses import StreamingResponse

from openbeepboop.server.web.pages import SECURITY_HEADERS


def sse_event(name: str, data: str) -> bytes:
    """One SSE event: `event: name` and its data, one `data:` line per line."""
    lines = "".join(f"data: {line}\n" for line in data.split("\n"))
    return f"event: {name}\n{lines}\n".encode()


def fragment(request: Request, template: str, context: dict[str, Any]) -> str:
    """A template rendered to a string (autoescaped, the pages' filters), for an event."""
    env = request.app.state.web_templates.env
    text: str = env.get_template(template).render(context)
    return text.strip()


def event_stream(events: AsyncIterator[bytes]) -> StreamingResponse:
    """The response carrying `events`: `text/event-stream`, never cached or buffered."""
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={**SECURITY_HEADERS, "X-Accel-Buffering": "no"},
    )
