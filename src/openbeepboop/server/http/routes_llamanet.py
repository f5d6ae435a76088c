"""LlamaNet's native API, over the same core as the OpenAI routes: `POST /generate` and
`POST /generate/stream` (a prompt in, text out: an ordinary text-completion job, queued,
leased and counted like any other), `GET /status` (load) and `GET /info` (who this
server is). docs/http-api.md, "LlamaNet's native API"."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.responses import Response, StreamingResponse

from openbeepboop.server.core.generate import ENDPOINT, generated, pick_model
from openbeepboop.server.core.queue import JobRequest, Queue
from openbeepboop.server.core.status import ServerStatus, read_status
from openbeepboop.server.http.bodies import CheckedRoute
from openbeepboop.server.http.cache_headers import cache_outcome, requested_cache
from openbeepboop.server.http.guards import any_key, client_key
from openbeepboop.server.http.llamanet_stream import generate_stream
from openbeepboop.server.http.outbound import JSONResponse
from openbeepboop.server.http.state import app_state
from openbeepboop.server.models import ApiKey

if TYPE_CHECKING:  # the swarm's module needs its extra: only when configured
    from openbeepboop.server.core.swarm import SwarmMember

router = APIRouter(tags=["llamanet"], route_class=CheckedRoute)
ClientKey = Annotated[ApiKey, Depends(client_key)]
AnyKey = Annotated[ApiKey, Depends(any_key)]

# LlamaNet's defaults for what a request leaves out
DEFAULT_MAX_TOKENS = 100
DEFAULT_TEMPERATURE = 0.7
MAX_STOPS = 4  # as OpenAI


class GenerateBody(BaseModel):
    """`POST /generate` and `POST /generate/stream`. Fields LlamaNet's servers take and
    ours do not are ignored."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(description="The text to continue.")
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=1, le=1_000_000)
    temperature: float = Field(DEFAULT_TEMPERATURE, ge=0, le=2)
    model: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="Needed when live nodes serve several models.",
    )
    top_p: float | None = Field(None, ge=0, le=1)
    stop: str | list[str] | None = Field(None, description="Up to 4 stop sequences.")
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    cache: Literal["use", "skip", "refresh"] | None = Field(
        None, description="The response cache: use, skip or refresh (docs/cache.md)."
    )

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
        return value


async def _job_request(
    request: Request, queue: Queue, body: GenerateBody, stream: bool
) -> JobRequest:
    model = body.model
    if model is None:
        model = pick_model(None, await queue.served_models())
    payload: dict[str, Any] = {
        "model": model,
        "prompt": body.prompt,
        "max_tokens": body.max_tokens,
        "temperature": body.temperature,
        "stream": stream,
    }
    for name in ("top_p", "stop", "seed"):
        value = getattr(body, name)
        if value is not None:
            payload[name] = value
    return JobRequest(endpoint=ENDPOINT, body=payload, cache=body.cache or requested_cache(request))


@router.post("/generate", summary="Generate text from a prompt (LlamaNet)")
async def generate(request: Request, body: GenerateBody, key: ClientKey) -> Response:
    queue = app_state(request).queue
    req = await _job_request(request, queue, body, stream=False)
    job, result = await queue.complete(key, req)
    report = generated(job, result)
    return JSONResponse(
        {
            "text": report.text,
            "tokens_generated": report.tokens_generated,
            "generation_time": report.generation_time,
            "node_id": report.node_id,
            "model": report.model,
            "id": report.id,
            "finish_reason": report.finish_reason,
        },
        headers={"x-openbeepboop-job-id": job.id, **cache_outcome(job, req.cache)},
    )


@router.post("/generate/stream", summary="Generate text from a prompt, streamed (LlamaNet, SSE)")
async def generate_streamed(request: Request, body: GenerateBody, key: ClientKey) -> Response:
    state = app_state(request)
    queue = state.queue
    req = await _job_request(request, queue, body, stream=True)
    job = await queue.submit_when_served(key, req)
    return StreamingResponse(
        generate_stream(
            queue, state.keyring, key.id, job, lambda: queue.abandon_when_unserved(key, job, req)
        ),
        media_type="text/event-stream",
        headers={
            "x-openbeepboop-job-id": job.id,
            "Cache-Control": "no-cache",
            **cache_outcome(job, req.cache),
            "X-Accel-Buffering": "no",
        },
    )


@router.get("/status", summary="This server's load (LlamaNet)")
async def status(request: Request, key: AnyKey) -> Response:
    state = app_state(request)
    now = await read_status(state.queue, state.identity)
    return JSONResponse(status_json(now))


@router.get("/info", summary="Who this server is (LlamaNet)")
async def info(request: Request, key: AnyKey) -> Response:
    state = app_state(request)
    now = await read_status(state.queue, state.identity)
    return JSONResponse(
        {
            "id": now.id,
            "node_id": now.id,
            "name": now.name,
            "url": now.url,
            "version": now.version,
            "started_at": now.started_at,
            "uptime": now.uptime,
            "models": now.served,
            "api": ["openai", "llamanet"],
            "dht": None if state.swarm is None else dht_json(state.swarm),
        }
    )


def dht_json(swarm: SwarmMember) -> dict[str, object]:
    """The swarm membership in brief (GET /dht/status has the whole of it)."""
    return {
        "address": swarm.dht_address,
        "swarm": swarm.secret.fingerprint(),
        "members": len(swarm.members(include_self=True)),
        "heartbeat_interval": swarm.config.heartbeat,
    }


def status_json(now: ServerStatus) -> dict[str, Any]:
    """Our names (those of the swarm's member record), then LlamaNet's for the same
    figures: `node_id` (our id), `tps` (tokens/s), `queue_depth` (jobs queued)."""
    return {
        "id": now.id,
        "name": now.name,
        "url": now.url,
        "version": now.version,
        "started_at": now.started_at,
        "at": now.at,
        "uptime": now.uptime,
        "models": {
            m: {"queued": c.queued, "running": c.running, "nodes": c.nodes}
            for m, c in now.models.items()
        },
        "queued": now.queued,
        "running": now.running,
        "nodes": now.nodes,
        "capacity": now.capacity,
        "tokens_per_s": now.tokens_per_s,
        "load": now.load,
        "node_id": now.id,
        "tps": now.tokens_per_s,
        "queue_depth": now.queued,
    }
