"""The node protocol (node keys only): register, fetch, heartbeat, watch for cancels,
push deltas, submit results."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from openbeepboop.server.http.bodies import CheckedRoute
from openbeepboop.server.http.guards import node_key
from openbeepboop.server.http.inbound import (
    DemandBody,
    EventsBody,
    FetchBody,
    HeartbeatBody,
    RegisterBody,
    SubmitResultsBody,
    WatchBody,
)
from openbeepboop.server.http.outbound import JSONResponse
from openbeepboop.server.http.presence import ConnectionCaller, LeasedJobs
from openbeepboop.server.http.state import app_state
from openbeepboop.server.models import ApiKey, NodeResult

router = APIRouter(prefix="/internal", tags=["node protocol"], route_class=CheckedRoute)
Key = Annotated[ApiKey, Depends(node_key)]


@router.post("/nodes/register", summary="Announce a node and its models")
async def register(request: Request, body: RegisterBody, key: Key) -> Response:
    node = await app_state(request).queue.register_node(
        key,
        name=body.name,
        models=[m.model_dump() for m in body.models],
        capacity=body.capacity,
        hardware=body.hardware,
        version=body.version,
        labels=body.labels,
    )
    return JSONResponse({"node_id": node.id})


@router.post("/queue/fetch", summary="Lease jobs (long-poll up to `wait` seconds)")
async def fetch(request: Request, body: FetchBody, key: Key) -> Response:
    queue = app_state(request).queue
    caller = ConnectionCaller(request)
    try:
        jobs = await queue.fetch(
            key, body.node_id, body.models, body.max_jobs, body.wait, caller, body.loaded
        )
    except BaseException:
        caller.close()
        raise
    return LeasedJobs(jobs, caller, queue.release_unsent)


@router.post("/queue/heartbeat", summary="Extend leases; hear of cancelled jobs")
async def heartbeat(request: Request, body: HeartbeatBody, key: Key) -> Response:
    outcome = await app_state(request).queue.heartbeat(
        key, body.node_id, body.lease_ids, body.stats
    )
    return JSONResponse(
        {
            "extended": outcome.extended,
            "lost": outcome.lost,
            "cancelled": outcome.cancelled,
            "lease_expires_at": outcome.lease_expires_at,
        }
    )


@router.post("/queue/watch", summary="Long-poll: hear at once of cancelled running jobs")
async def watch(request: Request, body: WatchBody, key: Key) -> Response:
    caller = ConnectionCaller(request)
    leases = {item.job_id: item.lease_id for item in body.leases}
    try:
        cancelled = await app_state(request).queue.watch(
            key, body.node_id, leases, body.wait, caller
        )
    finally:
        caller.close()
    return JSONResponse({"cancelled": cancelled})


@router.post("/queue/events", summary="Push token deltas of running jobs (batched)")
async def events(request: Request, body: EventsBody, key: Key) -> Response:
    accepted = await app_state(request).queue.push_deltas([e.model_dump() for e in body.events])
    return JSONResponse({"accepted": accepted})


@router.post("/queue/demand", summary="Queued models a node may fetch on demand")
async def demand(request: Request, body: DemandBody, key: Key) -> Response:
    models = await app_state(request).queue.demanded_models(key, body.node_id, body.prefixes)
    return JSONResponse({"models": models})


@router.post("/queue/submit", summary="Report results or errors, each acknowledged")
async def submit(request: Request, body: SubmitResultsBody, key: Key) -> Response:
    results = []
    for item in body.results:
        error = item.error.model_dump() if item.error is not None else None
        if item.result is None and error is None:
            error = {"message": "the node sent neither result nor error", "code": "empty_result"}
        code = error.get("code") if error else None
        results.append(
            NodeResult(
                job_id=item.job_id,
                lease_id=item.lease_id,
                result=item.result,
                error=error,
                retryable=bool(error and error.get("retryable")),
                released=code == "released",
            )
        )
    outcomes = await app_state(request).queue.submit_results(key, body.node_id, results)
    return JSONResponse(
        {
            "results": [
                {"job_id": o.job_id, "accepted": o.accepted, "reason": o.reason} for o in outcomes
            ]
        }
    )
