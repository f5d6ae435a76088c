"""`stream: true` on the OpenAI routes: Server-Sent Events as OpenAI sends them — bare
`data: {chunk}` lines, one choice a chunk: the role first, then every piece a node pushed
(text, other choices, tool-call fragments, logprobs, refusals), then what the stored
result holds that no piece carried and each choice's `finish_reason` (choices.py), a
usage chunk when `stream_options.include_usage` is set, then `data: [DONE]`. A failure
after the stream began is sent as `data: {"error": {...}}`.

The job is an ordinary job: a client that disconnects does not cancel it; it completes
and stays retrievable (its id is in the `x-openbeepboop-job-id` header).

A stream whose key is revoked ends (`while_key_active`) with `data: {"error": {...,
"code": "api_key_revoked"}}` and no `[DONE]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import orjson

from openbeepboop.server.core.auth import KeyRing
from openbeepboop.server.core.choices import Tally
from openbeepboop.server.core.events import job_events
from openbeepboop.server.core.queue import Queue
from openbeepboop.server.errors import DomainError
from openbeepboop.server.models import JSON, Job, JobStatus

KEEPALIVE_SECONDS = 15.0
T = TypeVar("T")
REVOKED: JSON = {
    "error": {
        "message": "the API key of this stream was revoked",
        "type": "invalid_request_error",
        "param": None,
        "code": "api_key_revoked",
    }
}


def _sse(data: Any) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


class _Chunks:
    """Builds the chunk objects of one endpoint."""

    def __init__(self, job: Job) -> None:
        self.chat = job.endpoint != "/v1/completions"
        self.base = {
            "id": ("chatcmpl-" if self.chat else "cmpl-") + job.id.removeprefix("job_"),
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": int(time.time()),
            "model": job.model,
        }

    def opening(self) -> JSON:
        """The first chunk: the role of choice 0 (chat), or empty text (completions)."""
        if self.chat:
            delta = {"role": "assistant"}
            return self.of({"index": 0, "delta": delta, "logprobs": None, "finish_reason": None})
        return self.of({"index": 0, "text": "", "logprobs": None, "finish_reason": None})

    def of(self, choice: JSON) -> JSON:
        """One chunk carrying one choice (as OpenAI streams them, one choice a chunk)."""
        return {**self.base, "choices": [choice]}

    def usage(self, usage: JSON) -> JSON:
        return {**self.base, "choices": [], "usage": usage}


async def stream_job(
    queue: Queue,
    job: Job,
    include_usage: bool,
    guard: Callable[[], Awaitable[None]] | None = None,
) -> AsyncIterator[bytes]:
    """The SSE body for one job, from queued to final. `guard()`, run alongside, may end
    the job and say why by raising a DomainError (Queue.abandon_when_unserved)."""
    chunks = _Chunks(job)
    tally = Tally(chat=chunks.chat)
    tally.mark_role(0)
    watcher = asyncio.ensure_future(guard()) if guard is not None else None
    try:
        yield _sse(chunks.opening())
        async for piece in queue.follow(job):
            for choice in tally.take(piece):
                yield _sse(chunks.of(choice))
        final = await queue.store.get_job(job.id)
        if watcher is not None and final is not None and final.status is JobStatus.CANCELLED:
            await asyncio.wait({watcher}, timeout=1.0)  # did the guard cancel it?
    finally:
        if watcher is not None and not watcher.done():
            watcher.cancel()
    reason = _guard_error(watcher)
    if reason is not None:
        yield _sse(reason)
        yield b"data: [DONE]\n\n"
        return
    if final is None or final.status is not JobStatus.COMPLETED:
        error = (final.error if final else None) or {}
        status = final.status.value if final else "gone"
        yield _sse(
            {
                "error": {
                    "message": error.get("message") or f"the job ended {status}",
                    "type": "upstream_error",
                    "param": None,
                    "code": error.get("code") or f"job_{status}",
                }
            }
        )
        yield b"data: [DONE]\n\n"
        return
    chunks.base["model"] = final.model  # an alias's job may have moved to another member
    for choice in tally.rest(final.result):  # what no piece carried, then finish reasons
        yield _sse(chunks.of(choice))
    usage = (final.result or {}).get("usage")
    if include_usage and usage:
        yield _sse(chunks.usage(usage))
    yield b"data: [DONE]\n\n"


def _guard_error(watcher: asyncio.Future[None] | None) -> JSON | None:
    """The error chunk for a guard that ended the stream, or None."""
    if watcher is None or not watcher.done() or watcher.cancelled():
        return None
    exc = watcher.exception()
    if not isinstance(exc, DomainError):
        return None
    return {"error": {"message": str(exc), "type": "server_error", "param": None, "code": exc.code}}


async def stream_events(
    queue: Queue, job: Job, after: int, keepalive: float = KEEPALIVE_SECONDS
) -> AsyncIterator[bytes]:
    """`GET /v1/jobs/{id}/events`: the job's events (rbee's vocabulary, the type inside
    the data) with SSE ids for `Last-Event-ID`, then `data: [DONE]`. While nothing
    happens (a long wait in the queue) a comment line every `keepalive` seconds keeps
    proxies from closing the connection."""
    async for event in with_keepalive(job_events(queue, job, after), keepalive):
        if event is None:
            yield b": keep-alive\n\n"
            continue
        payload = orjson.dumps({"type": event.type, **event.data})
        yield b"id: %d\ndata: %s\n\n" % (event.id, payload)
    yield b"data: [DONE]\n\n"


async def with_keepalive(
    items: AsyncGenerator[T, None], every: float = KEEPALIVE_SECONDS
) -> AsyncIterator[T | None]:
    """`items`, with a None between them whenever none came for `every` seconds (the cue
    for an SSE comment line). `items` is closed at the end, or when the reader stops."""
    pending: asyncio.Future[T] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(items))
            done, _ = await asyncio.wait({pending}, timeout=every)
            if not done:
                yield None
                continue
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield item
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await pending
        await items.aclose()


async def while_key_active(
    keyring: KeyRing, key_id: str, body: AsyncIterator[bytes]
) -> AsyncIterator[bytes]:
    """`body` as long as the key `key_id` is active; once it is revoked (here, elsewhere
    or by the CLI: `KeyRing.watch`), an error event, and the stream ends."""
    with keyring.watch(key_id) as revoked:
        gone = asyncio.ensure_future(revoked.wait())
        pending: asyncio.Future[bytes] | None = None
        try:
            while True:
                pending = asyncio.ensure_future(anext(body))
                await asyncio.wait({pending, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not pending.done():
                    yield _sse(REVOKED)
                    return
                try:
                    chunk = pending.result()
                except StopAsyncIteration:
                    return
                pending = None
                yield chunk
        finally:
            gone.cancel()
            if pending is not None and not pending.done():
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await pending
            close = getattr(body, "aclose", None)  # an async generator's own finally
            if close is not None:
                await close()
