"""Operations: health, readiness, metrics, models, nodes, stats, key admin."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field
from starlette.responses import Response, StreamingResponse

from openbeepboop.server.core.node_events import node_events
from openbeepboop.server.core.shares import ShareBook
from openbeepboop.server.errors import NotFound
from openbeepboop.server.http.bodies import CheckedRoute
from openbeepboop.server.http.guards import admin_key, any_key
from openbeepboop.server.http.outbound import JSONResponse, key_json, node_json, share_json
from openbeepboop.server.http.state import app_state
from openbeepboop.server.http.streaming import with_keepalive
from openbeepboop.server.models import JSON, ApiKey, Node, Role, Share

router = APIRouter(tags=["operations"], route_class=CheckedRoute)
AnyKey = Annotated[ApiKey, Depends(any_key)]
AdminKey = Annotated[ApiKey, Depends(admin_key)]


@router.get("/health", summary="The process answers")
async def health() -> Response:
    return JSONResponse({"status": "ok"})


@router.get("/ready", summary="The store answers")
async def ready(request: Request) -> Response:
    try:
        await app_state(request).queue.store.stats()
    except Exception as exc:  # not ready is an answer, not a crash
        return JSONResponse({"status": "unavailable", "detail": str(exc)}, status_code=503)
    return JSONResponse({"status": "ready"})


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    state = app_state(request)
    if not state.settings.metrics_public:
        await any_key(request)
    body = state.metrics.render(await state.queue.stats(), await state.queue.cache.summary())
    return Response(body, media_type=state.metrics.content_type)


def _model_json(name: str, nodes: list[Node]) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": int(min(n.registered_at for n in nodes)),
        "owned_by": "openbeepboop",
        "nodes": len(nodes),
    }


def _alias_json(alias: str, members: Sequence[str], served: dict[str, list[Node]]) -> JSON:
    """An alias (core/aliases.py): its members in order, and the live nodes that serve
    one of them."""
    nodes = {n.id: n for m in members for n in served.get(m, ())}
    return {
        "id": alias,
        "object": "model",
        "created": int(min((n.registered_at for n in nodes.values()), default=0)),
        "owned_by": "openbeepboop",
        "nodes": len(nodes),
        "alias": True,
        "members": list(members),
        "served_members": [m for m in members if m in served],
    }


@router.get("/v1/models", summary="Models served by live nodes, and model aliases", tags=["models"])
async def list_models(request: Request, key: AnyKey) -> Response:
    queue = app_state(request).queue
    served = await queue.served_models()
    data = [_model_json(name, served[name]) for name in sorted(served)]
    aliases = queue.aliases.members
    data += [_alias_json(alias, aliases[alias], served) for alias in sorted(aliases)]
    return JSONResponse({"object": "list", "data": data})


@router.get(
    "/v1/models/{model:path}",
    summary="One model served by live nodes, or an alias",
    tags=["models"],
)
async def get_model(request: Request, model: str, key: AnyKey) -> Response:
    queue = app_state(request).queue
    served = await queue.served_models()
    members = queue.aliases.members.get(model)
    if members:
        return JSONResponse(_alias_json(model, members, served))
    if model not in served:
        raise NotFound(
            f"no live node serves model {model!r}", param="model", code="model_not_found"
        )
    return JSONResponse(_model_json(model, served[model]))


@router.get("/v1/nodes", summary="Live nodes")
async def list_nodes(request: Request, key: AnyKey) -> Response:
    nodes = await app_state(request).queue.live_nodes()
    return JSONResponse({"object": "list", "data": [node_json(n) for n in nodes]})


@router.get("/v1/nodes/{node_id}", summary="One live node")
async def get_node(request: Request, node_id: str, key: AnyKey) -> Response:
    node = await app_state(request).queue.live_node(node_id)
    if node is None:
        raise NotFound(f"no live node {node_id!r}", param="node_id", code="node_not_found")
    return JSONResponse(node_json(node))


@router.get(
    "/v1/nodes/{node_id}/events",
    summary="A node's model states and download / loading progress, as Server-Sent Events",
)
async def node_event_stream(request: Request, node_id: str, key: AnyKey) -> Response:
    state = app_state(request)
    events = node_events(state.queue, node_id, node_json)
    first = await anext(events)  # a node that is not live: 404 before the stream starts
    return StreamingResponse(
        _node_sse(first, events),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def _node_sse(
    first: dict[str, Any], events: AsyncGenerator[dict[str, Any], None]
) -> AsyncIterator[bytes]:
    """`data: {event}` lines, a comment line while nothing happens for a while."""
    yield b"data: " + orjson.dumps(first) + b"\n\n"
    async for event in with_keepalive(events):
        yield b": keep-alive\n\n" if event is None else b"data: " + orjson.dumps(event) + b"\n\n"
    yield b"data: [DONE]\n\n"


@router.get("/dht/status", summary="This server's DHT node: peers, routing table, records")
async def dht_status(request: Request, key: AnyKey) -> Response:
    swarm = app_state(request).swarm
    if swarm is None:
        return JSONResponse({"enabled": False, "id": app_state(request).identity.id})
    return JSONResponse(swarm.status())


@router.get("/v1/stats", summary="Queue depth and counts per model")
async def stats(request: Request, key: AnyKey) -> Response:
    queue = app_state(request).queue
    return JSONResponse(
        {
            **await queue.stats(),
            "eta": await queue.eta_outlook(),
            "cache": await queue.cache.summary(),
        }
    )


@router.get(
    "/v1/admin/quotas", summary="Each share's quotas and its usage this hour", tags=["admin"]
)
async def quotas(request: Request, key: AdminKey) -> Response:
    data = [u.as_json() for u in await app_state(request).queue.quotas.usage()]
    return JSONResponse({"object": "list", "data": data})


class NewKeyBody(BaseModel):
    role: Role
    name: str = Field("", max_length=256)
    group: str | None = Field(None, max_length=64)


class KeyGroupBody(BaseModel):
    group: str | None = Field(max_length=64)


class ShareBody(BaseModel):
    weight: float = Field(1.0, gt=0, le=1000, allow_inf_nan=False)
    jobs_per_hour: int | None = Field(None, ge=0, le=2**53)
    tokens_per_hour: int | None = Field(None, ge=0, le=2**53)


@router.post("/v1/admin/keys", summary="Create an API key (shown once)", tags=["admin"])
async def create_key(request: Request, body: NewKeyBody, key: AdminKey) -> Response:
    issued = await app_state(request).keyring.create(body.role, body.name, body.group)
    return JSONResponse({**key_json(issued.record), "key": issued.secret}, status_code=201)


@router.post("/v1/admin/keys/{key_id}/group", summary="Put a key in a share group", tags=["admin"])
async def set_key_group(
    request: Request, key_id: str, body: KeyGroupBody, key: AdminKey
) -> Response:
    return JSONResponse(key_json(await app_state(request).keyring.set_group(key_id, body.group)))


@router.get("/v1/admin/shares", summary="Fair-share weights and quotas set", tags=["admin"])
async def list_shares(request: Request, key: AdminKey) -> Response:
    found = await ShareBook(app_state(request).queue.store).list()
    return JSONResponse({"object": "list", "data": [share_json(s) for s in found]})


@router.put("/v1/admin/shares/{name}", summary="Set a share's weight and quotas", tags=["admin"])
async def put_share(request: Request, name: str, body: ShareBody, key: AdminKey) -> Response:
    wanted = Share(name, body.weight, body.jobs_per_hour, body.tokens_per_hour)
    return JSONResponse(share_json(await ShareBook(app_state(request).queue.store).put(wanted)))


@router.delete("/v1/admin/shares/{name}", summary="Forget a share's settings", tags=["admin"])
async def delete_share(request: Request, name: str, key: AdminKey) -> Response:
    await ShareBook(app_state(request).queue.store).unset(name)
    return JSONResponse({"object": "share", "name": name, "deleted": True})


@router.get("/v1/admin/keys", summary="List API keys (never the secrets)", tags=["admin"])
async def list_keys(request: Request, key: AdminKey) -> Response:
    data = [key_json(k) for k in await app_state(request).keyring.list_keys()]
    return JSONResponse({"object": "list", "data": data})


@router.post("/v1/admin/keys/{key_id}/revoke", summary="Revoke an API key", tags=["admin"])
async def revoke_key(request: Request, key_id: str, key: AdminKey) -> Response:
    return JSONResponse(key_json(await app_state(request).keyring.revoke(key_id)))
