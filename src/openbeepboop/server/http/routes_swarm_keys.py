"""`GET /swarm/revocations`: the swarm keys this member knows revoked, for the other
members (member-authenticated, never with an API key: core/peer_auth.py)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from starlette.responses import Response

from openbeepboop.server.core.peer_auth import HEADER, check_peer
from openbeepboop.server.core.swarm_keys import ROUTE, revocation_json
from openbeepboop.server.errors import NotFound
from openbeepboop.server.http.bodies import CheckedRoute
from openbeepboop.server.http.outbound import JSONResponse
from openbeepboop.server.http.state import app_state

router = APIRouter(tags=["swarm"], route_class=CheckedRoute)


@router.get(ROUTE, summary="Revoked swarm keys (for the swarm's members)")
async def list_revocations(request: Request) -> Response:
    state = app_state(request)
    swarm_keys, secret = state.swarm_keys, state.keyring.signer
    if swarm_keys is None or secret is None:
        raise NotFound("this server is in no swarm (no swarm secret)", code="not_in_swarm")
    check_peer(secret, "GET", ROUTE, request.headers.get(HEADER), time.time())
    found = await swarm_keys.revocations()
    return JSONResponse(
        {
            "object": "list",
            "digest": swarm_keys.digest(),
            "data": [revocation_json(r) for r in found],
        }
    )
