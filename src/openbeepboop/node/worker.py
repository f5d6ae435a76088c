"""A model's backend in a worker process of its own, supervised by the node.

`WorkerBackend` is a `Backend` like any other for the node's executor (retries, pacing,
timeouts and deltas stay there); underneath, it runs the real backend in a child process
(worker_process.py) and relays its chunks. That gives each local model crash isolation
and a context of its own:

- a worker that dies mid-job (a crash in llama.cpp, `kill -9`, out of memory) fails the
  jobs it was running with a retryable `worker_crashed` error: the executor tries them
  again, which starts a new worker (after a backoff that grows while it keeps dying), so
  the job completes and the node never goes down; no attempt is charged on the server;
- a cancelled job is cancelled in the worker at once (llama.cpp stops between tokens);
- with `idle_unload_seconds`, a worker without a job for that long is stopped (state
  `unloaded`, its memory given back) and started again by the next job;
- `lazy`: nothing starts until the first job (a model fetched on demand, on_demand.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson

from openbeepboop.node.backends import backend_class, build_backend
from openbeepboop.node.backends.base import (
    JSON,
    Backend,
    BackendError,
    Chunk,
    ModelConfig,
    Progress,
)
from openbeepboop.node.worker_process import LINE_LIMIT

log = logging.getLogger("openbeepboop.node")
CLOSE_SECONDS = 10.0  # a worker told to close gets this long before it is killed
RESTART_BACKOFF = (0.0, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)  # by crashes in a row
_EOF: JSON = {"ev": "eof"}


def wants_worker(config: ModelConfig) -> bool:
    """Whether the model runs in a worker process: its `worker` key, else its backend's
    choice (`in_worker`)."""
    if config.worker is not None:
        return config.worker
    try:
        return bool(getattr(backend_class(config.backend), "in_worker", False))
    except Exception:  # an unknown backend: building it says why
        return False


def build_isolated(config: ModelConfig, models_dir: Path) -> Backend:
    """The node's backend factory: a WorkerBackend where the model wants a worker, else
    the backend itself."""
    if wants_worker(config):
        return WorkerBackend(config, models_dir)
    return build_backend(config, models_dir)


class WorkerBackend:
    """Runs one model's backend in a child process (see the module's docstring)."""

    def __init__(self, config: ModelConfig, models_dir: Path, lazy: bool = False) -> None:
        self.config = config
        self.lazy = lazy  # load() starts nothing: the first job starts the worker
        self.models_dir = models_dir
        self.state = "loading"
        self.pid: int | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._jobs: dict[str, asyncio.Queue[JSON]] = {}
        self._ids = itertools.count()
        self._progress: Progress = _ignore
        self._starting = asyncio.Lock()
        self._crashes = 0  # in a row, for the restart backoff
        self._last_used = time.monotonic()
        self._idle: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------

    async def load(self, progress: Progress) -> None:
        self._progress = progress
        if self.lazy:
            self.state = "unloaded"
            progress("unloaded", 0.0)
        else:
            async with self._starting:
                await self._start()
        if self.config.idle_unload_seconds is not None and self._idle is None:
            self._idle = asyncio.create_task(self._unload_when_idle())

    async def close(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._idle
            self._idle = None
        await self._stop()
        self.state = "loading"

    async def _start(self) -> None:
        """Start a worker and load the model in it (the caller holds `_starting`)."""
        self.state = "loading"
        self._progress("loading", 0.0)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "openbeepboop.node.worker_process",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=LINE_LIMIT,
        )
        self._proc, self.pid = proc, proc.pid
        self._send(
            {
                "op": "load",
                "backend": self.config.backend,
                "config": self.config.model_dump(mode="json"),
                "models_dir": str(self.models_dir),
            }
        )
        assert proc.stdout is not None
        while True:
            line = await proc.stdout.readline()
            message = orjson.loads(line) if line else {"ev": "load_failed", "message": ""}
            if message["ev"] == "progress":
                self._relay_progress(message)
            elif message["ev"] == "loaded":
                break
            else:
                await self._stop()  # it may still run: close it
                why = message.get("message") or f"the worker exited with code {proc.returncode}"
                self.state = "error"
                self._progress("error", 0.0)
                raise BackendError(
                    f"model {self.config.name!r} failed to load: {why}",
                    code="model_unavailable",
                    retryable=False,
                )
        self._reader = asyncio.create_task(self._read(proc))
        self.state = "ready"
        self._progress("ready", 1.0)
        log.info("worker ready", extra={"model": self.config.name, "pid": proc.pid})

    async def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(BrokenPipeError, ConnectionResetError, RuntimeError):
            self._write(proc, {"op": "close"})
        try:
            await asyncio.wait_for(proc.wait(), CLOSE_SECONDS)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        if self._reader is not None:
            await self._reader

    async def _unload_when_idle(self) -> None:
        idle = float(self.config.idle_unload_seconds or 0)
        while True:
            await asyncio.sleep(min(max(idle / 4, 0.05), 5.0))
            unused = time.monotonic() - self._last_used
            if self._proc is None or self._jobs or unused < idle:
                continue
            async with self._starting:
                if self._proc is None or self._jobs:
                    continue
                await self._stop()
                self.state = "unloaded"
                self._progress("unloaded", 0.0)
                log.info("worker unloaded (idle)", extra={"model": self.config.name})

    # -- jobs --------------------------------------------------------------------------

    async def execute(self, endpoint: str, request: JSON) -> AsyncIterator[Chunk]:
        await self._ensure_started()
        job = str(next(self._ids))
        queue: asyncio.Queue[JSON] = asyncio.Queue()
        self._jobs[job] = queue
        self._last_used = time.monotonic()
        ended = False
        try:
            self._send({"op": "run", "id": job, "endpoint": endpoint, "request": request})
            while True:
                message = await queue.get()
                kind = message["ev"]
                if kind == "chunk":
                    yield _chunk(message)
                elif kind == "done":
                    ended = True
                    self._crashes = 0
                    return
                elif kind == "error":
                    ended = True
                    raise _error(message)
                else:  # the worker died
                    ended = True
                    raise BackendError(
                        f"the worker process of model {self.config.name!r} died "
                        f"({message.get('why', 'no answer')}); the job is tried again "
                        "on a new one",
                        code="worker_crashed",
                        retryable=True,
                    )
        finally:
            del self._jobs[job]
            self._last_used = time.monotonic()
            if not ended and self._proc is not None:  # cancelled here: stop it there too
                with contextlib.suppress(BrokenPipeError, ConnectionResetError, RuntimeError):
                    self._send({"op": "cancel", "id": job})

    async def _ensure_started(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            return
        async with self._starting:
            if self._proc is not None and self._proc.returncode is None:
                return
            delay = RESTART_BACKOFF[min(self._crashes, len(RESTART_BACKOFF) - 1)]
            if delay:
                await asyncio.sleep(delay)
            await self._start()

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        """Hand each message of the worker to its job; at the end of its output (it
        died, or closed), end every job still waiting."""
        assert proc.stdout is not None
        try:
            while line := await proc.stdout.readline():
                message = orjson.loads(line)
                queue = self._jobs.get(str(message.get("id")))
                if queue is not None:
                    queue.put_nowait(message)
                elif message.get("ev") == "progress":
                    self._relay_progress(message)
        except (ValueError, orjson.JSONDecodeError) as exc:  # a line too long or garbled
            log.error("worker sent an unreadable message", extra={"why": str(exc)})
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        code = await _exit_code(proc)
        if self._proc is proc:  # died rather than closed: the next job starts another
            self._proc = None
            self._crashes += 1
            self.state = "unloaded"
            self._progress("unloaded", 0.0)
            log.error(
                "worker died",
                extra={"model": self.config.name, "pid": proc.pid, "exit": code},
            )
        for queue in self._jobs.values():
            queue.put_nowait({**_EOF, "why": f"exit code {code}"})

    def _relay_progress(self, message: JSON) -> None:
        state, fraction = str(message["state"]), float(message["fraction"])
        if message.get("done") is None:
            self._progress(state, fraction)
        else:
            self._progress(state, fraction, message["done"], message.get("total"))

    def _send(self, message: JSON) -> None:
        if self._proc is None:
            raise BackendError(
                f"the worker process of model {self.config.name!r} is not running",
                code="worker_crashed",
                retryable=True,
            )
        self._write(self._proc, message)

    @staticmethod
    def _write(proc: asyncio.subprocess.Process, message: JSON) -> None:
        assert proc.stdin is not None
        proc.stdin.write(orjson.dumps(message) + b"\n")


def _ignore(state: str, fraction: float, done: int | None = None, total: int | None = None) -> None:
    """Progress nobody asked for."""


def _chunk(message: JSON) -> Chunk:
    return Chunk(
        text=message.get("text") or "",
        finish_reason=message.get("finish_reason"),
        usage=message.get("usage"),
        response=message.get("response"),
        choices=message.get("choices"),
    )


def _error(message: JSON) -> BackendError:
    return BackendError(
        str(message.get("message") or "the backend failed"),
        code=str(message.get("code") or "backend_error"),
        retryable=bool(message.get("retryable")),
        retry_after=message.get("retry_after"),
        status=message.get("status"),
        param=message.get("param"),
    )


async def _exit_code(proc: asyncio.subprocess.Process) -> Any:
    with contextlib.suppress(TimeoutError):
        return await asyncio.wait_for(proc.wait(), 5.0)
    return None
