"""Named assistant templates: `/v1/templates`."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field
from starlette.responses import Response

from openbeepboop.server.http.bodies import CheckedRoute
from openbeepboop.server.http.guards import client_key
from openbeepboop.server.http.outbound import JSONResponse, page, template_json
from openbeepboop.server.http.state import app_state
from openbeepboop.server.models import ApiKey

router = APIRouter(tags=["templates"], route_class=CheckedRoute)
Key = Annotated[ApiKey, Depends(client_key)]


class TemplateBody(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    streams: list[dict[str, Any]] = Field(description="provider, settings {model, ...}, messages")
    description: str = Field("", max_length=2000)


@router.post("/v1/templates", summary="Create or replace a named assistant template")
async def put_template(request: Request, body: TemplateBody, key: Key) -> Response:
    saved = await app_state(request).assistants.put(key, body.name, body.streams, body.description)
    return JSONResponse(template_json(saved))


@router.get("/v1/templates", summary="List assistant templates")
async def list_templates(request: Request, key: Key) -> Response:
    found = await app_state(request).assistants.list_templates(key)
    return JSONResponse(page([template_json(t) for t in found], has_more=False))


@router.get("/v1/templates/{name}", summary="One assistant template")
async def get_template(request: Request, name: str, key: Key) -> Response:
    return JSONResponse(template_json(await app_state(request).assistants.get(key, name)))


@router.delete("/v1/templates/{name}", summary="Delete an assistant template")
async def delete_template(request: Request, name: str, key: Key) -> Response:
    gone = await app_state(request).assistants.delete(key, name)
    return JSONResponse({"id": gone.name, "object": "assistant_template", "deleted": True})
