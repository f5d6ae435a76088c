"""Client routes: OpenAI completions (async with `Prefer: respond-async`, else sync) and
the job API."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Body, Depends, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.responses import Response, StreamingResponse

from openbeepboop.server.core.queue import JobRequest
from openbeepboop.server.errors import InvalidRequest, NotFound
from openbeepboop.server.http.bodies import CheckedRoute
from openbeepboop.server.http.cache_headers import cache_outcome, requested_cache
from openbeepboop.server.http.guards import client_key
from openbeepboop.server.http.inbound import (
    ENDPOINT_BODIES,
    OUR_FIELDS,
    ChatCompletionBody,
    CompletionBody,
    EmbeddingBody,
    JobBatch,
    JobSpec,
    Knobs,
    PollBody,
)
from openbeepboop.server.http.outbound import JSONResponse, job_json, page
from openbeepboop.server.http.state import app_state
from openbeepboop.server.http.streaming import stream_events, stream_job, while_key_active
from openbeepboop.server.models import ApiKey, JobFilter, JobStatus

router = APIRouter(tags=["jobs"], route_class=CheckedRoute)
Key = Annotated[ApiKey, Depends(client_key)]
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)]


def _wants_async(prefer: str | None) -> bool:
    """RFC 7240: `Prefer: respond-async` (possibly among other preferences)."""
    if not prefer:
        return False
    if prefer == "respond-async":  # what the client library and CLI send
        return True
    return any(p.split("=")[0].strip().lower() == "respond-async" for p in prefer.split(","))


def _job_request(
    endpoint: str, body: Knobs, idempotency_key: str | None, cache: str | None = None
) -> JobRequest:
    payload = body.model_dump(exclude_unset=True, exclude=set(OUR_FIELDS))
    return JobRequest(
        endpoint=endpoint,
        body=payload,
        priority=body.priority,
        max_attempts=body.max_attempts,
        metadata=body.metadata,
        custom_id=body.custom_id,
        idempotency_key=idempotency_key,
        expires_at=body.expires_at,
        ttl_seconds=body.ttl_seconds,
        node=body.node,
        node_labels=body.node_labels,
        cache=body.cache or cache,
    )


async def _openai_call(
    request: Request, key: ApiKey, req: JobRequest, prefer: str | None
) -> Response:
    state = app_state(request)
    queue = state.queue
    if _wants_async(prefer):
        outcome = (await queue.submit(key, [req], positions=True))[0]
        position = await queue.submitted_position(outcome)
        eta = await queue.estimated_start(outcome.job, position)
        return JSONResponse(
            job_json(outcome.job, position, eta),
            status_code=202 if outcome.created else 200,
            headers={
                "Location": f"/v1/jobs/{outcome.job.id}",
                "Preference-Applied": "respond-async",
                **cache_outcome(outcome.job, req.cache),
            },
        )
    if req.endpoint == "/v1/embeddings":  # never streamed; the body goes as given
        job, result = await queue.complete(key, req)
        headers = {"x-openbeepboop-job-id": job.id, **cache_outcome(job, req.cache)}
        return JSONResponse(result, headers=headers)
    if req.body.get("stream"):
        job = await queue.submit_when_served(key, req)
        options = req.body.get("stream_options")
        usage = isinstance(options, dict) and bool(options.get("include_usage"))
        return StreamingResponse(
            while_key_active(
                state.keyring,
                key.id,
                stream_job(queue, job, usage, lambda: queue.abandon_when_unserved(key, job, req)),
            ),
            media_type="text/event-stream",
            headers={
                "x-openbeepboop-job-id": job.id,
                "Cache-Control": "no-cache",
                **cache_outcome(job, req.cache),
            },
        )
    if "stream" not in req.body:
        # the caller takes the answer whole: say so, and a node may ask its upstream for
        # a plain answer instead of a stream (LiteLLM's stream costs ~0.7 ms per chunk)
        req = dataclasses.replace(req, body={**req.body, "stream": False})
    job, result = await queue.complete(key, req)
    headers = {"x-openbeepboop-job-id": job.id, **cache_outcome(job, req.cache)}
    return JSONResponse(result, headers=headers)


@router.post("/v1/chat/completions", summary="Chat completion (sync, or a job when async)")
async def chat_completions(
    request: Request,
    body: ChatCompletionBody,
    key: Key,
    prefer: Annotated[str | None, Header()] = None,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    req = _job_request("/v1/chat/completions", body, idempotency_key, requested_cache(request))
    return await _openai_call(request, key, req, prefer)


@router.post("/v1/completions", summary="Text completion (sync, or a job when async)")
async def completions(
    request: Request,
    body: CompletionBody,
    key: Key,
    prefer: Annotated[str | None, Header()] = None,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    req = _job_request("/v1/completions", body, idempotency_key, requested_cache(request))
    return await _openai_call(request, key, req, prefer)


@router.post("/v1/embeddings", summary="Embeddings (sync, or a job when async)")
async def embeddings(
    request: Request,
    body: EmbeddingBody,
    key: Key,
    prefer: Annotated[str | None, Header()] = None,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    req = _job_request("/v1/embeddings", body, idempotency_key, requested_cache(request))
    # OpenAI's embeddings endpoint ignores `stream`: so does ours (the job never has it)
    kept = {k: v for k, v in req.body.items() if k not in ("stream", "stream_options")}
    return await _openai_call(request, key, dataclasses.replace(req, body=kept), prefer)


M = TypeVar("M", bound=BaseModel)


def _validate(model: type[M], data: Any, loc: tuple[str | int, ...]) -> M:
    """Validate `data` as FastAPI would, so errors name the full path of the bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = [{**err, "loc": (*loc, *err["loc"])} for err in exc.errors()]
        raise RequestValidationError(errors) from exc


