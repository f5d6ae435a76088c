"""`stream: true` on `POST /v1/responses`: the typed Server-Sent Events OpenAI sends
(`event: <type>` and `data: {..., "type", "sequence_number"}`), built from the job's
text pieces as a node pushes them (`Queue.follow`), then the output items of the result.

As on the chat route, a client that disconnects does not cancel the job; a failure is
`response.failed` with the error in the response.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson

from openbeepboop.server.core import responses
from openbeepboop.server.core.choices import content_of
from openbeepboop.server.core.queue import Queue
from openbeepboop.server.errors import DomainError
from openbeepboop.server.models import JSON, Job, JobStatus, Piece


class _Events:
    """Numbers the events of one stream."""

    def __init__(self) -> None:
        self.seq = 0

    def __call__(self, kind: str, **data: Any) -> bytes:
        body = {"type": kind, "sequence_number": self.seq, **data}
        self.seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(body) + b"\n\n"


async def stream_response(
    queue: Queue,
    job: Job,
    guard: Callable[[], Awaitable[None]],
    after: Callable[[], Awaitable[None]],
) -> AsyncIterator[bytes]:
    """The SSE body of a streamed response. `guard()`, run alongside, may end the job and
    say why (Queue.abandon_when_unserved); `after()` runs once the job is final."""
    event = _Events()
    yield event("response.created", response=responses.response_object(job, "in_progress"))
    yield event("response.in_progress", response=responses.response_object(job, "in_progress"))
    item_id = responses.message_id(job)
    where = {"item_id": item_id, "output_index": 0}
    opened = False
    sent = ""
    watcher = asyncio.ensure_future(guard())
    try:
        async for piece in queue.follow(job):
            text = _first_text(piece)
            if not text:
                continue  # other choices, tool-call fragments: from the result, below
            if not opened:
                yield _open_text(event, job)
                opened = True
            sent += text
            yield event(
                "response.output_text.delta", **where, content_index=0, delta=text, logprobs=[]
            )
        final = await queue.store.get_job(job.id)
        if final is not None and final.status is JobStatus.CANCELLED:
            await asyncio.wait({watcher}, timeout=1.0)  # did the guard cancel it?
    finally:
        if not watcher.done():
            watcher.cancel()
    failure = _guard_error(watcher)
    if final is None or final.status is not JobStatus.COMPLETED or failure is not None:
        shown = responses.response_object(final or job, "failed")
        reason = (final.error if final else None) or {}
        status = final.status.value if final else "gone"
        shown["error"] = failure or {
            "code": str(reason.get("code") or f"job_{status}"),
            "message": str(reason.get("message") or f"the job ended {status}"),
        }
        yield event("response.failed", response=shown)
        await after()
        return
    done = responses.response_object(final)
    for index, item in enumerate(done["output"]):
        if item["type"] == "message":
            text = item["content"][0]["text"]
            if not opened:
                yield _open_text(event, job)
                opened = True
            rest = text[len(sent) :] if text.startswith(sent) else ""  # never pushed
            if rest:
                yield event(
                    "response.output_text.delta", **where, content_index=0, delta=rest, logprobs=[]
                )
            yield event(
                "response.output_text.done", **where, content_index=0, text=text, logprobs=[]
            )
            yield event(
                "response.content_part.done", **where, content_index=0, part=item["content"][0]
            )
        else:
            yield event("response.output_item.added", output_index=index, item=item)
            yield event(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=index,
                name=item["name"],
                arguments=item["arguments"],
            )
        yield event("response.output_item.done", output_index=index, item=item)
    kind = "response.incomplete" if done["status"] == "incomplete" else "response.completed"
    yield event(kind, response=done)
    await after()


def _first_text(piece: Piece) -> str:
    """The text of the message item a piece adds to (choice 0's content)."""
    if isinstance(piece, str):
        return piece
    if isinstance(piece, dict):  # a model's progress
        return ""
    return "".join(content_of(c) for c in piece if isinstance(c, dict) and c.get("index", 0) == 0)


def _open_text(event: _Events, job: Job) -> bytes:
    item = responses.text_item(job, "", "in_progress")
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    return event("response.output_item.added", output_index=0, item=item) + event(
        "response.content_part.added",
        item_id=item["id"],
        output_index=0,
        content_index=0,
        part=part,
    )


def _guard_error(watcher: asyncio.Future[None]) -> JSON | None:
    if not watcher.done() or watcher.cancelled():
        return None
    exc = watcher.exception()
    if not isinstance(exc, DomainError):
        return None
    return {"code": exc.code or "server_error", "message": str(exc)}
