"""A DSPy language model whose every call is an OpenBeepBoop job.

DSPy 3.4's extension point for a backend of one's own is an *engine*: an object with
`complete(Request) -> Response` (and an async twin with `async def complete`), handed to
`dspy.LM(model, engine=..., async_engine=...)`; subclassing `BaseLM` with
`forward`/`aforward` is deprecated there and goes away in 3.5. `JobsEngine` and
`AsyncJobsEngine` are such a pair, and `jobs_lm` builds the `dspy.LM` that holds them.

Each call is submitted as a job (`Prefer: respond-async`) with an `Idempotency-Key`
derived from the request (model, messages, sampling parameters) and the run's name, then
waited for. Run the same program again (after a crash, a restart, on another machine
with the same key) and every call finds its earlier job: a finished one answers at once,
a queued or running one is waited for, and the whole fleet of nodes works through them
meanwhile. A job that had failed, been cancelled or expired in an earlier run is
submitted again (under a key derived from the old job's id, so that too is found again).
DSPy's `rollout_id` and the candidates of `n` > 1 never reach an engine's Request: a DSPy
callback (`JobsEngine.call_watch`) passes them on, and they go into the key too.

Both engines share one connection: an `AsyncClient` on a private event loop in a
background thread. Calls from DSPy's worker threads (`dspy.Evaluate(num_threads=...)`,
`dspy.Parallel`) and from any event loop (`await program.acall(...)`, repeated
`asyncio.run`) all go through it, so they are thread-safe and share one pool of
connections.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import threading
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import dspy
from dspy import lm15
from dspy.utils.callback import BaseCallback

from openbeepboop.client import AsyncClient, OpenBeepBoopError
from openbeepboop.client._sync import _Loop
from openbeepboop.integrations.dspy.wire import (
    JobOptions,
    again_key,
    chat_body,
    idempotency_key,
    lm_error,
)

if TYPE_CHECKING:
    from openbeepboop.client import AsyncJob

RESUBMITS = 5  # an earlier run's failed job is submitted again at most this many times
FAILED = frozenset({"failed", "cancelled", "expired"})


@dataclass(frozen=True)
class ClientSettings:
    """How to reach the server (as `AsyncClient`'s arguments; never saved with a key)."""

    base_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    bootstrap: str | None = None
    timeout: float = 60.0
    max_retries: int = 3


@dataclass
class _Call:
    """One call of the LM, as the engine sees it: its `rollout_id`, and how many
    answers it has had per request (DSPy asks an engine once per candidate of `n`)."""

    rollout: Any = None
    answered: dict[str, int] = field(default_factory=dict)


class _CallWatch(BaseCallback):  # type: ignore[misc]
    """A DSPy callback that tells the engine about the LM call it serves: the
    `rollout_id` never reaches an engine's Request, and without it every rollout of
    an optimizer would find the same job."""

    def __init__(self, var: contextvars.ContextVar[_Call | None]) -> None:
        self.var = var

    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        kwargs = inputs.get("kwargs") or {}
        rollout = kwargs.get("rollout_id", getattr(instance, "kwargs", {}).get("rollout_id"))
        self.var.set(_Call(rollout))

    def on_lm_end(self, call_id: str, outputs: Any, exception: BaseException | None = None) -> None:
        self.var.set(None)


class _Connection:
    """One `AsyncClient` on a private event loop in a background thread, made on first
    use; shared by a sync and an async engine (and their copies)."""

    def __init__(self, settings: ClientSettings, options: JobOptions) -> None:
        self.settings = settings
        self.options = options
        self._lock = threading.Lock()
        self._loop: _Loop | None = None
        self._client: AsyncClient | None = None
        self.call: contextvars.ContextVar[_Call | None] = contextvars.ContextVar(
            f"openbeepboop_dspy_call_{id(self)}", default=None
        )

    def _open(self) -> tuple[_Loop, AsyncClient]:
        with self._lock:
            if self._loop is None or self._client is None:
                s = self.settings
                loop = _Loop()

                async def make() -> AsyncClient:
                    return AsyncClient(
                        s.base_url,
                        s.api_key,
                        timeout=s.timeout,
                        max_retries=s.max_retries,
                        bootstrap=s.bootstrap,
                    )

                self._client = loop.run(make())
                self._loop = loop
            return self._loop, self._client

    def run(self, request: lm15.Request) -> lm15.Response:
        loop, client = self._open()
        base, key, body, knobs = self._ask(request)
        try:
            response = loop.run(self._answer(client, key, body, knobs))
        except OpenBeepBoopError as exc:
            raise lm_error(exc) from exc
        self._answered(base)
        return response

    async def arun(self, request: lm15.Request) -> lm15.Response:
        loop, client = self._open()
        base, key, body, knobs = self._ask(request)
        answer = self._answer(client, key, body, knobs)
        try:
            response = await asyncio.wrap_future(
                asyncio.run_coroutine_threadsafe(answer, loop.loop)
            )
        except OpenBeepBoopError as exc:
            raise lm_error(exc) from exc
        self._answered(base)
        return response

    def _ask(self, request: lm15.Request) -> tuple[str, str, dict[str, Any], dict[str, Any]]:
        """(the request's key, its key in this call, the body, the job fields): the
        call's `rollout_id` and candidate index, when it has them, are in the second."""
        body = chat_body(request)
        knobs = self.options.knobs()
        base = idempotency_key(body, knobs, self.options.run)
        call = self.call.get()
        if call is None:
            return base, base, body, knobs
        candidate = call.answered.get(base, 0)
        key = idempotency_key(body, knobs, self.options.run, call.rollout, candidate)
        return base, key, body, knobs

    def _answered(self, base: str) -> None:
        """Count an answer to the request keyed `base` in this call; DSPy asks again
        for the next candidate, and after a failure retries the same one (same key)."""
        call = self.call.get()
        if call is not None:
            call.answered[base] = call.answered.get(base, 0) + 1

    async def _answer(
        self, client: AsyncClient, key: str, body: dict[str, Any], knobs: dict[str, Any]
    ) -> lm15.Response:
        job = await self.submit(client, key, body, knobs)
        await job.wait(self.options.wait_timeout)
        if job.status != "completed":
            error = job.error or {}
            message = error.get("message") or f"the job ended {job.status}"
            raise lm15.ProviderError(
                f"job {job.id} {job.status}: {message}",
                provider="openbeepboop",
                provider_code=error.get("code"),
                request_id=job.id,
            )
        response = lm15.response_from_openai_chat(job.data["result"], model=body["model"])
        return dataclasses.replace(response, id=job.id)  # the job is the answer's handle

    async def submit(
        self, client: AsyncClient, key: str, body: dict[str, Any], knobs: dict[str, Any]
    ) -> AsyncJob:
        """Submit (or find again) the job under `key`. A job an earlier run left
        failed, cancelled or expired is submitted again under a key of its own."""
        for _ in range(RESUBMITS):
            job = await client.chat.completions.create(idempotency_key=key, **body, **knobs)
            if job.status not in FAILED:  # a new job is queued: only a replay is final
                return job
            key = again_key(key, job.id)
        return await client.chat.completions.create(idempotency_key=key, **body, **knobs)

    def close(self) -> None:
        with self._lock:
            loop, client = self._loop, self._client
            self._loop = self._client = None
        if loop is not None and client is not None:
            loop.run(client.close())
            loop.stop()

    def dump_state(self) -> dict[str, Any]:
        """The engine's state for a saved program: where and how, never the API key."""
        settings = {k: v for k, v in asdict(self.settings).items() if k != "api_key"}
        options = asdict(self.options)
        for name in ("metadata", "node_labels"):
            if options[name] is not None:
                options[name] = dict(options[name])
        return {"client": settings, "options": options}

    @classmethod
    def load_state(cls, state: Mapping[str, Any]) -> _Connection:
        return cls(
            ClientSettings(**state.get("client", {})), JobOptions(**state.get("options", {}))
        )


class JobsEngine:
    """DSPy's synchronous engine over OpenBeepBoop jobs (`complete(Request)`). Build the
    LM with `jobs_lm`, or pass `engine=JobsEngine(...)` and `async_engine=engine.async_twin()`
    to `dspy.LM` yourself."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        options: JobOptions | None = None,
        bootstrap: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 3,
        _connection: _Connection | None = None,
    ) -> None:
        settings = ClientSettings(base_url, api_key, bootstrap, timeout, max_retries)
        self._connection = _connection or _Connection(settings, options or JobOptions())

    @property
    def options(self) -> JobOptions:
        return self._connection.options

    def complete(self, request: lm15.Request) -> lm15.Response:
        """Submit the request as a job (or find its earlier job) and wait for it."""
        return self._connection.run(request)

    def stream(self, request: lm15.Request) -> Iterator[Any]:
        """The answer as stream events, all at once when the job is done (a job's
        answer is collected, not streamed, here)."""
        return iter(lm15.response_to_events(self.complete(request)))

    def call_watch(self) -> Any:
        """The DSPy callback that tells this engine which `rollout_id` (and which
        candidate of `n`) it serves; give it to `dspy.LM(callbacks=[...])` with the
        engine, as `jobs_lm` does. Without it, calls that differ only in those find the
        same job."""
        return _CallWatch(self._connection.call)

    def async_twin(self) -> AsyncJobsEngine:
        """The async engine on the same connection."""
        return AsyncJobsEngine(self._connection)

    def close(self) -> None:
        """Close the connection (and its thread); both engines of a pair share it."""
        self._connection.close()

    def dump_state(self) -> dict[str, Any]:
        return self._connection.dump_state()

    @classmethod
    def load_state(cls, state: Mapping[str, Any]) -> JobsEngine:
        """An engine from `dump_state`; its API key comes from `OPENBEEPBOOP_API_KEY`."""
        return cls(_connection=_Connection.load_state(state))

    def __deepcopy__(self, memo: dict[int, Any]) -> JobsEngine:
        return self  # a connection, shared as DSPy shares its own clients

    def __repr__(self) -> str:
        return f"JobsEngine({self._connection.settings!r}, {self.options!r})"


class AsyncJobsEngine:
    """DSPy's async engine over OpenBeepBoop jobs (`async def complete(Request)`), on the
    connection of a `JobsEngine`; usable from any event loop."""

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection

    async def complete(self, request: lm15.Request) -> lm15.Response:
        """Submit the request as a job (or find its earlier job) and wait for it."""
        return await self._connection.arun(request)

    async def stream(self, request: lm15.Request) -> Any:
        """The answer as stream events, all at once when the job is done."""
        for event in lm15.response_to_events(await self.complete(request)):
            yield event

    async def aclose(self) -> None:
        await asyncio.to_thread(self._connection.close)

    def dump_state(self) -> dict[str, Any]:
        return self._connection.dump_state()

    @classmethod
    def load_state(cls, state: Mapping[str, Any]) -> AsyncJobsEngine:
        return cls(_Connection.load_state(state))

    def __deepcopy__(self, memo: dict[int, Any]) -> AsyncJobsEngine:
        return self


def jobs_lm(
    model: str,
    *,
    base_url: str | None = None,
    api_key: str | None = None,
    run: str | None = None,
    priority: int | None = None,
    metadata: Mapping[str, Any] | None = None,
    server_cache: Literal["use", "skip", "refresh"] | None = None,
    wait_timeout: float | None = None,
    options: JobOptions | None = None,
    cache: bool = False,
    **lm_kwargs: Any,
) -> Any:
    """A `dspy.LM` for the server's model `model` whose calls are jobs.

    `base_url`, `api_key`: the server (defaults as for `Client`: `OPENBEEPBOOP_BASE_URL`,
    `OPENBEEPBOOP_API_KEY`). `run`, `priority`, `metadata`, `server_cache`,
    `wait_timeout`: see `JobOptions` (or pass `options=` for all of them). `cache`:
    DSPy's own local cache, off by default: the server's jobs are the record, and a
    local hit would hide a new `run` name. Other keyword arguments go to `dspy.LM`
    (`temperature`, `max_tokens`, `num_retries`, `callbacks`, ...).
    """
    if options is None:
        options = JobOptions(
            run=run,
            priority=priority,
            metadata=metadata,
            server_cache=server_cache,
            wait_timeout=wait_timeout,
        )
    engine = JobsEngine(base_url, api_key, options=options)
    callbacks = [engine.call_watch(), *(lm_kwargs.pop("callbacks", None) or [])]
    return dspy.LM(
        model,
        engine=engine,
        async_engine=engine.async_twin(),
        cache=cache,
        callbacks=callbacks,
        **lm_kwargs,
    )
