"""Running jobs on a model: the `Executor` seam, and `BackendExecutor`, which runs them on
the model's backend in this process.

An executor is handed a `LeasedJob` and answers with an `Outcome`, plain data both; the
text it makes on the way goes to a `DeltaSink`. The runner stops a job by cancelling the
task that awaits `run`. An executor that runs its backend in a worker process of its own
implements the same calls: `load` starts the worker and builds the backend there, `run`
sends the job and relays the worker's pieces to the sink, a cancellation tells the worker
to drop the job, `close` stops it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

from tenacity import wait_exponential_jitter

from openbeepboop.node.backends.base import JSON, Backend, BackendError, Chunk
from openbeepboop.node.backoff import Backoff
from openbeepboop.node.jobs import LeasedJob, Outcome
from openbeepboop.node.pacing import Pacer
from openbeepboop.node.results import build_response

log = logging.getLogger("openbeepboop.node")
# the states in which a model takes jobs: "unloaded" (a worker stopped when idle, or
# that died) starts again for the next job
SERVING = frozenset({"ready", "unloaded"})
BackendFactory = Callable[[Any, Path], Backend]  # (model config, models_dir) -> Backend
PROVIDER_WAIT = wait_exponential_jitter(multiplier=1, max=30)  # 1 s doubling, + <= 1 s


class ModelSettings(Protocol):
    """What the node reads of a model's `[[models]]` entry (its backend reads the rest)."""

    @property
    def name(self) -> str: ...

    @property
    def backend(self) -> str: ...

    @property
    def concurrency(self) -> int: ...

    @property
    def rpm(self) -> float | None: ...

    @property
    def timeout_seconds(self) -> float: ...

    @property
    def max_attempts(self) -> int: ...


class DeltaSink(Protocol):
    """Where the text of running jobs goes as it is made."""

    def push(
        self,
        job: LeasedJob,
        index: int,
        text: str,
        choices: list[JSON] | None,
        progress: JSON | None = None,
    ) -> None:
        """The `index`th piece of `job`'s stream (index 0 again starts it over): `text`
        of the first choice, and the OpenAI chunk `choices` when there is more to it; or
        `progress` of the model it waits for (`{"type": "downloading", "bytes", "total",
        "fraction"}` or `{"type": "loading", "fraction"}`)."""

    async def send_first_piece(self) -> None:
        """A streamed job's first piece is waiting: push it without delay."""


class Executor(Protocol):
    """Runs the jobs of one model (`config`), up to its `concurrency` at once."""

    @property
    def config(self) -> ModelSettings: ...

    @property
    def state(self) -> str:
        """One of "downloading", "loading", "ready", "unloaded" or "error" (then `error`
        says why)."""

    @property
    def progress(self) -> float:
        """From 0 to 1 while the model loads."""

    @property
    def error(self) -> str | None: ...

    async def load(self) -> None:
        """Get the model ready; a failure leaves `state` "error" and does not raise."""

    async def run(self, job: LeasedJob) -> Outcome:
        """Run one job to its end: a result, or an error the job fails with."""

    async def close(self) -> None:
        """Release what `load` took."""

    async def unload(self) -> None:
        """Release the model (state "unloaded"); the next `load` loads it again."""


