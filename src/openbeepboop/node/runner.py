"""The node's engine: register, long-poll for as many jobs as there are free slots, run
them on their backends, keep leases alive, and hand results to the outbox, which sends
them until the server acknowledges each one.

Stopping (SIGTERM/SIGINT): fetching stops, running jobs get `drain_seconds` to finish,
the rest are released back to the queue; a second signal releases at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import platform
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from openbeepboop.node.backends import build_backend
from openbeepboop.node.backends.base import JSON, Backend, BackendError, Chunk
from openbeepboop.node.client import NodeClient, ServerRefused, ServerUnreachable
from openbeepboop.node.config import NodeConfig
from openbeepboop.node.outbox import Outbox, Pending
from openbeepboop.node.pacing import Pacer
from openbeepboop.node.results import build_response, completion_tokens

log = logging.getLogger("openbeepboop.node")
T = TypeVar("T")
SUBMIT_BATCH = 200
DELTA_SECONDS = 0.05
FIRST_PIECE_SECONDS = 1.0  # the longest a generation waits for its first piece's push
RELEASED = {"code": "released", "message": "the node stopped before finishing", "retryable": True}


@dataclass
class Slot:
    """One configured model: its backend, concurrency and pacing."""

    config: Any
    backend: Backend
    semaphore: asyncio.Semaphore
    pacer: Pacer
    running: int = 0
    state: str = "loading"
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # a job of it ended
    progress: float = 0.0
    error: str | None = None

    def free(self) -> int:
        return self.config.concurrency - self.running if self.state == "ready" else 0


@dataclass
class InFlight:
    job: JSON
    task: asyncio.Task[None]
    stop_reason: str | None = None  # "cancelled" | "lost" | "released"


@dataclass
class Totals:
    completed: int = 0
    failed: int = 0
    tokens: int = 0
    busy_seconds: float = 0.0
    recent: list[tuple[float, int, float]] = field(default_factory=list)  # (at, tokens, secs)

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        self.recent = [r for r in self.recent if now - r[0] < 60]
        secs = sum(r[2] for r in self.recent)
        return round(sum(r[1] for r in self.recent) / secs, 2) if secs else 0.0


class NodeRunner:
    """Runs one node until stopped (daemon) or until the queue is drained (batch)."""

    def __init__(self, config: NodeConfig, client: NodeClient | None = None) -> None:
        self.config = config
        self.client = client or NodeClient(
            config.server.url, config.server.api_key, config.server.timeout_seconds
        )
        state = config.state_dir()
        # the default name ends in the pid, but the outbox must outlive the process
        named = "name" in config.node.model_fields_set
        outbox = _safe(config.node.name) if named else _safe(socket.gethostname())
        self.outbox = Outbox(state / f"outbox-{outbox}.db")
        self.slots: dict[str, Slot] = {}
        self.in_flight: dict[str, InFlight] = {}
        self.totals = Totals()
        self.node_id = ""
        self.lease_seconds: float | None = None
        self._stopping = asyncio.Event()
        self._release_now = asyncio.Event()
        self._outbox_ready = asyncio.Event()
        self._fetching: set[asyncio.Task[list[JSON]]] = set()
        self._deltas: list[JSON] = []  # token deltas waiting to be pushed
        self._delta_send = asyncio.Lock()  # one push at a time: pieces arrive in order
        self._sending: set[asyncio.Future[None]] = set()
        self._delta_index: dict[str, int] = {}
        self._registering = asyncio.Lock()

    # -- lifecycle ---------------------------------------------------------------------

    async def run(self, batch: bool = False, install_signals: bool = True) -> int:
        """Serve until stopped; in `batch` mode until nothing is left. Returns an exit code.
        Without `install_signals` the owner calls `stop()` (the all-in-one server does)."""
        if install_signals:
            self._install_signals()
        try:
            await self._load_models()
            if not any(s.state == "ready" for s in self.slots.values()):
                log.error("no model could be loaded; stopping")
                return 1
            await self._register(give_up=batch)
        except ServerUnreachable as exc:
            log.error("server unreachable", extra={"url": self.config.server.url, "why": str(exc)})
            return 2
        except ServerRefused as exc:
            log.error("server refused the node", extra={"status": exc.status, "why": exc.message})
            return 2
        background = [
            asyncio.create_task(self._heartbeat_loop()),
            asyncio.create_task(self._submit_loop()),
            asyncio.create_task(self._delta_loop()),
        ]
        try:
            await self._fetch_loop(batch)
            await self._drain()
            await self._flush_outbox(deadline=time.monotonic() + 30)
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            pending = len(self.outbox)  # before _close() closes it
            await self._close()
        if pending:
            log.warning(
                "results not yet acknowledged; sent on next start", extra={"count": pending}
            )
        return 0

    def stop(self) -> None:
        """First call: stop fetching and drain. Second call: release running jobs now."""
        if self._stopping.is_set():
            self._release_now.set()
            return
        log.info("stopping: draining running jobs", extra={"running": len(self.in_flight)})
        self._stopping.set()
        for task in self._fetching:
            task.cancel()

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)

    async def _close(self) -> None:
        for slot in self.slots.values():
            with contextlib.suppress(Exception):
                await slot.backend.close()
        await self.client.close()
        self.outbox.close()

    # -- models and registration -------------------------------------------------------

    async def _load_models(self) -> None:
        models_dir = self.config.models_dir()
        for mc in self.config.models:
            slot = Slot(
                mc, build_backend(mc, models_dir), asyncio.Semaphore(mc.concurrency), Pacer(mc.rpm)
            )
            self.slots[mc.name] = slot

            def progress(state: str, fraction: float, slot: Slot = slot) -> None:
                slot.state, slot.progress = state, fraction

            try:
                await slot.backend.load(progress)
                slot.state = "ready"
                log.info("model ready", extra={"model": mc.name, "backend": mc.backend})
            except Exception as exc:
                slot.state, slot.error = "error", str(exc)
                log.error("model failed to load", extra={"model": mc.name, "why": str(exc)})

    def _model_states(self) -> list[JSON]:
        return [
            {
                "name": name,
                "state": s.state,
                "progress": s.progress,
                "backend": s.config.backend,
                "concurrency": s.config.concurrency,
                **({"error": s.error} if s.error else {}),
            }
            for name, s in self.slots.items()
        ]

    async def _register(self, give_up: bool = False) -> None:
        hardware = {"platform": platform.platform(), "cpus": os.cpu_count()}
        capacity = sum(s.config.concurrency for s in self.slots.values())
        call = lambda: self.client.register(  # noqa: E731
            self.config.node.name, self._model_states(), capacity, hardware
        )
        self.node_id = await self._until_reachable(call, attempts=4 if give_up else None)
        log.info("registered", extra={"node_id": self.node_id, "node_name": self.config.node.name})

    async def _reregister(self, stale: str) -> None:
        """The server forgot us (e.g. a fresh database): register once, however many
        loops noticed."""
        async with self._registering:
            if self.node_id == stale:
                await self._register()

    async def _until_reachable(
        self, call: Callable[[], Awaitable[T]], attempts: int | None = None
    ) -> T:
        """Retry `call` while the server is unreachable (exponential backoff, jitter)."""
        retrying = AsyncRetrying(
            retry=retry_if_exception(lambda e: isinstance(e, ServerUnreachable)),
            wait=wait_exponential_jitter(multiplier=0.5, max=30),
            stop=stop_after_attempt(attempts) if attempts else (lambda _: self._stopping.is_set()),
            before_sleep=lambda rs: log.warning(
                "server unreachable; retrying",
                extra={
                    "attempt": rs.attempt_number,
                    "why": str(rs.outcome and rs.outcome.exception()),
                },
            ),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await call()
        raise AssertionError("unreachable")  # pragma: no cover

    # -- fetching ----------------------------------------------------------------------

    async def _fetch_loop(self, batch: bool) -> None:
        """One long-poll loop per ready model, so that a busy model never keeps another
        model's free slots waiting."""
        ready = [name for name, s in self.slots.items() if s.state == "ready"]
        await asyncio.gather(*(self._model_loop(self.slots[name], batch) for name in ready))

    async def _model_loop(self, slot: Slot, batch: bool) -> None:
        name = slot.config.name
        wait = 0.0 if batch else self.config.node.poll_seconds
        while not self._stopping.is_set():
            free = slot.free()
            if free <= 0:
                await self._wait_change(slot)
                continue
            jobs = await self._fetch([name], free, wait)
            if jobs is None:
                continue
            if not jobs and batch:
                if slot.running == 0:
                    return
                await self._wait_change(slot)
            for job in jobs:
                self._start(job)

    async def _fetch(self, models: list[str], max_jobs: int, wait: float) -> list[JSON] | None:
        task = asyncio.create_task(self.client.fetch(self.node_id, models, max_jobs, wait))
        self._fetching.add(task)
        try:
            jobs = await task
            self._failures = 0
            return jobs
        except asyncio.CancelledError:
            if self._stopping.is_set():
                return None
            raise
        except ServerUnreachable as exc:
            log.warning("fetch failed; backing off", extra={"why": str(exc)})
            await self._pause(self._backoff())
            return None
        except ServerRefused as exc:
            if exc.code == "node_not_registered":
                await self._reregister(stale=self.node_id)
                return None
            log.error("fetch refused", extra={"status": exc.status, "why": exc.message})
            await self._pause(5)
            return None
        finally:
            self._fetching.discard(task)

    _failures = 0

    def _backoff(self) -> float:
        self._failures += 1
        return float(min(30.0, 0.5 * 2 ** min(self._failures, 6)))

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _wait_change(self, slot: Slot) -> None:
        slot.changed.clear()
        waits = [
            asyncio.create_task(slot.changed.wait()),
            asyncio.create_task(self._stopping.wait()),
        ]
        _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()

    # -- running jobs ------------------------------------------------------------------

    def _start(self, job: JSON) -> None:
        self._failures = 0
        if self.lease_seconds is None and job.get("lease_seconds"):
            self.lease_seconds = max(0.1, float(job["lease_seconds"]))
        slot = self.slots.get(job["model"])
        if slot is None:  # the server sent a model we never asked for
            self._finish(
                job,
                {
                    "error": {
                        "message": f"model {job['model']} not served here",
                        "code": "model_not_served",
                        "retryable": True,
                    }
                },
            )
            return
        slot.running += 1
        task = asyncio.create_task(self._run_job(slot, job))
        self.in_flight[job["id"]] = InFlight(job, task)
        log.info("job started", extra=self._job_fields(job))

    async def _run_job(self, slot: Slot, job: JSON) -> None:
        started = time.monotonic()
        try:
            async with slot.semaphore:
                payload = await self._execute(slot, job)
        except asyncio.CancelledError:
            reason = self.in_flight[job["id"]].stop_reason or "released"
            log.info(f"job {reason}", extra=self._job_fields(job))
            if reason == "released":
                self._finish(job, {"error": dict(RELEASED)})
            return
        finally:
            slot.running -= 1
            self.in_flight.pop(job["id"], None)
            self._delta_index.pop(job["id"], None)
            slot.changed.set()
        elapsed = time.monotonic() - started
        if "result" in payload:
            tokens = completion_tokens(payload["result"])
            self.totals.completed += 1
            self.totals.tokens += tokens
            self.totals.recent.append((time.monotonic(), tokens, elapsed))
            log.info(
                "job completed",
                extra={**self._job_fields(job), "tokens": tokens, "seconds": round(elapsed, 3)},
            )
        else:
            self.totals.failed += 1
            log.info(
                "job failed",
                extra={
                    **self._job_fields(job),
                    **{
                        "code": payload["error"]["code"],
                        "retryable": payload["error"]["retryable"],
                    },
                },
            )
        self._finish(job, payload)

    async def _execute(self, slot: Slot, job: JSON) -> JSON:
        """Run the job, retrying transient provider errors; a result or an error payload."""

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            after = getattr(exc, "retry_after", None)
            backoff = wait_exponential_jitter(multiplier=1, max=30)
            delay = after if after is not None else backoff(state)
            if getattr(exc, "code", "") == "rate_limited":
                slot.pacer.pause(delay)
            return float(delay)

        retrying = AsyncRetrying(
            retry=retry_if_exception(lambda e: isinstance(e, BackendError) and e.retryable),
            stop=stop_after_attempt(slot.config.max_attempts),
            wait=wait,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await slot.pacer.ready()
                    return {"result": await self._generate(slot, job)}
        except BackendError as exc:
            return {"error": {"message": exc.message, "code": exc.code, "retryable": exc.retryable}}
        except Exception as exc:  # a backend bug: fail the job visibly, keep the node going
            log.exception("backend crashed", extra={"job": job["id"], "model": job["model"]})
            message = f"the backend crashed: {type(exc).__name__}: {exc}"
            return {"error": {"message": message, "code": "backend_error", "retryable": False}}
        raise AssertionError("unreachable")  # pragma: no cover

    async def _generate(self, slot: Slot, job: JSON) -> JSON:
        parts: list[str] = []
        last = Chunk()
        self._delta_index[job["id"]] = 0  # a retry starts the streamed text over
        streamed = bool(job["request"].get("stream"))
        try:
            async with asyncio.timeout(slot.config.timeout_seconds):
                async for chunk in slot.backend.execute(job["endpoint"], job["request"]):
                    if chunk.text:
                        parts.append(chunk.text)
                        self._push_delta(job, chunk.text)
                        if streamed and len(parts) == 1:
                            await self._send_first_piece()
                    if chunk.finish_reason is not None or chunk.response is not None:
                        last = chunk
        except TimeoutError as exc:
            raise BackendError(
                f"no answer within {slot.config.timeout_seconds:g} s",
                code="timeout",
                retryable=True,
            ) from exc
        if last.response is not None:
            return last.response
        text = "".join(parts)
        return build_response(
            job["endpoint"],
            job["id"],
            job["request"],
            text,
            last.finish_reason or "stop",
            last.usage,
        )

    def _push_delta(self, job: JSON, text: str) -> None:
        index = self._delta_index[job["id"]]
        self._delta_index[job["id"]] = index + 1
        self._deltas.append(
            {"job_id": job["id"], "lease_id": job["lease_id"], "index": index, "delta": text}
        )

    async def _delta_loop(self) -> None:
        """Push token deltas every DELTA_SECONDS in one call (the first piece of a job
        whose client streams goes at once, from `_generate`)."""
        while True:
            await asyncio.sleep(DELTA_SECONDS)
            await self._send_deltas()

    async def _send_first_piece(self) -> None:
        """A streaming client waits for this job's first piece: send it now rather than
        at the next tick. The generation waits for that send (so that a fast backend's
        burst does not delay it), but not for long: a slow server must not stall it."""
        send = asyncio.ensure_future(self._send_deltas())
        self._sending.add(send)  # a reference while it runs on after a timeout
        send.add_done_callback(self._sending.discard)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(send), FIRST_PIECE_SECONDS)

    async def _send_deltas(self) -> None:
        """Send the waiting deltas, one call at a time so that a job's pieces arrive in
        order. Best effort: the result is authoritative, so a delta that cannot be
        delivered is dropped."""
        async with self._delta_send:
            if not self._deltas:
                return
            batch, self._deltas = self._deltas, []
            with contextlib.suppress(ServerUnreachable, ServerRefused):
                await self.client.events(self.node_id, batch)

    def _finish(self, job: JSON, payload: JSON) -> None:
        """Write the outcome to the outbox (on disk) before anything is sent."""
        self.outbox.put(Pending(job["id"], job["lease_id"], payload))
        self._outbox_ready.set()

    def _job_fields(self, job: JSON) -> JSON:
        fields = {"job": job["id"], "model": job["model"], "attempt": job.get("attempt")}
        if self.config.node.log_prompts:
            fields["request"] = job["request"]
        return fields

    def _stop_job(self, job_id: str, reason: str) -> None:
        flight = self.in_flight.get(job_id)
        if flight is not None and flight.stop_reason is None:
            flight.stop_reason = reason
            flight.task.cancel()

    async def _drain(self) -> None:
        if not self.in_flight:
            return
        deadline = time.monotonic() + self.config.node.drain_seconds
        while self.in_flight and not self._release_now.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._release_now.wait(), min(remaining, 0.2))
        for job_id in list(self.in_flight):
            self._stop_job(job_id, "released")
        tasks = [f.task for f in self.in_flight.values()]
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- heartbeats and results --------------------------------------------------------

    def stats(self) -> JSON:
        capacity = sum(s.config.concurrency for s in self.slots.values()) or 1
        return {
            "load": round(len(self.in_flight) / capacity, 3),
            "running": len(self.in_flight),
            "tokens_per_second": self.totals.tokens_per_second(),
            "completed": self.totals.completed,
            "failed": self.totals.failed,
            "tokens": self.totals.tokens,
            "outbox": len(self.outbox),
            "models": self._model_states(),
        }

    def _heartbeat_every(self) -> float:
        every = self.config.node.heartbeat_seconds
        if self.lease_seconds:
            every = min(every, self.lease_seconds / 3)
        return max(every, 0.05)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_every())
            leases = [f.job["lease_id"] for f in self.in_flight.values()]
            try:
                reply = await self.client.heartbeat(self.node_id, leases, self.stats())
            except ServerUnreachable as exc:
                log.warning("heartbeat failed", extra={"why": str(exc)})
                continue
            except ServerRefused as exc:
                if exc.code == "node_not_registered":
                    await self._reregister(stale=self.node_id)
                continue
            for job_id in reply.get("cancelled", []):
                self._stop_job(job_id, "cancelled")
            lost = set(reply.get("lost", []))
            for job_id, flight in list(self.in_flight.items()):
                if flight.job["lease_id"] in lost:
                    self._stop_job(job_id, "lost")

    async def _submit_loop(self) -> None:
        self._outbox_ready.set()  # results a previous run left in the outbox go first
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            await self._flush_outbox(deadline=None)

    async def _flush_outbox(self, deadline: float | None) -> None:
        """Send everything in the outbox; keep retrying while the server is away."""
        failures = 0
        while items := self.outbox.take(SUBMIT_BATCH):
            body = [{"job_id": i.job_id, "lease_id": i.lease_id, **i.payload} for i in items]
            try:
                answers = await self.client.submit(self.node_id, body)
            except ServerRefused as exc:
                if exc.code == "node_not_registered":
                    await self._reregister(stale=self.node_id)
                    continue
                if exc.status in (400, 413, 422):
                    await self._submit_one_by_one(items)
                    continue
                log.error("result upload refused", extra={"status": exc.status, "why": exc.message})
                await asyncio.sleep(30)
                continue
            except ServerUnreachable as exc:
                failures += 1
                # a second signal means "stop now": what is left is sent on the next start
                if self._release_now.is_set() or (
                    deadline is not None and time.monotonic() > deadline
                ):
                    return
                log.warning("result upload failed; will retry", extra={"why": str(exc)})
                with contextlib.suppress(TimeoutError):
                    delay = min(30.0, 0.5 * 2 ** min(failures, 6))
                    await asyncio.wait_for(self._release_now.wait(), delay)
                continue
            failures = 0
            self.outbox.remove([a["job_id"] for a in answers])
            for a in answers:
                if not a.get("accepted"):
                    log.info(
                        "result refused", extra={"job": a["job_id"], "reason": a.get("reason")}
                    )

    async def _submit_one_by_one(self, items: list[Pending]) -> None:
        """A batch the server cannot parse: send items alone; one it still refuses is
        replaced by an error so that its job fails visibly instead of looping here."""
        for item in items:
            body = {"job_id": item.job_id, "lease_id": item.lease_id, **item.payload}
            try:
                await self.client.submit(self.node_id, [body])
            except ServerRefused as exc:
                error = {
                    "message": f"the server refused the result: {exc.message}",
                    "code": "result_rejected",
                    "retryable": False,
                }
                self.outbox.put(Pending(item.job_id, item.lease_id, {"error": error}))
                continue
            except ServerUnreachable:
                return
            self.outbox.remove([item.job_id])


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80] or "node"
