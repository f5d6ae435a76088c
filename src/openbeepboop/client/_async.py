"""`AsyncClient`: submit, poll, wait, cancel and bulk-submit jobs.

    async with AsyncClient(base_url="http://127.0.0.1:8000", api_key=KEY) as client:
        job = await client.chat.completions.create(model="echo", messages=[...])
        result = await job.get(wait=True, timeout=60)
        print(result.choices[0].message.content)

Every submit sends `Prefer: respond-async` and an `Idempotency-Key`, so a retried call
never becomes a second job. Transient failures (connection errors, 429, 502-504) are
retried with backoff, honouring `Retry-After`.

With `bootstrap="host:port,..."` the client finds the servers of a swarm through its DHT
(`discovery.py`), sends each submit to the least loaded server for the model, and fails
over to the next when one does not answer; each job remembers its server. A job whose
server stays unreachable for `failover_after` seconds while it is waited for is
submitted again elsewhere (same request, same idempotency key) and followed there; the
old server and job id are kept in `job.failovers` and logged.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import logging
import os
import time
import uuid
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Collection, Iterable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
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
from openbeepboop.client.config import default_model, endpoint
from openbeepboop.client.errors import (
    APIConnectionError,
    JobFailedError,
    JobTimeoutError,
    NotFoundError,
    OpenBeepBoopError,
    RateLimitError,
    ServerError,
    StreamInterruptedError,
    from_response,
)
from openbeepboop.client.types import typed_result
from openbeepboop.client.wire import (
    BULK_CHUNK,
    FINAL,
    KNOBS,
    LONG_POLL,
    POLL_CHUNK,
    Resubmit,
)

if TYPE_CHECKING:
    from openbeepboop.client.discovery import Discovery
    from openbeepboop.client.runs import RunOutcome, RunResult
    from openbeepboop.swarm.records import MemberRecord

log = logging.getLogger("openbeepboop.client")

DOWN_RETRY = 0.5  # seconds between tries of an unreachable server before failing over
CONTENT = frozenset({"token", "delta"})  # events that carry the answer


def _unreachable(exc: BaseException) -> bool:
    """Whether `exc` says the server is not there (rather than what it answered)."""
    return isinstance(exc, APIConnectionError) or (
        isinstance(exc, ServerError) and exc.status in (502, 503, 504)
    )


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
    """The asynchronous client. Arguments default to `OPENBEEPBOOP_BASE_URL`,
    `OPENBEEPBOOP_API_KEY` and `OPENBEEPBOOP_MODEL` (then `OPENAI_*`; see `config.py`).
    One client may serve several event loops in turn (repeated `asyncio.run()`)."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 3,
        bootstrap: str | Sequence[str] | None = None,
        failover_after: float = 5.0,
        model: str | None = None,
    ) -> None:
        where = endpoint(base_url, api_key)
        self.base_url = where.base_url
        self._explicit_base = where.explicit
        self.model = default_model(model)
        if bootstrap is None:
            bootstrap = os.environ.get("OPENBEEPBOOP_BOOTSTRAP") or None
        self.discovery: Discovery | None = None
        if bootstrap:
            from openbeepboop.client.discovery import Discovery, parse_bootstrap

            self.discovery = Discovery(parse_bootstrap(bootstrap))
        self.failover_after = failover_after
        self.api_key = where.api_key
        self.max_retries = max_retries
        headers = {"User-Agent": f"openbeepboop-client/{__version__}"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if self.discovery is not None:
            self.discovery.headers = dict(headers)
        self._headers = headers
        self._timeout = httpx.Timeout(timeout, connect=10)
        # one HTTP client per event loop: the client outlives `asyncio.run()` calls
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopHttp] = (
            weakref.WeakKeyDictionary()
        )
        self.chat = _Chat(self)
        self.completions = Completions(self, "/v1/completions")
        self.embeddings = Completions(self, "/v1/embeddings")
        self.jobs = Jobs(self)
        self.results = Results(self)
        self.templates = Templates(self)

    async def http(self) -> httpx.AsyncClient:
        """The HTTP client of the running event loop, made on first use. It is closed
        with the loop (`asyncio.run` shuts down async generators before it closes the
        loop, and one of those closes it), or by `close()`."""
        loop = asyncio.get_running_loop()
        held = self._loops.get(loop)
        if held is None:
            http = httpx.AsyncClient(
                base_url=self.base_url, headers=self._headers, timeout=self._timeout
            )
            held = _LoopHttp(http, _close_with_loop(http))
            await anext(held.guard)  # started: the loop now knows it, and will close it
            self._loops[loop] = held
        return held.http

    async def run_batched(self, requests: Iterable[Any], **options: Any) -> RunOutcome:
        """Run many requests as one resumable run; every result, in input order.

            outcome = await client.run_batched(prompts, name="eval-v3", model="llama3")

        `requests`: OpenAI chat bodies, batch lines `{custom_id, url, body}`, prompt
        objects or strings. Options: `name`, `metadata`, `model`, `ordered` (True),
        `max_outstanding` (MAX_OUTSTANDING, 1000), `num_workers` (BATCH_NUM_WORKERS, 4),
        `heartbeat_s` (10), `max_failures` (25; 0 never), `rpm` (RPM, 0: no limit),
        `timeout_s` (TIMEOUT_S, 0: none), `max_attempts` (MAX_ATTEMPTS), `wait_s`,
        `resume` (True), `run_id`, `state_dir`. Raises `RunAbortedError` (with
        `.outcome`) after `max_failures` failed jobs. See docs/client.md, "Running a
        batch"."""
        from openbeepboop.client import runs

        return await runs.run_batched(self, requests, **options)

    def iter_batched(self, requests: Iterable[Any], **options: Any) -> AsyncIterator[RunResult]:
        """As `run_batched`, yielding each result as it finishes (`ordered=True`: in
        input order). Leaving the loop stops the run; it stays resumable."""
        from openbeepboop.client import runs

        return runs.iter_batched(self, requests, **options)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        held = self._loops.pop(asyncio.get_running_loop(), None)
        if held is not None:
            await held.guard.aclose()
        if self.discovery is not None:
            self.discovery.close()
            await asyncio.sleep(0)  # the DHT's transport closes its socket on the next turn

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        headers: dict[str, str] | None = None,
        read_timeout: float | None = None,
        base: str | None = None,
        retry: bool = True,
    ) -> Any:
        """One API call, retried on transient failures (unless `retry` is off); returns
        the parsed JSON. `base`: the server's URL [`base_url`; in a swarm without one,
        the least loaded member]."""
        base = base or await self.home()
        if not retry:
            return await self._once(method, path, body, headers, read_timeout, base)
        retrying = AsyncRetrying(
            retry=retry_if_exception(_retryable),
            stop=stop_after_attempt(self.max_retries + 1),
            wait=_wait,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._once(method, path, body, headers, read_timeout, base)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _once(
        self,
        method: str,
        path: str,
        body: Any,
        headers: dict[str, str] | None,
        read_timeout: float | None,
        base: str,
    ) -> Any:
        timeout = httpx.Timeout(read_timeout, connect=10) if read_timeout else None
        try:
            r = await (await self.http()).request(
                method,
                base + path,
                json=body,
                headers=headers,
                timeout=timeout or httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.HTTPError as exc:
            raise APIConnectionError(
                f"cannot reach the OpenBeepBoop server at {base}: "
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

    async def poll(
        self,
        ids: Sequence[str],
        wait: float = 0,
        only_final: bool = False,
        *,
        base: str | None = None,
        retry: bool = True,
    ) -> Any:
        body = {"ids": list(ids), "wait": wait, "only_final": only_final}
        return await self.request(
            "POST", "/v1/results/poll", body=body, read_timeout=wait + 30, base=base, retry=retry
        )

    # -- the swarm --------------------------------------------------------------------

    async def home(self) -> str:
        """Where calls that name no job or model go: `base_url` when given (or without a
        swarm), else the least loaded member."""
        if self.discovery is None or self._explicit_base:
            return self.base_url
        return (await self.candidates(None))[0]

    async def candidates(self, model: str | None) -> list[str]:
        """The servers to try for `model`, best first (see `discovery.py`); an explicit
        `base_url` first. Members whose records do not list the model come after those
        that do (a member forwards what it does not serve)."""
        discovery = self.discovery
        if discovery is None:
            return [self.base_url]
        try:
            urls = discovery.rank(await discovery.members(model), model)
            if model is not None:
                others = discovery.rank(await discovery.members(None), None)
                urls += [u for u in others if u not in urls]
        except APIConnectionError:
            if not self._explicit_base:
                raise
            log.warning("the swarm's bootstrap did not answer; using %s alone", self.base_url)
            return [self.base_url]
        if self._explicit_base and not discovery.is_down(self.base_url):
            urls = [self.base_url, *(u for u in urls if u != self.base_url)]
        if not urls:
            raise APIConnectionError(
                "the swarm lists no server" + (f" for model {model!r}" if model else ""),
                code="no_server",
            )
        return urls

    async def submit(self, resubmit: Resubmit, exclude: Collection[str] = ()) -> tuple[str, Any]:
        """Send a submit to the best server that answers: (its URL, the answer). In a
        swarm, a server that cannot be reached (or answers 429, 502-504) is passed
        over for the next; after all, the round is tried again with backoff, up to
        `max_retries` times. Without a swarm, as `request`."""
        r = resubmit
        if self.discovery is None:
            data = await self.request("POST", r.path, body=r.body, headers=r.headers)
            return self.base_url, data
        last: OpenBeepBoopError | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                await asyncio.sleep(min(0.5 * 2**attempt, 10))
                self.discovery.forget()
            for url in await self.candidates(r.model):
                if url in exclude:
                    continue
                try:
                    data = await self._once("POST", r.path, r.body, r.headers, None, url)
                except (APIConnectionError, RateLimitError, ServerError) as exc:
                    if not _retryable(exc):
                        raise
                    if isinstance(exc, APIConnectionError):
                        self.discovery.mark_down(url)
                    last = exc
                    continue
                count = len(r.body["jobs"]) if isinstance(r.body, dict) and "jobs" in r.body else 1
                self.discovery.note_sent(url, count)
                return url, data
        raise last or APIConnectionError(
            "no other server of the swarm" + (f" serves model {r.model!r}" if r.model else ""),
            code="no_server",
        )

    async def swarm_members(self, model: str | None = None) -> builtins.list[MemberRecord]:
        """The members the swarm's DHT lists (for `model`, or all), newest record first."""
        if self.discovery is None:
            raise OpenBeepBoopError(
                "no swarm: give bootstrap= (or set OPENBEEPBOOP_BOOTSTRAP)", code="no_swarm"
            )
        self.discovery.forget()
        return await self.discovery.members(model)

    async def find_job(self, job_id: str, action: str = "") -> tuple[str, Any]:
        """GET (or POST `action`) a job by id: at home, and in a swarm on each member
        until one knows it. (its server, the job)"""
        path = f"/v1/jobs/{quote(job_id, safe='')}{action}"
        method = "POST" if action else "GET"
        home = await self.home()
        try:
            swarm = self.discovery is not None  # others to ask: no retries here
            return home, await self.request(method, path, base=home, retry=not swarm)
        except (NotFoundError, APIConnectionError):
            if self.discovery is None:
                raise
            for url in await self.candidates(None):
                if url == home:
                    continue
                try:
                    return url, await self.request(method, path, base=url, retry=False)
                except (NotFoundError, APIConnectionError):
                    continue
            raise


class AsyncJob:
    """A submitted job. `status` is the last status seen; `refresh()` asks again.
    `base_url` is the server it lives on; `failovers` the (server, job id) pairs it was
    moved away from because their server stopped answering."""

    def __init__(
        self,
        client: AsyncClient,
        data: dict[str, Any],
        base_url: str | None = None,
        resubmit: Resubmit | None = None,
    ) -> None:
        self._client = client
        self.data = data
        self.base_url = base_url or client.base_url
        self.failovers: list[tuple[str, str]] = []
        self._resubmit = resubmit

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
    def cached(self) -> bool:
        """Whether the server's response cache answered it (no node ran it)."""
        return bool(self.data.get("cached"))

    @property
    def alias(self) -> str | None:
        """The alias it was submitted for (its `model` is the member that ran it)."""
        alias = self.data.get("alias")
        return alias if isinstance(alias, str) else None

    @property
    def queue_position(self) -> int | None:
        """While queued: how many jobs run before it (as last seen); else None."""
        position = self.data.get("queue_position")
        return position if isinstance(position, int) else None

    @property
    def eta(self) -> datetime | None:
        """While queued: when it should start, an aware UTC `datetime` estimated by the
        server from its model's measured pace (as last seen: `refresh()` asks again);
        None when not queued or not known yet (nothing of its model ran lately).
        Seconds from now: `(job.eta - datetime.now(UTC)).total_seconds()`."""
        at = self.data.get("estimated_start_at")
        if not isinstance(at, int | float) or isinstance(at, bool):
            return None
        return datetime.fromtimestamp(at, UTC)

    @property
    def result(self) -> Any:
        """The OpenAI-shaped result (an `openai` type when the package is there), or None."""
        raw = self.data.get("result")
        return None if raw is None else typed_result(self.data.get("endpoint", ""), raw)

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.status}>"

    async def refresh(self) -> AsyncJob:
        self.data = await self._client.request("GET", f"/v1/jobs/{self.id}", base=self.base_url)
        return self

    async def cancel(self) -> AsyncJob:
        path = f"/v1/jobs/{self.id}/cancel"
        self.data = await self._client.request("POST", path, base=self.base_url)
        return self

    @property
    def can_fail_over(self) -> bool:
        """Whether this job can move to another server of a swarm (the client submitted
        it, so it knows the request)."""
        return self._client.discovery is not None and self._resubmit is not None

    async def fail_over(self, down_for: float = 0.0) -> AsyncJob:
        """Submit this job's request again on another server and follow that job; the
        old server and job id go to `failovers` (and the log: nothing is lost quietly)."""
        if self._resubmit is None:
            raise OpenBeepBoopError(f"job {self.id}: its request is not known here")
        old_url, old_id = self.base_url, self.id
        if self._client.discovery is not None:
            self._client.discovery.mark_down(old_url)
        url, data = await self._client.submit(self._resubmit, exclude={old_url})
        self.base_url = url
        self.data = data["data"][0] if self._resubmit.bulk else data
        self.failovers.append((old_url, old_id))
        log.warning(
            "job %s: its server %s did not answer for %.1f s; submitted again to %s as job %s "
            "(the old job may still run there if that server comes back)",
            old_id,
            old_url,
            down_for,
            url,
            self.id,
        )
        return self

    async def wait(self, timeout: float | None = None) -> AsyncJob:
        """Long-poll until the job is final; JobTimeoutError after `timeout` seconds. In
        a swarm, a server that does not answer for `failover_after` seconds has the job
        submitted again elsewhere (`fail_over`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        down = _Down(self._client.failover_after)
        while not self.done:
            remaining = LONG_POLL if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                raise JobTimeoutError(
                    f"job {self.id} is still {self.status} after {timeout:g} s", code="timeout"
                )
            movable = self.can_fail_over
            try:
                answer = await self._client.poll(
                    [self.id], wait=min(remaining, LONG_POLL), base=self.base_url, retry=not movable
                )
            except OpenBeepBoopError as exc:
                if not movable or not _retryable(exc):
                    raise
                if not _unreachable(exc):  # 429: the server is there, and busy
                    await asyncio.sleep(getattr(exc, "retry_after", None) or 1.0)
                elif down.long_enough():
                    await self.fail_over(down.seconds())
                    down.reset()
                else:
                    await asyncio.sleep(DOWN_RETRY)
                continue
            down.reset()
            if not answer["data"]:
                raise OpenBeepBoopError(f"job {self.id} is gone", code="not_found")
            self.data = answer["data"][0]
        return self

    async def events(self, after: int | None = None) -> AsyncIterator[dict[str, Any]]:
        """The job's live events (`queued`, `started`, `token` {t, i}, then `end`, `failed`
        or `cancelled`) from the start, or after event id `after`. A dropped connection is
        resumed where it broke (`Last-Event-ID`), up to `max_retries` times in a row, then
        StreamInterruptedError. In a swarm, a server that does not answer before any of
        the answer came has the job moved elsewhere (`fail_over`) and its events followed
        there; once text came, a lost stream raises (it is never repeated)."""
        client = self._client
        last = after
        failures = 0
        content = False
        down = _Down(client.failover_after)
        while True:
            headers = {} if last is None else {"Last-Event-ID": str(last)}
            try:
                async with aconnect_sse(
                    await client.http(),
                    "GET",
                    f"{self.base_url}/v1/jobs/{self.id}/events",
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
                            down.reset()
                            if sse.id:
                                last = int(sse.id)
                            event = json.loads(sse.data)
                            content = content or event.get("type") in CONTENT
                            yield event
                return
            except (httpx.TransportError, httpx.RemoteProtocolError) as exc:
                if not content and self.can_fail_over:
                    if down.long_enough():
                        await self.fail_over(down.seconds())
                        down.reset()
                        last, failures = None, 0
                    else:
                        await asyncio.sleep(DOWN_RETRY)
                    continue
                failures += 1
                if failures > client.max_retries:
                    raise StreamInterruptedError(
                        f"lost the event stream of job {self.id} on {self.base_url}: "
                        f"{type(exc).__name__}",
                        job=self,
                        content=content,
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
        resubmit = Resubmit(_model(params), self.endpoint, params, headers)
        url, data = await self._client.submit(resubmit)
        return AsyncJob(self._client, data, url, resubmit)

    async def create_many(
        self, requests: Iterable[dict[str, Any]], *, idempotency_prefix: str | None = None
    ) -> list[AsyncJob]:
        """Queue many requests in bulk calls of up to 1,000; returns their jobs in order.
        A request's own `idempotency_key` field, or with `idempotency_prefix` the key
        `{prefix}-{i}`, makes a re-run of the same list return the same jobs."""
        specs = [self._spec(r, idempotency_prefix, i) for i, r in enumerate(requests)]
        return await _submit_bulk(self._client, specs)

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
        resubmit = Resubmit(_model(body), "/v1/jobs", spec, None)
        where, data = await self._client.submit(resubmit)
        return AsyncJob(self._client, data, where, resubmit)

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
        return await _submit_bulk(self._client, bodies)

    async def get(self, job_id: str) -> AsyncJob:
        """A job by id (in a swarm: from whichever member knows it)."""
        url, data = await self._client.find_job(job_id)
        return AsyncJob(self._client, data, url)

    async def cancel(self, job_id: str) -> AsyncJob:
        url, data = await self._client.find_job(job_id, "/cancel")
        return AsyncJob(self._client, data, url)

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
        home = await self._client.home()
        page = await self._client.request("GET", f"/v1/jobs?{query}", base=home)
        return [AsyncJob(self._client, d, home) for d in page["data"]]

    async def as_completed(
        self, jobs: Iterable[AsyncJob], timeout: float | None = None
    ) -> AsyncIterator[AsyncJob]:
        """Yield jobs as they reach a final state (long-polls; never a busy loop). Jobs on
        several servers of a swarm are polled server by server (a second's hold each);
        a server that does not answer for `failover_after` seconds has its jobs moved
        elsewhere (`AsyncJob.fail_over`)."""
        pending = {id(j): j for j in jobs}
        for job in [j for j in pending.values() if j.done]:
            del pending[id(job)]
            yield job
        deadline = None if timeout is None else time.monotonic() + timeout
        downs: dict[str, _Down] = {}
        while pending:
            remaining = LONG_POLL if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                raise JobTimeoutError(f"{len(pending)} jobs still running after {timeout:g} s")
            groups: dict[str, dict[str, AsyncJob]] = {}
            for job in pending.values():
                groups.setdefault(job.base_url, {})[job.id] = job
            hold = min(remaining, LONG_POLL if len(groups) == 1 else 1.0)
            for base, group in groups.items():
                down = downs.setdefault(base, _Down(self._client.failover_after))
                finished, gone = await self._poll_group(base, group, hold, down, len(groups))
                for job in gone:
                    pending.pop(id(job), None)
                for job in finished:
                    if pending.pop(id(job), None) is not None:
                        yield job

    async def _poll_group(
        self, base: str, group: dict[str, AsyncJob], hold: float, down: _Down, groups: int
    ) -> tuple[builtins.list[AsyncJob], builtins.list[AsyncJob]]:
        """One long-poll of the jobs on server `base`: (the jobs final now, the jobs it
        does not know). A server that does not answer for long enough has its jobs
        moved (when all can be)."""
        movable = all(j.can_fail_over for j in group.values())
        try:
            answer = await self._client.poll(
                [*group][:POLL_CHUNK], hold, True, base=base, retry=not movable
            )
        except OpenBeepBoopError as exc:
            if not movable or not _retryable(exc):
                raise
            if not _unreachable(exc):  # 429: the server is there, and busy
                await asyncio.sleep(getattr(exc, "retry_after", None) or 1.0)
            elif down.long_enough():
                seconds = down.seconds()
                for job in group.values():
                    await job.fail_over(seconds)
                down.reset()
            else:
                await asyncio.sleep(DOWN_RETRY / groups)
            return [], []
        down.reset()
        finished = []
        for data in answer["data"]:
            done = group.get(data["id"])
            if done is not None:
                done.data = data
                finished.append(done)
        gone = [group[i] for i in answer.get("not_found", []) if i in group]
        return finished, gone

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
        home = await self._client.home()
        answer = await self._client.poll(ids, wait=wait, base=home)
        return [AsyncJob(self._client, d, home) for d in answer["data"]]


def _key() -> str:
    return "obb-" + uuid.uuid4().hex


def _model(body: Any) -> str | None:
    model = body.get("model") if isinstance(body, dict) else None
    return model if isinstance(model, str) and model else None


async def _submit_bulk(client: AsyncClient, specs: Sequence[dict[str, Any]]) -> list[AsyncJob]:
    """Bulk submits of up to 1,000 jobs a call, each call to the best server for its
    jobs' model (when they share one); each job keeps its one-job request for a
    failover."""
    jobs: list[AsyncJob] = []
    for start in range(0, len(specs), BULK_CHUNK):
        chunk = specs[start : start + BULK_CHUNK]
        models = {_model(s.get("body")) for s in chunk}
        model = models.pop() if len(models) == 1 else None
        url, answer = await client.submit(Resubmit(model, "/v1/jobs", {"jobs": chunk}, None))
        data = answer["data"]
        if len(data) != len(chunk):  # not one answer per spec: no pairing to trust
            jobs += [AsyncJob(client, d, url) for d in data]
            continue
        jobs += [
            AsyncJob(client, d, url, Resubmit(model, "/v1/jobs", {"jobs": [s]}, None, bulk=True))
            for s, d in zip(chunk, data, strict=True)
        ]
    return jobs


@dataclass
class _LoopHttp:
    """One event loop's HTTP client, and the async generator that closes it with the loop."""

    http: httpx.AsyncClient
    guard: AsyncGenerator[None, None]


async def _close_with_loop(http: httpx.AsyncClient) -> AsyncGenerator[None, None]:
    try:
        yield
    finally:
        await http.aclose()


class _Down:
    """How long a server has not answered, against the failover delay."""

    def __init__(self, after: float) -> None:
        self.after = after
        self.since: float | None = None

    def long_enough(self) -> bool:
        """Note a failure; whether the server has now been down `after` seconds."""
        if self.since is None:
            self.since = time.monotonic()
        return time.monotonic() - self.since >= self.after

    def seconds(self) -> float:
        return 0.0 if self.since is None else time.monotonic() - self.since

    def reset(self) -> None:
        self.since = None
