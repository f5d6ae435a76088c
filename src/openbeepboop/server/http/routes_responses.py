"""OpenAI's Responses API: `POST /v1/responses` (sync, streamed, or a background job),
`GET`, `DELETE` and `POST .../cancel` of a stored response. Each response is a
chat-completion job (core/responses.py translates both ways)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, Query, Request
from starlette.responses import Response, StreamingResponse

from openbeepboop.server.core import responses
from openbeepboop.server.core.queue import JobRequest
from openbeepboop.server.errors import InvalidRequest, NotFound
from openbeepboop.server.http.bodies import CheckedRoute
from openbeepboop.server.http.cache_headers import cache_outcome, requested_cache
from openbeepboop.server.http.guards import client_key
from openbeepboop.server.http.inbound import ResponsesBody
from openbeepboop.server.http.outbound import JSONResponse
from openbeepboop.server.http.responses_stream import stream_response
from openbeepboop.server.http.routes_client import _wants_async
from openbeepboop.server.http.state import app_state
from openbeepboop.server.http.streaming import while_key_active
from openbeepboop.server.models import ApiKey, Job

router = APIRouter(tags=["responses"], route_class=CheckedRoute)
Key = Annotated[ApiKey, Depends(client_key)]


async def _response_job(request: Request, key: ApiKey, resp_id: str) -> Job:
    """The stored response `resp_id` that `key` may see (NotFound otherwise)."""
    missing = NotFound(
        f"no response with id {resp_id!r}", param="response_id", code="response_not_found"
    )
    if not resp_id.startswith("resp_"):
        raise missing
    try:
        job = await app_state(request).queue.get(key, responses.job_id(resp_id))
    except NotFound as exc:
        raise missing from exc
    if not responses.is_response(job):
        raise missing
    return job


@router.post("/v1/responses", summary="Create a response (sync, streamed or in the background)")
async def create_response(
    request: Request,
    body: ResponsesBody,
    key: Key,
    prefer: Annotated[str | None, Header()] = None,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)] = None,
) -> Response:
    state = app_state(request)
    queue = state.queue
    given = body.model_dump(exclude_unset=True)
    background = body.background or _wants_async(prefer)
    if background and not body.store:
        raise InvalidRequest("a background response must be stored (store: true)", param="store")
    if background and body.stream:
        raise InvalidRequest("give stream or background, not both", param="stream")
    earlier = []
    if body.previous_response_id is not None:
        try:
            previous = await _response_job(request, key, body.previous_response_id)
        except NotFound as exc:
            raise InvalidRequest(str(exc), param="previous_response_id") from exc
        earlier = responses.history(previous)
    chat = responses.chat_body(given, earlier)
    chat["stream"] = body.stream
    req = JobRequest(
        endpoint=responses.ENDPOINT,
        body=chat,
        metadata=responses.job_metadata({**given, "background": background}),
        idempotency_key=idempotency_key,
        node=body.node,
        node_labels=body.node_labels,
        # an answer not to be stored is not kept in the cache either (nor looked up)
        cache=(body.cache or requested_cache(request)) if body.store else "skip",
    )
    if background:
        outcome = (await queue.submit(key, [req]))[0]
        return JSONResponse(
            responses.response_object(outcome.job),
            headers={
                "x-openbeepboop-job-id": outcome.job.id,
                **cache_outcome(outcome.job, req.cache),
            },
        )
    if body.stream:
        job = await queue.submit_when_served(key, req)

        async def forget() -> None:
            if not body.store:
                await queue.store.delete_job(job.id)

        return StreamingResponse(
            while_key_active(
                state.keyring,
                key.id,
                stream_response(
                    queue, job, lambda: queue.abandon_when_unserved(key, job, req), forget
                ),
            ),
            media_type="text/event-stream",
            headers={
                "x-openbeepboop-job-id": job.id,
                "Cache-Control": "no-cache",
                **cache_outcome(job, req.cache),
            },
        )
    job, _ = await queue.complete(key, req)
    if not body.store:
        await queue.store.delete_job(job.id)
    headers = {"x-openbeepboop-job-id": job.id, **cache_outcome(job, req.cache)}
    return JSONResponse(responses.response_object(job), headers=headers)


@router.get("/v1/responses/{response_id}", summary="A stored response")
async def get_response(request: Request, response_id: str, key: Key) -> Response:
    job = await _response_job(request, key, response_id)
    return JSONResponse(responses.response_object(job))


@router.get("/v1/responses/{response_id}/input_items", summary="A response's input items")
async def list_input_items(
    request: Request,
    response_id: str,
    key: Key,
    order: Literal["asc", "desc"] = "desc",
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(description="An item id: list the items after it")] = None,
) -> Response:
    items = responses.input_items(await _response_job(request, key, response_id))
    if order == "desc":
        items.reverse()
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise InvalidRequest(f"unknown cursor {after!r}", param="after")
        items = items[ids.index(after) + 1 :]
    shown = items[:limit]
    return JSONResponse(
        {
            "object": "list",
            "data": shown,
            "first_id": shown[0]["id"] if shown else None,
            "last_id": shown[-1]["id"] if shown else None,
            "has_more": len(items) > limit,
        }
    )


@router.post("/v1/responses/{response_id}/cancel", summary="Cancel a background response")
async def cancel_response(request: Request, response_id: str, key: Key) -> Response:
    job = await _response_job(request, key, response_id)
    job = await app_state(request).queue.cancel(key, job.id)
    return JSONResponse(responses.response_object(job))


@router.delete("/v1/responses/{response_id}", summary="Delete a stored response")
async def delete_response(request: Request, response_id: str, key: Key) -> Response:
    queue = app_state(request).queue
    job = await _response_job(request, key, response_id)
    if not job.status.is_final:
        await queue.cancel(key, job.id)  # its node hears of it; then the row can go
    await queue.store.delete_job(job.id)
    return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})
