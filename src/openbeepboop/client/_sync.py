"""`Client`: the same surface as `AsyncClient`, blocking.

It is a thin shell: every call runs the `AsyncClient` method on a private event loop in
a background thread, so there is one copy of the logic, and it works where a loop is
already running (Jupyter).

    client = Client(base_url="http://127.0.0.1:8000", api_key=KEY)
    job = client.chat.completions.create(model="echo", messages=[...])
    print(job.id, job.status)
    print(job.get(wait=True).choices[0].message.content)
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import threading
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from openbeepboop.client._async import (
    AsyncClient,
    AsyncJob,
    Completions,
    Jobs,
    Results,
    Templates,
)
from openbeepboop.client.errors import JobFailedError, StreamInterruptedError

if TYPE_CHECKING:
    from openbeepboop.client.runs import RunOutcome, RunResult
    from openbeepboop.swarm.records import MemberRecord

T = TypeVar("T")


class _Loop:
    """An event loop running forever in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, daemon=True, name="openbeepboop-client"
        )
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def stop(self) -> None:
        """Finish what is left on the loop (async generators the garbage collector
        handed to it to close, and their tasks), then stop and close it: a task still
        pending when the loop closes is printed as "Task was destroyed but it is
        pending" at exit."""
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(_drain(), self.loop).result(timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()


class Job:
    """A submitted job. Reading `status` asks the server."""

    def __init__(self, loop: _Loop, job: AsyncJob) -> None:
        self._loop = loop
        self._job = job

    @property
    def id(self) -> str:
        return self._job.id

    @property
    def base_url(self) -> str:
        """The server the job lives on."""
        return self._job.base_url

    @property
    def failovers(self) -> list[tuple[str, str]]:
        """(server, job id) of each earlier copy of this job, left on a server that
        stopped answering (see `AsyncJob.fail_over`)."""
        return self._job.failovers

    @property
    def status(self) -> str:
        """The job's status, fresh from the server."""
        if not self._job.done:
            self._loop.run(self._job.refresh())
        return self._job.status

    @property
    def data(self) -> dict[str, Any]:
        return self._job.data

    @property
    def done(self) -> bool:
        return self._job.done

    @property
    def result(self) -> Any:
        return self._job.result

    @property
    def error(self) -> dict[str, Any] | None:
        return self._job.error

    @property
    def cached(self) -> bool:
        """Whether the server's response cache answered it (no node ran it)."""
        return self._job.cached

    @property
    def alias(self) -> str | None:
        """The alias it was submitted for (its `model` is the member that ran it)."""
        return self._job.alias

    @property
    def queue_position(self) -> int | None:
        """While queued: how many jobs run before it (as last seen); else None."""
        return self._job.queue_position

    @property
    def eta(self) -> datetime | None:
        """While queued: when it should start (an aware UTC datetime; as last seen, so
        `job.refresh().eta` for a fresh one); see `AsyncJob.eta`."""
        return self._job.eta

    def __repr__(self) -> str:
        return f"<Job {self.id} {self._job.status}>"

    def refresh(self) -> Job:
        self._loop.run(self._job.refresh())
        return self

    def cancel(self) -> Job:
        self._loop.run(self._job.cancel())
        return self

    def events(self, after: int | None = None) -> Iterator[dict[str, Any]]:
        """The job's live events; see `AsyncJob.events`."""
        try:
            yield from self._iterate(self._job.events(after))
        except StreamInterruptedError as exc:
            exc.job = self
            raise

    def stream(self) -> Iterator[str]:
        """The answer's text as it is made; see `AsyncJob.stream`."""
        try:
            yield from self._iterate(self._job.stream())
        except (JobFailedError, StreamInterruptedError) as exc:
            exc.job = self
            raise

    def __iter__(self) -> Iterator[str]:
        return self.stream()

    def _iterate(self, source: AsyncIterator[T]) -> Iterator[T]:
        return _iterate(self._loop, source)

    def get(self, wait: bool = True, timeout: float | None = None) -> Any:
        """The OpenAI-shaped result; see `AsyncJob.get`."""
        try:
            return self._loop.run(self._job.get(wait=wait, timeout=timeout))
        except JobFailedError as exc:
            exc.job = self  # this Job, not the AsyncJob inside it
            raise


class _SyncCompletions:
    def __init__(self, loop: _Loop, inner: Completions) -> None:
        self._loop = loop
        self._inner = inner

    def create(self, *, idempotency_key: str | None = None, **params: Any) -> Job:
        """Queue one request and return its job at once."""
        job = self._loop.run(self._inner.create(idempotency_key=idempotency_key, **params))
        return Job(self._loop, job)

    def create_many(
        self, requests: Iterable[dict[str, Any]], *, idempotency_prefix: str | None = None
    ) -> list[Job]:
        """Queue many requests in bulk; returns their jobs in order."""
        jobs = self._loop.run(
            self._inner.create_many(requests, idempotency_prefix=idempotency_prefix)
        )
        return [Job(self._loop, j) for j in jobs]


class _SyncChat:
    def __init__(self, loop: _Loop, inner: Completions) -> None:
        self.completions = _SyncCompletions(loop, inner)


class _SyncJobs:
    def __init__(self, loop: _Loop, inner: Jobs) -> None:
        self._loop = loop
        self._inner = inner

    def create(self, **spec: Any) -> Job:
        """Queue one job; see `Jobs.create` (an OpenAI body, or a template and query)."""
        return Job(self._loop, self._loop.run(self._inner.create(**spec)))

    def create_many(self, specs: Iterable[dict[str, Any]]) -> builtins.list[Job]:
        """Queue many jobs in bulk calls; see `Jobs.create_many`."""
        return [Job(self._loop, j) for j in self._loop.run(self._inner.create_many(specs))]

    def get(self, job_id: str) -> Job:
        return Job(self._loop, self._loop.run(self._inner.get(job_id)))

    def cancel(self, job_id: str) -> Job:
        return Job(self._loop, self._loop.run(self._inner.cancel(job_id)))

    def list(self, **filters: Any) -> list[Job]:
        return [Job(self._loop, j) for j in self._loop.run(self._inner.list(**filters))]

    def as_completed(self, jobs: Iterable[Job], timeout: float | None = None) -> Iterator[Job]:
        """Yield jobs as they finish (long-polls under the hood)."""
        by_id = {j.id: j for j in jobs}
        stream = self._inner.as_completed([j._job for j in by_id.values()], timeout)

        async def step() -> AsyncJob:
            return await anext(stream)

        while True:
            try:
                done = self._loop.run(step())
            except StopAsyncIteration:
                return
            yield by_id[done.id]

    def wait_all(self, jobs: Sequence[Job], timeout: float | None = None) -> builtins.list[Job]:
        """Wait until every job is final; returns them in the order given."""
        self._loop.run(self._inner.wait_all([j._job for j in jobs], timeout))
        return list(jobs)


class _SyncResults:
    def __init__(self, loop: _Loop, inner: Results) -> None:
        self._loop = loop
        self._inner = inner

    def poll(self, ids: Sequence[str], wait: float = 0) -> list[Job]:
        return [Job(self._loop, j) for j in self._loop.run(self._inner.poll(ids, wait))]


class _SyncTemplates:
    def __init__(self, loop: _Loop, inner: Templates) -> None:
        self._loop = loop
        self._inner = inner

    def create(
        self, name: str, streams: Sequence[dict[str, Any]], description: str = ""
    ) -> dict[str, Any]:
        return self._loop.run(self._inner.create(name, streams, description))

    def list(self) -> builtins.list[dict[str, Any]]:
        return self._loop.run(self._inner.list())

    def get(self, name: str) -> dict[str, Any]:
        return self._loop.run(self._inner.get(name))

    def delete(self, name: str) -> dict[str, Any]:
        return self._loop.run(self._inner.delete(name))


class Client:
    """The blocking client; arguments as for `AsyncClient`."""

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
        self._loop = _Loop()

        async def make() -> AsyncClient:
            return AsyncClient(
                base_url,
                api_key,
                timeout=timeout,
                max_retries=max_retries,
                bootstrap=bootstrap,
                failover_after=failover_after,
                model=model,
            )

        try:
            self._async = self._loop.run(make())
        except BaseException:
            self._loop.stop()
            raise
        self.base_url = self._async.base_url
        self.model = self._async.model
        self.discovery = self._async.discovery
        self.chat = _SyncChat(self._loop, self._async.chat.completions)
        self.completions = _SyncCompletions(self._loop, self._async.completions)
        self.embeddings = _SyncCompletions(self._loop, self._async.embeddings)
        self.jobs = _SyncJobs(self._loop, self._async.jobs)
        self.results = _SyncResults(self._loop, self._async.results)
        self.templates = _SyncTemplates(self._loop, self._async.templates)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """A raw API call (parsed JSON), with the client's retries and errors."""
        return self._loop.run(self._async.request(method, path, **kwargs))

    def run_batched(self, requests: Iterable[Any], **options: Any) -> RunOutcome:
        """Run many requests as one resumable run; see `AsyncClient.run_batched`.
        Ctrl+C stops it; the same call again resumes it."""
        return self._loop.run(self._async.run_batched(requests, **options))

    def iter_batched(self, requests: Iterable[Any], **options: Any) -> Iterator[RunResult]:
        """The results of a run as they come; see `AsyncClient.iter_batched`."""
        return _iterate(self._loop, self._async.iter_batched(requests, **options))

    def swarm_members(self, model: str | None = None) -> builtins.list[MemberRecord]:
        """The members the swarm's DHT lists; see `AsyncClient.swarm_members`."""
        return self._loop.run(self._async.swarm_members(model))

    def close(self) -> None:
        self._loop.run(self._async.close())
        self._loop.stop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _iterate(loop: _Loop, source: AsyncIterator[T]) -> Iterator[T]:
    """An async iterator on the client's loop, stepped from this thread."""
    steps: list[asyncio.Future[T]] = []  # the step under way, for `_close`

    async def step() -> T:
        steps[:] = [asyncio.ensure_future(anext(source))]
        return await steps[0]

    try:
        while True:
            try:
                yield loop.run(step())
            except StopAsyncIteration:
                return
    finally:
        loop.run(_close(source, steps))


async def _close(source: AsyncIterator[Any], steps: list[asyncio.Future[Any]]) -> None:
    """Close an async generator once its last step has ended: a step interrupted in
    the calling thread (Ctrl+C) is still being cancelled on the loop, and closing the
    generator meanwhile would raise "aclose(): asynchronous generator is already
    running"."""
    if steps:
        await asyncio.wait(steps)
    await source.aclose()  # type: ignore[attr-defined]


async def _drain() -> None:
    """Close the loop's remaining async generators and let their pending tasks end (or
    cancel them after a moment)."""
    loop = asyncio.get_running_loop()
    await loop.shutdown_asyncgens()
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    if others:
        _, pending = await asyncio.wait(others, timeout=2.0)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1.0)