async def _render_templates(request: Request, key: ApiKey, specs: list[JobSpec]) -> list[JobSpec]:
    """Specs that name a `template` get the body its preferred stream renders."""
    if not any(s.template is not None for s in specs):
        return specs
    assistants = app_state(request).assistants
    out = []
    for spec in specs:
        if spec.template is None:
            out.append(spec)
            continue
        if spec.body is not None:
            raise InvalidRequest("give either 'body' or 'template', not both", param="template")
        streams = await assistants.streams_of(key, spec.template)
        [body, *_] = await assistants.bodies(streams, spec.query or "", spec.history)
        out.append(spec.model_copy(update={"body": body, "endpoint": "/v1/chat/completions"}))
    return out


def _spec_request(
    spec: JobSpec, header_key: str | None, loc: tuple[str | int, ...], cache: str | None = None
) -> JobRequest:
    if spec.body is None:
        raise InvalidRequest("a job needs 'body' (or 'template' and 'query')", param="body")
    endpoint_model = ENDPOINT_BODIES[spec.endpoint]
    checked = _validate(endpoint_model, spec.body, (*loc, "body"))
    req = _job_request(spec.endpoint, checked, spec.idempotency_key or header_key, cache)
    # our knobs may sit beside the body (batch-line style) or inside it; beside wins
    beside = {name: getattr(spec, name) for name in OUR_FIELDS if name in spec.model_fields_set}
    return dataclasses.replace(req, **beside) if beside else req  # replace() is slow


_JOBS_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [
                        {"$ref": "#/components/schemas/JobSpec"},
                        {"$ref": "#/components/schemas/JobBatch"},
                    ]
                }
            }
        },
    }
}


