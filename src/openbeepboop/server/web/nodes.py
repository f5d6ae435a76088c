"""The Nodes page: every live node with its labels, models and their states (download
and loading progress as heartbeats report them), load, tokens/s, running jobs, last
heartbeat, version and hardware. Live over Server-Sent Events from the shared sampler
(core/dashboard.py), like the Overview: one rendered fragment per sample for every
viewer. Any logged-in key sees the nodes, as `GET /v1/nodes` shows them to any key."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from starlette.responses import Response

from openbeepboop.server.core.dashboard import Dashboard, Snapshot
from openbeepboop.server.core.node_events import model_states
from openbeepboop.server.http.state import app_state
from openbeepboop.server.models import Node
from openbeepboop.server.web.live import event_stream, fragment, sse_event
from openbeepboop.server.web.pages import AnyViewer, page_router, render

router = page_router()
LIST = "nodes_list.html"


@router.get("/nodes")
async def nodes_page(request: Request, seen: AnyViewer) -> Response:
    snap = await app_state(request).dashboard.current()
    context = {"title": "Nodes", "nodes": [node_view(n) for n in snap.nodes]}
    return render(request, "nodes.html", context, seen)


@router.get("/nodes/events")
async def nodes_events(request: Request, seen: AnyViewer) -> Response:
    """Per sample, `nodes`: the list of nodes (an HTML fragment htmx swaps in)."""
    return event_stream(_events(request, app_state(request).dashboard))


async def _events(request: Request, dashboard: Dashboard) -> AsyncIterator[bytes]:
    async with contextlib.aclosing(dashboard.watch()) as snaps:
        async for snap in snaps:
            yield _tick(request, snap)


def _tick(request: Request, snap: Snapshot) -> bytes:
    cached = snap.memo.get("nodes")
    if isinstance(cached, bytes):
        return cached
    nodes = [node_view(n) for n in snap.nodes]
    out = sse_event("nodes", fragment(request, LIST, {"nodes": nodes}))
    snap.memo["nodes"] = out
    return out


def node_view(node: Node) -> dict[str, Any]:
    """What the page shows of a node; its heartbeat's stats are the node's word, so each
    one is checked for its type (a missing or odd one is left out)."""
    stats = node.stats or {}
    models = [_model_view(name, m) for name, m in model_states(node).items()]
    return {
        "id": node.id,
        "name": node.name,
        "labels": sorted(node.labels.items()),
        "version": node.version,
        "last_seen": node.last_seen,
        "capacity": node.capacity,
        "load": _number(stats.get("load")),
        "running": _number(stats.get("running")),
        "tokens_per_second": _number(stats.get("tokens_per_second")),
        "completed": _number(stats.get("completed")),
        "failed": _number(stats.get("failed")),
        "outbox": _number(stats.get("outbox")),
        "models": models,
        "hardware": hardware_view(node.hardware or {}),
    }


def _model_view(name: str, model: dict[str, Any]) -> dict[str, Any]:
    state = str(model.get("state") or "ready")
    progress = _number(model.get("progress"))
    return {
        "name": name,
        "state": state,
        "progress": progress if state in ("downloading", "loading") else None,
        "backend": str(model.get("backend") or ""),
        "concurrency": _number(model.get("concurrency")),
        "error": str(model.get("error") or ""),
    }


def hardware_view(hw: dict[str, Any]) -> list[tuple[str, str]]:
    """The hardware a node registered with, as (label, text) pairs."""
    out: list[tuple[str, str]] = []
    if hw.get("cpu"):
        cpus = _number(hw.get("cpus"))
        out.append(("CPU", f"{hw['cpu']}" + (f", {cpus:g} CPUs" if cpus else "")))
    ram = _number(hw.get("ram_bytes"))
    if ram:
        out.append(("RAM", _gib(ram)))
    gpus = hw.get("gpus")
    if isinstance(gpus, list):
        for gpu in gpus:
            if isinstance(gpu, dict):
                memory = _number(gpu.get("memory_bytes"))
                text = f"{gpu.get('name', 'GPU')}" + (f" ({_gib(memory)})" if memory else "")
                out.append(("GPU", text))
    if hw.get("platform"):
        out.append(("OS", str(hw["platform"])))
    return out


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)
