"""The node protocol over HTTP (docs/node-protocol.md)."""

from __future__ import annotations

from typing import Any, Protocol

import aiohttp
import orjson

from openbeepboop import __version__
from openbeepboop.node.backends.base import JSON
from openbeepboop.node.http_env import proxy_arguments, tls_context


class ServerUnreachable(Exception):
    """The server did not answer (down, restarting, network): try again later."""


class ServerRefused(Exception):
    """The server answered with an error status; `status` and `code` say which."""

    def __init__(self, status: int, code: str | None, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class ServerClient(Protocol):
    """The node protocol's calls, as a node makes them (docs/node-protocol.md).
    `NodeClient` makes them over HTTP; a test may answer them in memory."""

    async def register(
        self, name: str, models: list[JSON], capacity: int, hardware: JSON
    ) -> str: ...

    async def fetch(
        self,
        node_id: str,
        models: list[str],
        max_jobs: int,
        wait: float,
        loaded: dict[str, float] | None = None,
    ) -> list[JSON]: ...

    async def heartbeat(self, node_id: str, lease_ids: list[str], stats: JSON) -> JSON: ...

    async def watch(self, node_id: str, leases: dict[str, str], wait: float) -> list[str]: ...

    async def events(self, node_id: str, events: list[JSON]) -> int: ...

    async def submit(self, node_id: str, results: list[JSON]) -> list[JSON]: ...

    async def demand(self, node_id: str, prefixes: list[str]) -> list[str]: ...

    async def close(self) -> None: ...


class NodeClient:
    """Calls the server's node routes with a node key.

    On aiohttp: a node makes two calls per job (the fetch that brings it and the submit
    of its result), and aiohttp spends about a quarter of httpx's CPU on each (0.28 ms
    against 0.96 ms a call on loopback), which is latency on every synchronous call."""

    def __init__(
        self, url: str, api_key: str, timeout: float, labels: dict[str, str] | None = None
    ) -> None:
        self._url = url.rstrip("/")
        self._labels = dict(labels or {})  # sent when registering: jobs pin to them
        # per request, not as the session's defaults: aiohttp copies a session's default
        # headers onto a proxy's CONNECT and makes an Authorization there the
        # Proxy-Authorization, which would hand the node key to the proxy
        self._headers = {
            "Authorization": f"Bearer {api_key}",
            "User-Agent": f"openbeepboop-node/{__version__}",
            "Content-Type": "application/json",
        }
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None  # made on the running loop
        self._proxy, proxy_headers = proxy_arguments(self._url)
        self._headers.update(proxy_headers)

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(connect=10, sock_read=self._timeout),
                # idle connections go before uvicorn closes them (after 5 s)
                connector=aiohttp.TCPConnector(
                    limit=16,
                    keepalive_timeout=4,
                    ssl=tls_context() if self._url.startswith("https:") else True,
                ),
            )
        return self._session

    async def _post(self, path: str, body: JSON, read_timeout: float | None = None) -> Any:
        extra: dict[str, Any] = {}
        if read_timeout is not None:  # a long-poll: longer than the session's default
            extra["timeout"] = aiohttp.ClientTimeout(connect=10, sock_read=read_timeout)
        try:
            post = self._http().post(
                self._url + path,
                data=orjson.dumps(body),
                headers=self._headers,
                **self._proxy,
                **extra,
            )
            async with post as r:
                status, raw = r.status, await r.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ServerUnreachable(f"{path}: {type(exc).__name__}: {exc}") from exc
        if status >= 500 or status == 429:
            raise ServerUnreachable(f"{path}: HTTP {status}")
        try:
            answer = orjson.loads(raw)
        except orjson.JSONDecodeError:
            answer = None
        if status >= 400:
            err = answer.get("error", {}) if isinstance(answer, dict) else {}
            text = raw[:200].decode(errors="replace")
            raise ServerRefused(status, err.get("code"), err.get("message", text))
        if answer is None:
            raise ServerUnreachable(f"{path}: HTTP {status} with a body that is not JSON")
        return answer

    async def register(self, name: str, models: list[JSON], capacity: int, hardware: JSON) -> str:
        body = {
            "name": name,
            "models": models,
            "capacity": capacity,
            "hardware": hardware,
            "version": __version__,
            "labels": self._labels,
        }
        return str((await self._post("/internal/nodes/register", body))["node_id"])

    async def fetch(
        self,
        node_id: str,
        models: list[str],
        max_jobs: int,
        wait: float,
        loaded: dict[str, float] | None = None,
    ) -> list[JSON]:
        body: JSON = {"node_id": node_id, "models": models, "max_jobs": max_jobs, "wait": wait}
        if loaded:
            body["loaded"] = loaded
        answer = await self._post("/internal/queue/fetch", body, read_timeout=wait + 30)
        return list(answer["jobs"])

    async def heartbeat(self, node_id: str, lease_ids: list[str], stats: JSON) -> JSON:
        body = {"node_id": node_id, "lease_ids": lease_ids, "stats": stats}
        return dict(await self._post("/internal/queue/heartbeat", body))

    async def watch(self, node_id: str, leases: dict[str, str], wait: float) -> list[str]:
        items = [{"job_id": job, "lease_id": lease} for job, lease in leases.items()]
        body = {"node_id": node_id, "leases": items, "wait": wait}
        answer = await self._post("/internal/queue/watch", body, read_timeout=wait + 30)
        return [str(job_id) for job_id in answer["cancelled"]]

    async def events(self, node_id: str, events: list[JSON]) -> int:
        body = {"node_id": node_id, "events": events}
        return int((await self._post("/internal/queue/events", body))["accepted"])

    async def submit(self, node_id: str, results: list[JSON]) -> list[JSON]:
        body = {"node_id": node_id, "results": results}
        return list((await self._post("/internal/queue/submit", body))["results"])

    async def demand(self, node_id: str, prefixes: list[str]) -> list[str]:
        body = {"node_id": node_id, "prefixes": prefixes}
        return [str(m) for m in (await self._post("/internal/queue/demand", body))["models"]]

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
