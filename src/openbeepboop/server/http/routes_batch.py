"""OpenAI's Files and Batch API: `/v1/files` and `/v1/batches`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal
from urllib.parse import quote

import orjson
from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field, ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.responses import Response, StreamingResponse

from openbeepboop.server.core import json_input, responses
from openbeepboop.server.core.files import PART_BYTES, ExpiresAfter
from openbeepboop.server.errors import InvalidRequest, NotFound
from openbeepboop.server.http.bodies import CheckedRoute
from openbeepboop.server.http.guards import client_key
from openbeepboop.server.http.inbound import ENDPOINT_BODIES, ResponsesBody
from openbeepboop.server.http.outbound import JSONResponse, batch_json, file_json, page
from openbeepboop.server.http.state import app_state
from openbeepboop.server.models import JSON, ApiKey

router = APIRouter(tags=["batches"], route_class=CheckedRoute)
Key = Annotated[ApiKey, Depends(client_key)]
Limit = Annotated[int, Query(ge=1, le=10_000)]

BODY_MODELS: dict[str, type[BaseModel]] = {**ENDPOINT_BODIES, "/v1/responses": ResponsesBody}


def check_body(url: str, body: JSON) -> str | None:
    """The first thing wrong with a batch line's body, as the endpoint would see it."""
    try:
        BODY_MODELS[url].model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(part) for part in ("body", *err["loc"]))
        return f"{where}: {err['msg']}"
    if url == "/v1/responses":  # what the mapping onto a chat body refuses, too
        try:
            responses.batch_request(body)
        except InvalidRequest as exc:
            return f"body.{exc.param}: {exc.message}" if exc.param else exc.message
    return None


async def _chunks(upload: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await upload.read(PART_BYTES):
        yield chunk


def _expires_after(form: FormData) -> ExpiresAfter | None:
    """OpenAI's `expires_after[anchor]` and `expires_after[seconds]` fields (or one
    `expires_after` field holding that object as JSON), when given."""
    anchor, seconds = form.get("expires_after[anchor]"), form.get("expires_after[seconds]")
    whole = form.get("expires_after")
    if isinstance(whole, str) and whole:
        try:
            value = orjson.loads(whole)
        except orjson.JSONDecodeError:
            value = None
        if not isinstance(value, dict):
            raise InvalidRequest(
                'expires_after must be {"anchor": "created_at", "seconds": N}',
                param="expires_after",
            )
        anchor, seconds = value.get("anchor"), value.get("seconds")
    if anchor is None and seconds is None:
        return None
    return ExpiresAfter.parse(anchor, seconds)


# -- files ----------------------------------------------------------------------------


@router.post("/v1/files", summary="Upload a file (multipart: file, purpose)")
async def upload_file(request: Request, key: Key) -> Response:
    form = await request.form(max_files=1, max_fields=8)
    try:
        upload = form.get("file")
        purpose = form.get("purpose")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("a multipart field 'file' with the file is required", param="file")
        if not isinstance(purpose, str) or not purpose:
            raise InvalidRequest("a multipart field 'purpose' is required", param="purpose")
        if upload.filename:
            json_input.check_text(upload.filename, "file")
        json_input.check_text(purpose, "purpose")
        stored = await app_state(request).files.upload(
            key,
            upload.filename or "upload.jsonl",
            purpose,
            _chunks(upload),
            check_body,
            _expires_after(form),
        )
    finally:
        await form.close()
    return JSONResponse(file_json(stored))


@router.get("/v1/files", summary="List files, newest first")
async def list_files(
    request: Request,
    key: Key,
    purpose: str | None = None,
    limit: Limit = 10_000,
    after: str | None = None,
    order: Literal["asc", "desc"] = "desc",
) -> Response:
    try:
        found = await app_state(request).files.list_files(key, purpose, limit + 1, after)
    except NotFound as exc:
        raise InvalidRequest(f"unknown cursor {after!r}", param="after") from exc
    items = [file_json(f) for f in found[:limit]]
    if order == "asc":
        items.reverse()
    return JSONResponse(page(items, has_more=len(found) > limit))


@router.get("/v1/files/{file_id}", summary="One file")
async def get_file(request: Request, file_id: str, key: Key) -> Response:
    return JSONResponse(file_json(await app_state(request).files.get(key, file_id)))


@router.get("/v1/files/{file_id}/content", summary="A file's bytes")
async def file_content(request: Request, file_id: str, key: Key) -> Response:
    files = app_state(request).files
    found = await files.get(key, file_id)
    return StreamingResponse(
        files.content(found),
        media_type="application/jsonl",
        headers={
            "Content-Length": str(found.bytes),
            "Content-Disposition": attachment(found.filename),
        },
    )


def attachment(filename: str) -> str:
    """A Content-Disposition that downloads under `filename` (RFC 6266): an ASCII
    stand-in for old clients, and the name itself UTF-8 encoded (a header holds only
    Latin-1: a name in another script was a 500)."""
    plain = "".join(c if " " <= c <= "~" and c not in '"\\' else "_" for c in filename)
    return f"attachment; filename=\"{plain}\"; filename*=UTF-8''{quote(filename, safe='')}"


@router.delete("/v1/files/{file_id}", summary="Delete a file")
async def delete_file(request: Request, file_id: str, key: Key) -> Response:
    deleted = await app_state(request).files.delete(key, file_id)
    return JSONResponse({"id": deleted.id, "object": "file", "deleted": True})


# -- batches ----------------------------------------------------------------------------


class BatchCreateBody(BaseModel):
    input_file_id: str = Field(min_length=1, max_length=128)
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(
        None, max_length=16, description="Up to 16 string pairs, returned as given."
    )
    output_expires_after: dict[str, Any] | None = None


@router.post("/v1/batches", summary="Run a file of requests as a batch")
async def create_batch(request: Request, body: BatchCreateBody, key: Key) -> Response:
    batch = await app_state(request).batches.create(
        key, body.input_file_id, body.endpoint, body.completion_window, body.metadata
    )
    return JSONResponse(batch_json(batch))


@router.get("/v1/batches", summary="List batches, newest first")
async def list_batches(
    request: Request,
    key: Key,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: str | None = None,
) -> Response:
    try:
        found = await app_state(request).batches.list_batches(key, limit + 1, after)
    except NotFound as exc:
        raise InvalidRequest(f"unknown cursor {after!r}", param="after") from exc
    items = [batch_json(b) for b in found[:limit]]
    return JSONResponse(page(items, has_more=len(found) > limit))


@router.get("/v1/batches/{batch_id}", summary="One batch")
async def get_batch(request: Request, batch_id: str, key: Key) -> Response:
    return JSONResponse(batch_json(await app_state(request).batches.get(key, batch_id)))


@router.post("/v1/batches/{batch_id}/cancel", summary="Cancel a batch")
async def cancel_batch(request: Request, batch_id: str, key: Key) -> Response:
    return JSONResponse(batch_json(await app_state(request).batches.cancel(key, batch_id)))
