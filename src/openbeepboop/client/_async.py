"""`AsyncClient`: submit, poll, wait, cancel and bulk-submit jobs.

    async with AsyncClient(base_url="http://127.0.0.1:8000", api_key=KEY) as client:
        job = await client.chat.completions.create(model="echo", messages=[...])
        result = await job.get(wait=True, timeout=60)
        print(result.choices[0].message.content)

Every submit sends `Prefer: respond-async` and an `Idempotency-Key`, so a retried call
never becomes a second job. Transient failures (connection errors, 429, 502-504) are
retried with backoff, honouring `Retry-After`.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import httpx
from httpx_sse import aconnect_sse
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from openbeepboop import __version__
from openbeepboop.client.errors import (
    APIConnectionError,
    JobFailedError,
    JobTimeoutError,
    OpenBeepBoopError,
    RateLimitError,
    ServerError,
    from_response,
)
from openbeepboop.client.types import typed_result

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
FINAL = frozenset({"completed", "failed", "cancelled", "expired"})
KNOBS = (
    "priority",
    "max_attempts",
    "expires_at",
    "ttl_seconds",
    "metadata",
    "custom_id",
    "node",
    "node_labels",
)
LONG_POLL = 30.0  # seconds per long-poll; the server caps it too
BULK_CHUNK = 1000
POLL_CHUNK = 5000


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, APIConnectionError | RateLimitError):
        return True
    return isinstance(exc, ServerError) and exc.status in (502, 503, 504)


def _wait(state: RetryCallState) -> float:
    exc = state.outcome.exception() if state.outcome else None
    after = getattr(exc, "retry_after", None)
    if after:
        return float(after)
    return float(wait_exponential_jitter(multiplier=0.5, max=20)(state))


class AsyncClient:
    """The asynchronous client. Arguments default to `OPENBEEPBOOP_BASE_URL` and
    `OPENBEEPBOOP_API_KEY`."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 3,
    ) -> None:
        self.base_url = base_url or os.environ.get("OPENBEEPBOOP_BASE_URL") or DEFAULT_BASE_URL
        self.base_url = self.base_url.rstrip("/").removesuffix("/v1")
        self.api_key = api_key or os.environ.get("OPENBEEPBOOP_API_KEY") or local_client_key()
        self.max_retries = max_retries
        headers = {"User-Agent": f"openbeepboop-client/{__version__}"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=headers, timeout=httpx.Timeout(timeout, connect=10)
        )
        self.chat = _Chat(self)
        self.completions = Completions(self, "/v1/completions")
        self.embeddings = Completions(self, "/v1/embeddings")
        self.jobs = Jobs(self)
        self.results = Results(self)
        self.templates = Templates(self)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        headers: dict[str, str] | None = None,
        read_timeout: float | None = None,
    ) -> Any:
        """One API call, retried on transient failures; returns the parsed JSON."""
        retrying = AsyncRetrying(
            retry=retry_if_exception(_retryable),
            stop=stop_after_attempt(self.max_retries + 1),
            wait=_wait,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._once(method, path, body, headers, read_timeout)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _once(
        self,
        method: str,
        path: str,
        body: Any,
        headers: dict[str, str] | None,
        read_timeout: float | None,
    ) -> Any:
        timeout = httpx.Timeout(read_timeout, connect=10) if read_timeout else None
        try:
            r = await self._http.request(
                method,
                path,
                json=body,
                headers=headers,
                timeout=timeout or httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.HTTPError as exc:
            raise APIConnectionError(
                f"cannot reach the OpenBeepBoop server at {self.base_url}: "
                f"{type(exc).__name__}{': ' + str(exc) if str(exc) else ''}"
            ) from exc
        try:
            data = r.json()
        except ValueError:
            data = {"error": {"message": r.text[:500] or f"HTTP {r.status_code}"}}
        if r.status_code >= 400:
            error = from_response(r.status_code, data, r.headers)
            if r.status_code == 401 and not self.api_key:
                error.message += " (pass api_key= or set OPENBEEPBOOP_API_KEY)"
            raise error
        return data

    async def poll(self, ids: Sequence[str], wait: float = 0, only_final: bool = False) -> Any:
        body = {"ids": list(ids), "wait": wait, "only_final": only_final}
        return await self.request("POST", "/v1/results/poll", body=body, read_timeout=wait + 30)


class AsyncJob:
    """A submitted job. `status` is the last status seen; `refresh()` asks again."""

    def __init__(self, client: AsyncClient, data: dict[str, Any]) -> None:
        self._client = client
        self.data = data

    @property
    def id(self) -> str:
        return str(self.data["id"])

    @property
    def status(self) -> str:
        return str(self.data["status"])

    @property
    def done(self) -> bool:
        return self.status in FINAL

    @property
    def error(self) -> dict[str, Any] | None:
        error = self.data.get("error")
        return error if isinstance(error, dict) else None

    @property
    def result(self) -> Any:
        """The OpenAI-shaped result (an `openai` type when the package is there), or None."""
        raw = self.data.get("result")
        return None if raw is None else typed_result(self.data.get("endpoint", ""), raw)

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.status}>"

    async def refresh(self) -> AsyncJob:
        self.data = await self._client.request("GET", f"/v1/jobs/{self.id}")
        return self

    async def cancel(self) -> AsyncJob:
        self.data = await self._client.request("POST", f"/v1/jobs/{self.id}/cancel")
        return self

    async def wait(self, timeout: float | None = None) -> AsyncJob:
        """Long-poll until the job is final; JobTimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done:
            remaining = LONG_POLL if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                raise JobTimeoutError(
                    f"job {self.id} is still {self.status} after {timeout:g} s", code="timeout"
                )
            answer = await self._client.poll([self.id], wait=min(remaining, LONG_POLL))
            if not answer["data"]:
                raise OpenBeepBoopError(f"job {self.id} is gone", code="not_found")
            self.data = answer["data"][0]
        return self

    async def events(self, after: int | None = None) -> AsyncIterator[dict[str, Any]]:
        """The job's live events (`queued`, `started`, `token` {t, i}, then `end`, `failed`
        or `cancelled`) from the start, or after event id `after`. A dropped connection is
        resumed where it broke (`Last-Event-ID`), up to `max_retries` times in a row."""
        client = self._client
        last = after
        failures = 0
        while True:
            headers = {} if last is None else {"Last-Event-ID": str(last)}
            try:
                async with aconnect_sse(
                    client._http,
                    "GET",
                    f"/v1/jobs/{self.id}/events",
                    headers=headers,
                    timeout=httpx.Timeout(None, connect=10),
                ) as source:
                    response = source.response
                    if response.status_code >= 400:
                        await response.aread()
                        raise from_response(response.status_code, response.json(), response.headers)
                    # closed here, not left to the garbage collector: a generator it
                    # finalizes schedules its close on a loop that may be closing
                    async with aclosing(source.aiter_sse()) as sses:
                        async for sse in sses:
                            if sse.data == "[DONE]":
                                return
                            failures = 0
                            if sse.id:
                                last = int(sse.id)
                            yield json.loads(sse.data)
                return
            except (httpx.TransportError, httpx.RemoteProtocolError) as exc:
                failures += 1
                if failures > client.max_retries:
                    raise APIConnectionError(
                        f"lost the event stream of job {self.id}: {type(exc).__name__}"
                    ) from exc
                await asyncio.sleep(min(0.5 * 2**failures, 10))

    async def stream(self) -> AsyncIterator[str]:
        """The answer's text as it is made (the text so far first). At the end the job is
        refreshed; a failed or cancelled job raises JobFailedError."""
        async for event in self.events():
            if event["type"] == "token":
                yield str(event["t"])
            elif event["type"] in ("end", "failed", "cancelled"):
                break
        await self.refresh()
        if self.status != "completed":
            await self.get(wait=False)  # raises JobFailedError with the job's error

    def __aiter__(self) -> AsyncIterator[str]:
        return self.stream()

    async def get(self, wait: bool = True, timeout: float | None = None) -> Any:
        """The result. With `wait`, block until it is there; without, None while running.
        A failed, cancelled or expired job raises JobFailedError."""
        if wait:
            await self.wait(timeout)
        elif not self.done:
            await self.refresh()
        if self.status == "completed":
            return self.result
        if not self.done:
            return None
        error = self.error or {}
        detail = f": {error['message']}" if error.get("message") else ""
        raise JobFailedError(
            f"job {self.id} {self.status}{detail}", job=self, code=error.get("code")
        )


class Completions:
    """`create` one job or `create_many` in bulk, for one OpenAI endpoint."""

    def __init__(self, client: AsyncClient, endpoint: str) -> None:
        self._client = client
        self.endpoint = endpoint

    async def create(self, *, idempotency_key: str | None = None, **params: Any) -> AsyncJob:
        """Queue one request (OpenAI's parameters plus priority, metadata, max_attempts,
        ttl_seconds, expires_at, custom_id, and a pin: `node` (a node's name or id) or
        `node_labels` (labels the node must carry)) and return its job at once."""
        headers = {"Prefer": "respond-async", "Idempotency-Key": idempotency_key or _key()}
        data = await self._client.request("POST", self.endpoint, body=params, headers=headers)
        return AsyncJob(self._client, data)

    async def create_many(
        self, requests: Iterable[dict[str, Any]], *, idempotency_prefix: str | None = None
    ) -> list[AsyncJob]:
        """Queue many requests in bulk calls of up to 1,000; returns their jobs in order.
        A request's own `idempotency_key` field, or with `idempotency_prefix` the key
        `{prefix}-{i}`, makes a re-run of the same list return the same jobs."""
        specs = [self._spec(r, idempotency_prefix, i) for i, r in enumerate(requests)]
        jobs: list[AsyncJob] = []
        for start in range(0, len(specs), BULK_CHUNK):
            answer = await self._client.request(
                "POST", "/v1/jobs", body={"jobs": specs[start : start + BULK_CHUNK]}
            )
            jobs += [AsyncJob(self._client, d) for d in answer["data"]]
        return jobs

    def _spec(self, request: dict[str, Any], prefix: str | None, i: int) -> dict[str, Any]:
        body = {k: v for k, v in request.items() if k not in KNOBS and k != "idempotency_key"}
        spec = {k: request[k] for k in KNOBS if k in request}
        key = request.get("idempotency_key") or (f"{prefix}-{i}" if prefix else _key())
        return {"url": self.endpoint, "body": body, "idempotency_key": key, **spec}


class _Chat:
    def __init__(self, client: AsyncClient) -> None:
        self.completions = Completions(client, "/v1/chat/completions")


class Jobs:
    """Jobs by id, listing, cancelling, and waiting for many; `create` for the job API
    (an OpenAI body, or a stored assistant template with a query)."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def create(
        self,
        *,
        template: str | None = None,
        query: str | None = None,
        history: Sequence[dict[str, Any]] | None = None,
        body: dict[str, Any] | None = None,
        url: str = "/v1/chat/completions",
        idempotency_key: str | None = None,
        **knobs: Any,
    ) -> AsyncJob:
        """Queue one job: `body` for `url`, or `template` rendered with `query` and
        `history`. `knobs`: priority, metadata, max_attempts, ttl_seconds, expires_at,
        custom_id, node, node_labels."""
        spec = _job_spec(template, query, history, body, url, idempotency_key, knobs)
        return AsyncJob(self._client, await self._client.request("POST", "/v1/jobs", body=spec))

    async def create_many(self, specs: Iterable[dict[str, Any]]) -> builtins.list[AsyncJob]:
        """Queue many jobs (each a dict of `create`'s arguments) in bulk calls."""
        bodies = [
            _job_spec(
                s.get("template"),
                s.get("query"),
                s.get("history"),
                s.get("body"),
                s.get("url", "/v1/chat/completions"),
                s.get("idempotency_key"),
                {k: s[k] for k in KNOBS if k in s},
            )
            for s in specs
        ]
        jobs: builtins.list[AsyncJob] = []
        for start in range(0, len(bodies), BULK_CHUNK):
            answer = await self._client.request(
                "POST", "/v1/jobs", body={"jobs": bodies[start : start + BULK_CHUNK]}
            )
            jobs += [AsyncJob(self._client, d) for d in answer["data"]]
        return jobs

    async def get(self, job_id: str) -> AsyncJob:
        return AsyncJob(
            self._client, await self._client.request("GET", f"/v1/jobs/{quote(job_id, safe='')}")
        )

    async def cancel(self, job_id: str) -> AsyncJob:
        data = await self._client.request("POST", f"/v1/jobs/{quote(job_id, safe='')}/cancel")
        return AsyncJob(self._client, data)

    async def list(
        self,
        *,
        status: str | None = None,
        model: str | None = None,
        limit: int = 20,
        after: str | None = None,
    ) -> list[AsyncJob]:
        """One page, newest first; pass the last id as `after` for the next page."""
        params = {"status": status, "model": model, "limit": limit, "after": after}
        query = urlencode({k: v for k, v in params.items() if v is not None})
        page = await self._client.request("GET", f"/v1/jobs?{query}")
        return [AsyncJob(self._client, d) for d in page["data"]]

    async def as_completed(
        self, jobs: Iterable[AsyncJob], timeout: float | None = None
    ) -> AsyncIterator[AsyncJob]:
        """Yield jobs as they reach a final state (long-polls; never a busy loop)."""
        pending = {j.id: j for j in jobs}
        for job in [j for j in pending.values() if j.done]:
            del pending[job.id]
            yield job
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            remaining = LONG_POLL if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                raise JobTimeoutError(f"{len(pending)} jobs still running after {timeout:g} s")
            ids = [*pending][:POLL_CHUNK]
            answer = await self._client.poll(ids, wait=min(remaining, LONG_POLL), only_final=True)
            for data in answer["data"]:
                if data["id"] in pending:
                    job = pending.pop(data["id"])
                    job.data = data
                    yield job
            for missing in answer.get("not_found", []):
                pending.pop(missing, None)

    async def wait_all(
        self, jobs: Sequence[AsyncJob], timeout: float | None = None
    ) -> builtins.list[AsyncJob]:
        """Wait until every job is final; returns them in the order given."""
        async for _ in self.as_completed(jobs, timeout):
            pass
        return builtins.list(jobs)


