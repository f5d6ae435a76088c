"""The worker process of one model: `python -m openbeepboop.node.worker_process`, started
and supervised by the node (worker.py). It builds the model's backend, loads it, and
runs the jobs it is sent, concurrently, until told to close or until its input ends
(the node went away).

The protocol is JSON lines: the node writes to the worker's stdin, the worker answers on
its stdout, which is kept for the protocol alone (what the backend or a library prints
goes to stderr, with the node's own logs).

    node -> worker  {"op": "load", "backend", "config", "models_dir"}
                    {"op": "run", "id", "endpoint", "request"}
                    {"op": "cancel", "id"}
                    {"op": "close"}
    worker -> node  {"ev": "progress", "state", "fraction", "done"?, "total"?}
                    {"ev": "loaded"} | {"ev": "load_failed", "message"}
                    {"ev": "chunk", "id", "text"?, "choices"?, "finish_reason"?, "usage"?,
                     "response"?}
                    {"ev": "done", "id"}
                    {"ev": "error", "id", "message", "code", "retryable", "retry_after",
                     "status", "param"}
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import IO, Any

import orjson

from openbeepboop.node.backends import backend_class
from openbeepboop.node.backends.base import JSON, Backend, BackendError

log = logging.getLogger("openbeepboop.worker")
LINE_LIMIT = 1 << 30  # a job's request (a long prompt, many embeddings inputs) is one line


class _Worker:
    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self.backend: Backend | None = None
        self.jobs: dict[str, asyncio.Task[None]] = {}

    def send(self, message: JSON) -> None:
        try:
            self._out.write(orjson.dumps(message) + b"\n")
        except BrokenPipeError:  # the node is gone: nobody is left to answer
            os._exit(0)

    def progress(
        self, state: str, fraction: float, done: int | None = None, total: int | None = None
    ) -> None:
        update: JSON = {"ev": "progress", "state": state, "fraction": fraction}
        if done is not None:
            update.update(done=done, total=total)
        self.send(update)

    async def load(self, message: JSON) -> None:
        try:
            cls = backend_class(str(message["backend"]))
            config = cls.Config.model_validate(message["config"])
            backend = cls(config, Path(str(message["models_dir"])))
            await backend.load(self.progress)
        except Exception as exc:  # the node reports it as the model's error
            self.send({"ev": "load_failed", "message": f"{type(exc).__name__}: {exc}"})
            return
        self.backend = backend
        self.send({"ev": "loaded"})

    def run(self, message: JSON) -> None:
        job_id = str(message["id"])
        task = asyncio.create_task(self._run(job_id, message["endpoint"], message["request"]))
        self.jobs[job_id] = task
        task.add_done_callback(lambda _: self.jobs.pop(job_id, None))

    async def _run(self, job_id: str, endpoint: str, request: JSON) -> None:
        assert self.backend is not None, "run before load"
        try:
            async for chunk in self.backend.execute(endpoint, request):
                out: JSON = {"ev": "chunk", "id": job_id}
                for key in ("text", "choices", "finish_reason", "usage", "response"):
                    value = getattr(chunk, key)
                    if value:
                        out[key] = value
                self.send(out)
        except asyncio.CancelledError:
            return  # the node dropped the job: say nothing more about it
        except BackendError as exc:
            self.send(
                {
                    "ev": "error",
                    "id": job_id,
                    "message": exc.message,
                    "code": exc.code,
                    "retryable": exc.retryable,
                    "retry_after": exc.retry_after,
                    "status": exc.status,
                    "param": exc.param,
                }
            )
            return
        except Exception as exc:  # a backend bug: the job fails, the worker goes on
            log.exception("backend crashed", extra={"job": job_id})
            self.send(
                {
                    "ev": "error",
                    "id": job_id,
                    "message": f"the backend crashed: {type(exc).__name__}: {exc}",
                    "code": "backend_error",
                    "retryable": False,
                }
            )
            return
        self.send({"ev": "done", "id": job_id})

    def cancel(self, message: JSON) -> None:
        task = self.jobs.get(str(message["id"]))
        if task is not None:
            task.cancel()

    async def close(self) -> None:
        for task in list(self.jobs.values()):
            task.cancel()
        await asyncio.gather(*self.jobs.values(), return_exceptions=True)
        if self.backend is not None:
            with contextlib.suppress(Exception):
                await self.backend.close()


async def serve(out: IO[bytes]) -> None:
    """Read the node's messages from stdin and act on them until `close` or the end."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=LINE_LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    worker = _Worker(out)
    try:
        while line := await reader.readline():
            message: Any = orjson.loads(line)
            op = message.get("op")
            if op == "load":
                await worker.load(message)
            elif op == "run":
                worker.run(message)
            elif op == "cancel":
                worker.cancel(message)
            elif op == "close":
                break
    finally:
        await worker.close()


def main() -> None:
    # stdout is the protocol's: keep a handle on it, and send fd 1 (what C libraries and
    # stray prints write to) to stderr
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.basicConfig(level=os.environ.get("OPENBEEPBOOP_WORKER_LOG", "WARNING"))
    # a Ctrl+C in the node's terminal reaches the whole process group: the node drains
    # its jobs, which run here, so the worker waits for the node's `close` (or the end of
    # its input, if the node dies)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    asyncio.run(serve(out))


if __name__ == "__main__":
    main()
