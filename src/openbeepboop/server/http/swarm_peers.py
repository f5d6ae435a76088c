"""Member-to-member HTTP: the fetch `SwarmKeys` is given (core/swarm_keys.py), which asks
another member for its revocations with this member's authentication (core/peer_auth.py)."""

from __future__ import annotations

import time
from typing import Any

import httpx

from openbeepboop.server.core.peer_auth import HEADER, peer_header
from openbeepboop.server.core.swarm_keys import ROUTE
from openbeepboop.swarm.secret import SwarmSecret

TIMEOUT = 5.0


class PeerFetch:
    """`await fetch(url)`: the `data` list of a member's `GET /swarm/revocations`."""

    def __init__(self, secret: SwarmSecret, timeout: float = TIMEOUT) -> None:
        self._secret = secret
        self._timeout = timeout

    async def __call__(self, url: str) -> Any:
        headers = {HEADER: peer_header(self._secret, "GET", ROUTE, time.time())}
        async with httpx.AsyncClient(timeout=self._timeout, trust_env=False) as http:
            r = await http.get(url, headers=headers)
        r.raise_for_status()
        return r.json().get("data")
