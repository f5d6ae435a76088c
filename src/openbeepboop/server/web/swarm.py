"""The Swarm page: this server's DHT node (its id, the swarm's fingerprint, routing table,
records seen, what it refused), every live member with its load and models, and the DHT
peers, live over Server-Sent Events. All of it is this server's view in memory
(`SwarmMember.status()`, what `GET /dht/status` answers): nothing is read from the store.
The fragment is rendered at most once per step for every viewer (`SwarmFeed`).

Any logged-in key sees it, as `GET /dht/status` shows it to any key: a member's record
holds nothing secret (docs/swarm.md)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from fastapi import Request
from starlette.responses import Response

from openbeepboop.server.errors import NotFound
from openbeepboop.server.http.state import AppState, app_state
from openbeepboop.server.web.live import event_stream, fragment, sse_event
from openbeepboop.server.web.pages import AnyViewer, page_router, render

router = page_router()
LIVE = "swarm_live.html"
STEP = 2.0  # seconds between two renderings of the live part
PEER_ID_CHARS = 16


class SwarmFeed:
    """The live part as one SSE event per step, shared by every viewer: whoever asks first
    in a step renders it, the others get the same bytes. Viewers wake on the step's
    boundaries (`next_step`), so they all ask in the same step."""

    def __init__(self, step: float = STEP, clock: Callable[[], float] = time.monotonic) -> None:
        self.step = step
        self._clock = clock
        self._at = -1
        self._event = b""

    def event(self, make: Callable[[], bytes]) -> bytes:
        at = int(self._clock() // self.step)
        if at != self._at:
            self._event, self._at = make(), at
        return self._event

    async def next_step(self) -> None:
        await asyncio.sleep(self.step - self._clock() % self.step)


@router.get("/swarm")
async def swarm_page(request: Request, seen: AnyViewer) -> Response:
    swarm = app_state(request).swarm
    view = None if swarm is None else swarm_view(swarm.status())
    context = {"title": "Swarm", "swarm": view, "step": STEP}
    return render(request, "swarm.html", context, seen)


@router.get("/swarm/events")
async def swarm_events(request: Request, seen: AnyViewer) -> Response:
    """Every step, `swarm`: the page's live part (an HTML fragment htmx swaps in)."""
    state = app_state(request)
    if state.swarm is None:
        raise NotFound("this server is not in a swarm")
    return event_stream(_events(request, state))


async def _events(request: Request, state: AppState) -> AsyncIterator[bytes]:
    feed: SwarmFeed = request.app.state.web_swarm_feed
    swarm = state.swarm
    assert swarm is not None

    def make() -> bytes:
        return sse_event("swarm", fragment(request, LIVE, {"swarm": swarm_view(swarm.status())}))

    while not state.queue.closing:  # the server is stopping: end the stream
        yield feed.event(make)
        await feed.next_step()


def swarm_view(status: Mapping[str, Any]) -> dict[str, Any]:
    """What the page shows of `SwarmMember.status()`: this member first, then the others
    by name; each peer with the member whose DHT address it is, when one is."""
    heartbeat = float(status.get("heartbeat_interval") or 0)
    me = str(status.get("id", ""))
    members = [_member_view(m, me, heartbeat) for m in status.get("members", [])]
    members.sort(key=lambda m: (not m["self"], m["name"].lower(), m["id"]))
    by_dht = {m["dht"]: m["name"] or m["id"] for m in members if m["dht"]}
    peers = [
        {
            "id": str(p.get("id", ""))[:PEER_ID_CHARS],
            "address": f"{p.get('host', '')}:{p.get('port', '')}",
            "member": by_dht.get(f"{p.get('host', '')}:{p.get('port', '')}", ""),
        }
        for p in status.get("peers", [])
    ]
    return {
        "id": me,
        "fingerprint": str(status.get("swarm", "")),
        "dht": str(status.get("dht", "")),
        "bootstrap": [str(b) for b in status.get("bootstrap", [])],
        "heartbeat": heartbeat,
        "last_publish": status.get("last_publish"),
        "routing_table_size": int(status.get("routing_table_size", 0)),
        "records_seen": int(status.get("records_seen", 0)),
        "dropped_datagrams": int(status.get("dropped_datagrams", 0)),
        "rejected_records": int(status.get("rejected_records", 0)),
        "members": members,
        "peers": sorted(peers, key=lambda p: (p["member"] == "", p["address"])),
    }


def _member_view(member: Mapping[str, Any], me: str, heartbeat: float) -> dict[str, Any]:
    age = float(member.get("age", 0))
    url = str(member.get("url", ""))
    models = member.get("models") or {}
    return {
        "id": str(member.get("id", "")),
        "name": str(member.get("name", "")),
        "self": member.get("id") == me,
        "url": url if url.startswith(("http://", "https://")) else "",
        "dht": str(member.get("dht", "")),
        "version": str(member.get("version", "")),
        "uptime": duration(float(member.get("uptime", 0))),
        "age": age,
        "late": heartbeat > 0 and age > 2 * heartbeat + 1,
        "queued": int(member.get("queued", 0)),
        "running": int(member.get("running", 0)),
        "nodes": int(member.get("nodes", 0)),
        "tokens_per_s": float(member.get("tokens_per_s", 0)),
        "models": [
            {
                "name": str(name),
                "queued": int(load.get("queued", 0)),
                "running": int(load.get("running", 0)),
                "nodes": int(load.get("nodes", 0)),
            }
            for name, load in sorted(models.items())
        ],
    }


def duration(seconds: float) -> str:
    """'45 s', '12 min', '3 h 5 min', '2 d 4 h'."""
    s = int(max(0.0, seconds))
    days, hours, minutes = s // 86_400, s % 86_400 // 3_600, s % 3_600 // 60
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min"
    return f"{s} s"