@router.post(
    "/v1/jobs", status_code=202, summary="Queue one job or many", openapi_extra=_JOBS_SCHEMA
)
async def create_jobs(
    request: Request,
    raw: Annotated[dict[str, Any], Body(include_in_schema=False)],
    key: Key,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    queue = app_state(request).queue
    if "jobs" in raw:
        body = _validate(JobBatch, raw, ("body",))
        limit = app_state(request).settings.max_jobs_per_request
        if len(body.jobs) > limit:
            raise InvalidRequest(f"at most {limit} jobs per request", param="jobs")
        if idempotency_key is not None:
            raise InvalidRequest(
                "give each job its own idempotency_key field in a bulk submit",
                param="Idempotency-Key",
            )
        specs = await _render_templates(request, key, body.jobs)
        cache = requested_cache(request)
        reqs = [_spec_request(s, None, ("body", "jobs", i), cache) for i, s in enumerate(specs)]
        outcomes = await queue.submit(key, reqs)
        return JSONResponse(
            {"object": "list", "data": [job_json(o.job) for o in outcomes]}, status_code=202
        )
    [spec] = await _render_templates(request, key, [_validate(JobSpec, raw, ("body",))])
    req = _spec_request(spec, idempotency_key, ("body",), requested_cache(request))
    outcome = (await queue.submit(key, [req], positions=True))[0]
    position = await queue.submitted_position(outcome)
    eta = await queue.estimated_start(outcome.job, position)
    return JSONResponse(
        job_json(outcome.job, position, eta),
        status_code=202 if outcome.created else 200,
        headers={"Location": f"/v1/jobs/{outcome.job.id}", **cache_outcome(outcome.job, req.cache)},
    )


@router.get("/v1/jobs/{job_id}", summary="One job")
async def get_job(request: Request, job_id: str, key: Key) -> Response:
    queue = app_state(request).queue
    job = await queue.get(key, job_id)
    position = await queue.queue_position(job)
    return JSONResponse(job_json(job, position, await queue.estimated_start(job, position)))


@router.get("/v1/jobs/{job_id}/events", summary="The job's events, live (SSE)")
async def job_events(
    request: Request,
    job_id: str,
    key: Key,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=32)] = None,
) -> Response:
    """`queued`, `started`, `token` {t, i}, then `end`, `failed` or `cancelled`, then
    `data: [DONE]`. Reconnect with `Last-Event-ID` to resume after the last event seen."""
    after = -1
    if last_event_id is not None and last_event_id.strip():
        try:
            after = int(last_event_id)
        except ValueError as exc:
            raise InvalidRequest(
                f"Last-Event-ID must be an event id from this stream, not {last_event_id!r}",
                param="Last-Event-ID",
            ) from exc
    state = app_state(request)
    job = await state.queue.get(key, job_id)
    return StreamingResponse(
        while_key_active(state.keyring, key.id, stream_events(state.queue, job, after)),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get("/v1/jobs", summary="List jobs, newest first")
async def list_jobs(
    request: Request,
    key: Key,
    status: JobStatus | None = None,
    model: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    after: Annotated[str | None, Query(description="A job id: list older jobs")] = None,
) -> Response:
    queue = app_state(request).queue
    after_seq = None
    if after is not None:
        try:
            after_seq = (await queue.get(key, after)).seq
        except NotFound as exc:
            raise InvalidRequest(f"unknown cursor {after!r}", param="after") from exc
    jobs = await queue.list_jobs(key, JobFilter(None, status, model, limit + 1, after_seq))
    items = [job_json(j) for j in jobs[:limit]]
    return JSONResponse(page(items, has_more=len(jobs) > limit))


@router.post("/v1/jobs/{job_id}/cancel", summary="Cancel a job")
async def cancel_job(request: Request, job_id: str, key: Key) -> Response:
    job = await app_state(request).queue.cancel(key, job_id)
    return JSONResponse(job_json(job))


@router.post("/v1/results/poll", summary="Several jobs at once, optionally long-polled")
async def poll_results(request: Request, body: PollBody, key: Key) -> Response:
    jobs = await app_state(request).queue.poll(key, body.ids, body.wait)
    found = {j.id for j in jobs}
    missing = [i for i in dict.fromkeys(body.ids) if i not in found]
    shown = [j for j in jobs if j.status.is_final] if body.only_final else jobs
    data: dict[str, Any] = {"object": "list", "data": [job_json(j) for j in shown]}
    data["not_found"] = missing
    return JSONResponse(data)