class BackendExecutor:
    """Runs a model's jobs on its backend, on this event loop: requests paced to the
    model's `rpm`, transient backend errors (and timeouts) retried with backoff up to
    `max_attempts`, each attempt cut at `timeout_seconds`."""

    def __init__(
        self, config: ModelSettings, build: BackendFactory, models_dir: Path, deltas: DeltaSink
    ) -> None:
        self.config = config
        self.state = "loading"
        self.progress = 0.0
        self.error: str | None = None
        self._build = build
        self._models_dir = models_dir
        self._deltas = deltas
        self._backend: Backend | None = None
        self._semaphore = asyncio.Semaphore(config.concurrency)
        self._pacer = Pacer(config.rpm)
        self._pushed: dict[str, int] = {}  # job id -> pieces pushed in this attempt
        self._waiting: dict[str, LeasedJob] = {}  # jobs with no piece yet: see progress
        self._shown: tuple[str, float] = ("", 0.0)  # the last progress pushed

    async def load(self) -> None:
        """Build and load the backend."""
        self.state, self.error = "loading", None
        try:
            self._backend = self._build(self.config, self._models_dir)
            await self._backend.load(self._progress)
            self.state = "unloaded" if self.state == "unloaded" else "ready"  # lazy: unloaded
            log.info(
                "model ready", extra={"model": self.config.name, "backend": self.config.backend}
            )
        except Exception as exc:
            self.state, self.error = "error", str(exc)
            log.error("model failed to load", extra={"model": self.config.name, "why": str(exc)})

    def _progress(
        self, state: str, fraction: float, done: int | None = None, total: int | None = None
    ) -> None:
        """The model's state; while it downloads or loads for jobs that wait on it, their
        streams get the progress too (each whole percent, and every change of state)."""
        self.state, self.progress = state, fraction
        if state not in ("downloading", "loading") or not self._waiting:
            return
        last_state, last_fraction = self._shown
        if state == last_state and fraction - last_fraction < 0.01 and fraction < 1:
            return
        self._shown = (state, fraction)
        update: JSON = {"type": state, "fraction": round(fraction, 4)}
        if state == "downloading" and done is not None:
            update.update(bytes=done, total=total)
        for job in list(self._waiting.values()):
            index = self._pushed.get(job.id, 0)
            self._pushed[job.id] = index + 1
            self._deltas.push(job, index, "", None, update)

    async def run(self, job: LeasedJob) -> Outcome:
        """Run `job`, retrying transient provider errors."""
        async with self._semaphore:
            try:
                return Outcome.done(await self._with_retries(job))
            except BackendError as exc:
                return Outcome.failed(exc.message, exc.code, exc.retryable, exc.param)
            except Exception as exc:  # a backend bug: fail the job visibly, keep the node going
                log.exception("backend crashed", extra={"job": job.id, "model": job.model})
                message = f"the backend crashed: {type(exc).__name__}: {exc}"
                return Outcome.failed(message, "backend_error", retryable=False)

    async def close(self) -> None:
        """Close the backend; its errors are not the node's concern any more."""
        if self._backend is not None:
            try:
                await self._backend.close()
            except Exception as exc:
                log.warning(
                    "backend close failed", extra={"model": self.config.name, "why": str(exc)}
                )

    async def unload(self) -> None:
        """Close the backend (its memory given back); `load` builds it again."""
        await self.close()
        self._backend = None
        self.state, self.progress = "unloaded", 0.0

    async def _with_retries(self, job: LeasedJob) -> JSON:
        """Attempts until one answers, one fails for good, or `max_attempts` are spent.
        A plain loop: tenacity's AsyncRetrying costs tens of microseconds a job even
        when nothing fails, and every job pays it; only its wait strategy is used."""
        backoff: Backoff | None = None
        attempt = 1
        while True:
            await self._pacer.ready()
            try:
                return await self._generate(job)
            except BackendError as exc:
                if not exc.retryable or attempt >= self.config.max_attempts:
                    raise
                backoff = backoff or Backoff(PROVIDER_WAIT)
                await asyncio.sleep(self._retry_delay(exc, backoff))
            attempt += 1

    def _retry_delay(self, exc: BackendError, backoff: Backoff) -> float:
        """The provider's Retry-After when it gave one, else backoff; a rate limit holds
        every job of the model, not only this one."""
        delay = backoff.next_delay()
        if exc.retry_after is not None:
            delay = exc.retry_after
        if exc.code == "rate_limited":
            self._pacer.pause(delay)
        return delay

    async def _generate(self, job: LeasedJob) -> JSON:
        """One attempt: the backend's chunks, text pushed as it comes, then the response."""
        assert self._backend is not None, "run before load"
        parts: list[str] = []  # a retry starts the streamed text over, at index 0
        self._pushed[job.id] = 0
        self._waiting[job.id] = job
        self._shown = ("", 0.0)
        last = Chunk()
        streamed = job.streamed
        try:
            # aclosing: a cancel that lands outside the generator (while the first piece
            # is pushed) still closes it at once, so the backend stops generating (a
            # worker is told to drop the job) rather than when it is garbage-collected
            chunks = self._backend.execute(job.endpoint, job.request)
            async with asyncio.timeout(self.config.timeout_seconds), _closing(chunks):
                async for chunk in chunks:
                    self._waiting.pop(job.id, None)
                    if chunk.text or chunk.choices:
                        parts.append(chunk.text)
                        pushed = self._pushed[job.id]
                        self._deltas.push(job, pushed, chunk.text, chunk.choices)
                        self._pushed[job.id] = pushed + 1
                        if streamed and len(parts) == 1:
                            await self._deltas.send_first_piece()
                    if chunk.finish_reason is not None or chunk.response is not None:
                        last = chunk
        except TimeoutError as exc:
            raise BackendError(
                f"no answer within {self.config.timeout_seconds:g} s",
                code="timeout",
                retryable=True,
            ) from exc
        finally:
            self._waiting.pop(job.id, None)
            self._pushed.pop(job.id, None)
        if last.response is not None:
            return last.response
        finish = last.finish_reason or "stop"
        return build_response(job.endpoint, job.id, job.request, "".join(parts), finish, last.usage)


@asynccontextmanager
async def _closing(chunks: AsyncIterator[Chunk]) -> AsyncIterator[AsyncIterator[Chunk]]:
    """`chunks`, closed on the way out when it can be (an async generator can)."""
    try:
        yield chunks
    finally:
        close = getattr(chunks, "aclose", None)
        if close is not None:
            await close()
