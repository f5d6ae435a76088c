"""The Overview page: per model, jobs queued and running, completed and failed in the last
five minutes, live nodes; charts of throughput and queue depth. Live over Server-Sent
Events from the shared sampler (core/dashboard.py): every viewer gets the same rendered
fragment; nothing is read from the store per viewer.

The counts are queue-wide (every key's jobs), as `GET /v1/stats` shows them to any key."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import orjson
from fastapi import Request
from starlette.responses import Response

from openbeepboop.server.core.dashboard import Dashboard, Snapshot
from openbeepboop.server.http.state import app_state
from openbeepboop.server.web.live import event_stream, fragment, sse_event
from openbeepboop.server.web.pages import AnyViewer, page_router, render

router = page_router()
COUNTS = "overview_counts.html"


@router.get("/")
async def overview_page(request: Request, seen: AnyViewer) -> Response:
    dashboard = app_state(request).dashboard
    snap = await dashboard.current()
    context = {"title": "Overview", "snap": snap, "step": dashboard.step}
    return render(request, "overview.html", context, seen)


@router.get("/overview/events")
async def overview_events(request: Request, seen: AnyViewer) -> Response:
    """`history` (the charts' series) once, then per sample `counts` (the counts'
    fragment, HTML) and `points` (the charts' new points, JSON)."""
    return event_stream(_events(request, app_state(request).dashboard))


async def _events(request: Request, dashboard: Dashboard) -> AsyncIterator[bytes]:
    yield sse_event("history", orjson.dumps(dashboard.history()).decode())
    async with contextlib.aclosing(dashboard.watch()) as snaps:
        async for snap in snaps:
            yield _tick(request, snap, dashboard.step)


def _tick(request: Request, snap: Snapshot, step: float) -> bytes:
    """The events of one sample, rendered once for every viewer."""
    cached = snap.memo.get("overview")
    if isinstance(cached, bytes):
        return cached
    points = {
        "throughput": [[b.at, b.completed / step, b.failed / step] for b in snap.buckets],
        "depth": [[d.at, d.queued, d.running] for d in snap.depths],
    }
    out = sse_event("counts", fragment(request, COUNTS, {"snap": snap})) + sse_event(
        "points", orjson.dumps(points).decode()
    )
    snap.memo["overview"] = out
    return out