def _job_spec(
    template: str | None,
    query: str | None,
    history: Sequence[dict[str, Any]] | None,
    body: dict[str, Any] | None,
    url: str,
    idempotency_key: str | None,
    knobs: dict[str, Any],
) -> dict[str, Any]:
    spec: dict[str, Any] = {"idempotency_key": idempotency_key or _key(), **knobs}
    if template is not None:
        spec.update(template=template, query=query or "")
        if history is not None:
            spec["history"] = list(history)
    else:
        spec.update(url=url, body=body)
    return spec


class Templates:
    """Named assistant templates stored on the server (streams of provider, settings
    and messages; see docs/http-api.md)."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def create(
        self, name: str, streams: Sequence[dict[str, Any]], description: str = ""
    ) -> dict[str, Any]:
        """Create or replace the template `name`."""
        body = {"name": name, "streams": list(streams), "description": description}
        return dict(await self._client.request("POST", "/v1/templates", body=body))

    async def list(self) -> builtins.list[dict[str, Any]]:
        return builtins.list((await self._client.request("GET", "/v1/templates"))["data"])

    async def get(self, name: str) -> dict[str, Any]:
        return dict(await self._client.request("GET", f"/v1/templates/{quote(name, safe='')}"))

    async def delete(self, name: str) -> dict[str, Any]:
        path = f"/v1/templates/{quote(name, safe='')}"
        return dict(await self._client.request("DELETE", path))


class Results:
    """Several jobs at once."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def poll(self, ids: Sequence[str], wait: float = 0) -> list[AsyncJob]:
        """The jobs with these ids; with `wait`, held until one of them is final."""
        answer = await self._client.poll(ids, wait=wait)
        return [AsyncJob(self._client, d) for d in answer["data"]]


def local_client_key() -> str | None:
    """The client key `openbeepboop serve` saved in its default data directory, if any:
    on the machine that runs the all-in-one server, clients need no setup."""
    import platformdirs

    data_dir = os.environ.get("OPENBEEPBOOP_DATA_DIR") or platformdirs.user_data_dir(
        "openbeepboop", appauthor=False
    )
    path = Path(data_dir) / "client.key"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _key() -> str:
    return "obb-" + uuid.uuid4().hex
