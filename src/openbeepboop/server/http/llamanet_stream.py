"""`POST /generate/stream`'s body: Server-Sent Events in LlamaNet's shape. Each piece of
text is `data: {"text": "...", "finished": false}`; the last event has `"finished":
true`, empty text, `tokens_generated`, `generation_time`, `node_id`, `model` and the
job's `id`, and `error` (OpenAI's error object) when the job did not complete, its model
lost its last node, or the key was revoked. A comment line every 15 s while nothing
comes (a job waiting in the queue) keeps proxies from closing the connection.

As on the OpenAI routes, the job is an ordinary job: a client that leaves does not
cancel it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable

import orjson

from openbeepboop.server.core.auth import KeyRing
from openbeepboop.server.core.generate import Ended, Generated, TextPiece, text_pieces
from openbeepboop.server.core.queue import Queue
from openbeepboop.server.errors import DomainError
from openbeepboop.server.http.streaming import (
    KEEPALIVE_SECONDS,
    REVOKED,
    while_key_active,
    with_keepalive,
)
from openbeepboop.server.models import JSON, Job, JobStatus

_REVOKED_SSE = b"data: " + orjson.dumps(REVOKED) + b"\n\n"


def event(data: JSON) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


def finished(report: Generated) -> JSON:
    """The last event of a stream whose job completed."""
    return {
        "text": "",
        "finished": True,
        "tokens_generated": report.tokens_generated,
        "generation_time": report.generation_time,
        "node_id": report.node_id,
        "model": report.model,
        "id": report.id,
        "finish_reason": report.finish_reason,
    }


def failed(job: Job | None, error: JSON, pieces: int) -> JSON:
    """The last event of a stream that ends without a completed job."""
    started, ended = (job.started_at, job.finished_at) if job else (None, None)
    seconds = round(max(0.0, ended - started), 4) if started and ended else 0.0
    return {
        "text": "",
        "finished": True,
        "error": error,
        "tokens_generated": pieces,
        "generation_time": seconds,
        "node_id": job.node_id if job else None,
        "model": job.model if job else None,
        "id": job.id if job else None,
    }


def _job_error(job: Job | None) -> JSON:
    error = (job.error if job else None) or {}
    status = job.status.value if job else "gone"
    return {
        "message": str(error.get("message") or f"the job ended {status}"),
        "type": "upstream_error",
        "param": None,
        "code": str(error.get("code") or f"job_{status}"),
    }


def _guard_error(watcher: asyncio.Future[None]) -> JSON | None:
    if not watcher.done() or watcher.cancelled():
        return None
    exc = watcher.exception()
    if not isinstance(exc, DomainError):
        return None
    return {"message": str(exc), "type": "server_error", "param": None, "code": exc.code}


async def _events(
    queue: Queue, job: Job, guard: Callable[[], Awaitable[None]]
) -> AsyncGenerator[JSON, None]:
    """The events of one job, from queued to final. `guard()`, run alongside, may end
    the job and say why by raising a DomainError (Queue.abandon_when_unserved)."""
    watcher = asyncio.ensure_future(guard())
    pieces = 0
    try:
        async for item in text_pieces(queue, job):
            if isinstance(item, TextPiece):
                pieces += 1
                yield {"text": item.text, "finished": False}
                continue
            if not isinstance(item, Ended):  # pragma: no cover - text_pieces yields two kinds
                continue
            if item.report is not None:
                yield finished(item.report)
                return
            if item.job is not None and item.job.status is JobStatus.CANCELLED:
                await asyncio.wait({watcher}, timeout=1.0)  # did the guard cancel it?
            yield failed(item.job, _guard_error(watcher) or _job_error(item.job), pieces)
            return
    finally:
        if not watcher.done():
            watcher.cancel()


async def _framed(events: AsyncGenerator[JSON, None], keepalive: float) -> AsyncIterator[bytes]:
    async for data in with_keepalive(events, keepalive):
        yield b": keep-alive\n\n" if data is None else event(data)


async def _revocation_in_our_shape(body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """`while_key_active` ends a stream with OpenAI's bare error event: here it becomes
    a last event, as a LlamaNet client reads one."""
    async for chunk in body:
        if chunk == _REVOKED_SSE:
            yield event(failed(None, REVOKED["error"], 0))
            return
        yield chunk


def generate_stream(
    queue: Queue,
    keyring: KeyRing,
    key_id: str,
    job: Job,
    guard: Callable[[], Awaitable[None]],
    keepalive: float = KEEPALIVE_SECONDS,
) -> AsyncIterator[bytes]:
    """The SSE body for `job`, while the key `key_id` stays active."""
    body = _framed(_events(queue, job, guard), keepalive)
    return _revocation_in_our_shape(while_key_active(keyring, key_id, body))
