"""The node protocol over HTTP (docs/node-protocol.md)."""

from __future__ import annotations

from typing import Any

import httpx

from openbeepboop import __version__
from openbeepboop.node.backends.base import JSON


class ServerUnreachable(Exception):
    """The server did not answer (down, restarting, network): try again later."""


class ServerRefused(Exception):
    """The server answered with an error status; `status` and `code` say which."""

    def __init__(self, status: int, code: str | None, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class NodeClient:
    """Calls the server's node routes with a node key."""

    def __init__(self, url: str, api_key: str, timeout: float) -> None:
        self._http = httpx.AsyncClient(
            base_url=url.rstrip("/"),
            headers={
                "Authorization": f"Bearer {api_key}",
                "User-Agent": f"openbeepboop-node/{__version__}",
            },
            timeout=httpx.Timeout(timeout, connect=10),
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=8),
        )

    async def _post(self, path: str, body: JSON, read_timeout: float | None = None) -> Any:
        try:
            limit = httpx.Timeout(read_timeout, connect=10) if read_timeout else None
            r = await self._http.post(path, json=body, timeout=limit or httpx.USE_CLIENT_DEFAULT)
        except httpx.HTTPError as exc:
            raise ServerUnreachable(f"{path}: {type(exc).__name__}: {exc}") from exc
        if r.status_code >= 500 or r.status_code == 429:
            raise ServerUnreachable(f"{path}: HTTP {r.status_code}")
        if r.status_code >= 400:
            try:
                err = r.json().get("error", {})
            except ValueError:
                err = {}
            raise ServerRefused(r.status_code, err.get("code"), err.get("message", r.text[:200]))
        return r.json()

    async def register(self, name: str, models: list[JSON], capacity: int, hardware: JSON) -> str:
        body = {
            "name": name,
            "models": models,
            "capacity": capacity,
            "hardware": hardware,
            "version": __version__,
        }
        return str((await self._post("/internal/nodes/register", body))["node_id"])

    async def fetch(
        self, node_id: str, models: list[str], max_jobs: int, wait: float
    ) -> list[JSON]:
        body = {"node_id": node_id, "models": models, "max_jobs": max_jobs, "wait": wait}
        answer = await self._post("/internal/queue/fetch", body, read_timeout=wait + 30)
        return list(answer["jobs"])

    async def heartbeat(self, node_id: str, lease_ids: list[str], stats: JSON) -> JSON:
        body = {"node_id": node_id, "lease_ids": lease_ids, "stats": stats}
        return dict(await self._post("/internal/queue/heartbeat", body))

    async def events(self, node_id: str, events: list[JSON]) -> int:
        body = {"node_id": node_id, "events": events}
        return int((await self._post("/internal/queue/events", body))["accepted"])

    async def submit(self, node_id: str, results: list[JSON]) -> list[JSON]:
        body = {"node_id": node_id, "results": results}
        return list((await self._post("/internal/queue/submit", body))["results"])

    async def close(self) -> None:
        await self._http.aclose()
