"""Operations: health, readiness, metrics, models, nodes, stats, key admin."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field
from starlette.responses import Response

from openbeepboop.server.core.auth import KeyRing
from openbeepboop.server.errors import NotFound
from openbeepboop.server.models import ApiKey, Node, Role
from openbeepboop.server.core.queue import Queue
from openbeepboop.server.http.guards import admin_key, any_key
from openbeepboop.server.http.metrics import Metrics
from openbeepboop.server.http.outbound import JSONResponse, key_json, node_json

router = APIRouter(tags=["operations"])
AnyKey = Annotated[ApiKey, Depends(any_key)]
AdminKey = Annotated[ApiKey, Depends(admin_key)]


def _queue(request: Request) -> Queue:
    queue: Queue = request.app.state.queue
    return queue


@router.get("/health", summary="The process answers")
async def health() -> Response:
    return JSONResponse({"status": "ok"})


@router.get("/ready", summary="The store answers")
async def ready(request: Request) -> Response:
    try:
        await _queue(request).store.stats()
    except Exception as exc:  # not ready is an answer, not a crash
        return JSONResponse({"status": "unavailable", "detail": str(exc)}, status_code=503)
    return JSONResponse({"status": "ready"})


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    if not request.app.state.settings.metrics_public:
        await any_key(request)
    m: Metrics = request.app.state.metrics
    body = m.render(await _queue(request).stats())
    return Response(body, media_type=m.content_type)


def _model_json(name: str, nodes: list[Node]) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": int(min(n.registered_at for n in nodes)),
        "owned_by": "openbeepboop",
        "nodes": len(nodes),
    }


@router.get("/v1/models", summary="Models served by live nodes", tags=["models"])
async def list_models(request: Request, key: AnyKey) -> Response:
    served = await _queue(request).served_models()
    data = [_model_json(name, served[name]) for name in sorted(served)]
    return JSONResponse({"object": "list", "data": data})


@router.get("/v1/models/{model:path}", summary="One model served by live nodes", tags=["models"])
async def get_model(request: Request, model: str, key: AnyKey) -> Response:
    served = await _queue(request).served_models()
    if model not in served:
        raise NotFound(
            f"no live node serves model {model!r}", param="model", code="model_not_found"
        )
    return JSONResponse(_model_json(model, served[model]))


@router.get("/v1/nodes", summary="Live nodes")
async def list_nodes(request: Request, key: AnyKey) -> Response:
    nodes = await _queue(request).live_nodes()
    return JSONResponse({"object": "list", "data": [node_json(n) for n in nodes]})


@router.get("/v1/stats", summary="Queue depth and counts per model")
async def stats(request: Request, key: AnyKey) -> Response:
    return JSONResponse(await _queue(request).stats())


class NewKeyBody(BaseModel):
    role: Role
    name: str = Field("", max_length=256)


@router.post("/v1/admin/keys", summary="Create an API key (shown once)", tags=["admin"])
async def create_key(request: Request, body: NewKeyBody, key: AdminKey) -> Response:
    keyring: KeyRing = request.app.state.keyring
    issued = await keyring.create(body.role, body.name)
    return JSONResponse({**key_json(issued.record), "key": issued.secret}, status_code=201)


@router.get("/v1/admin/keys", summary="List API keys (never the secrets)", tags=["admin"])
async def list_keys(request: Request, key: AdminKey) -> Response:
    keyring: KeyRing = request.app.state.keyring
    data = [key_json(k) for k in await keyring.list_keys()]
    return JSONResponse({"object": "list", "data": data})


@router.post("/v1/admin/keys/{key_id}/revoke", summary="Revoke an API key", tags=["admin"])
async def revoke_key(request: Request, key_id: str, key: AdminKey) -> Response:
    keyring: KeyRing = request.app.state.keyring
    return JSONResponse(key_json(await keyring.revoke(key_id)))
