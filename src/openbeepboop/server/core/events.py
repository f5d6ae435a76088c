"""The life of one job as a sequence of events, for anyone following it live.

The vocabulary is the rbee quickstart's: `queued` {job_id, position} (with
`estimated_start_at` once known, core/eta.py; and `waiting_for` {node, node_labels} when
the job is pinned where no live node may run it), `started` {job_id, model, node_id,
started_at}, `token` {t, i} for each piece of choice 0's text, then one of `end`
{tokens_out, decode_time_ms, stop_reason}, `failed` {job_id, code, message} or
`cancelled` {job_id}. What is not choice 0's text — other choices (`n`), tool-call
fragments, logprobs, refusals, their finish reasons — comes as `delta` {i, choice}, the
choice an OpenAI chunk would carry (choices.py). Every event has a number (`id`) that is
the same on every connection — `queued` 0, `started` 1, piece `i` is `i + 2`, the last one
follows the pieces — so a subscriber who reconnects with the last id it saw resumes
exactly after it. A late subscriber gets the pieces so far first, and what no piece
carried comes from the result before `end`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial

from openbeepboop.server.core.choices import Tally, text_of
from openbeepboop.server.core.queue import Queue
from openbeepboop.server.models import JSON, Job, JobStatus, Piece
from openbeepboop.server.topics import job_topic

QUEUED_ID = 0
STARTED_ID = 1
FIRST_TOKEN_ID = 2
RECHECK_SECONDS = 1.0
STOP_REASONS = {"stop": "EOS", "length": "MAX_TOKENS"}


@dataclass(frozen=True, slots=True)
class JobEvent:
    """One event: its number, its type and its fields."""

    id: int
    type: str
    data: JSON

    @property
    def final(self) -> bool:
        return self.type in ("end", "failed", "cancelled")


def result_text(job: Job) -> tuple[str, str, JSON]:
    """(text, finish_reason, usage) of a completed job's OpenAI result."""
    result = job.result or {}
    choice = (result.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    text = message.get("content") if "message" in choice else choice.get("text")
    return str(text or ""), str(choice.get("finish_reason") or "stop"), result.get("usage") or {}


async def job_events(queue: Queue, job: Job, after: int = -1) -> AsyncGenerator[JobEvent, None]:
    """The job's events from the start (or after event number `after`) to its end."""
    # Follow from now, so that pieces pushed while we wait for the start are kept for us.
    pieces = queue.follow(job) if not job.status.is_final else None
    if job.status is JobStatus.QUEUED:
        if after < QUEUED_ID:
            position = await queue.queue_position(job)
            queued: JSON = {"job_id": job.id, "position": position}
            eta = await queue.estimated_start(job, position)
            if eta is not None:  # known once its model ran lately (core/eta.py)
                queued["estimated_start_at"] = round(eta, 2)
            waiting = await queue.waiting_for(job)
            if waiting is not None:  # pinned to a node that is not live (yet)
                queued["waiting_for"] = waiting
            yield JobEvent(QUEUED_ID, "queued", queued)
        job = await _while_queued(queue, job)
    if job.started_at is not None and after < STARTED_ID:
        yield _started(job)
    tally = Tally(chat=job.endpoint != "/v1/completions", roles=False)
    if pieces is None and queue.deltas.has_parts(job.id):  # finished, recently streamed
        pieces = queue.follow(job)
    numbered = _Numbered(pieces, tally)
    async for index, make in numbered:
        if index + FIRST_TOKEN_ID > after:
            yield make(index)
    final = await queue.store.get_job(job.id) or job
    async for ending in _ending(final, tally, numbered.count, after):
        yield ending


class _Numbered:
    """The events of a job's pieces with their numbers; `count` once it is done."""

    def __init__(self, pieces: AsyncIterator[Piece] | None, tally: Tally) -> None:
        self._pieces = pieces
        self._tally = tally
        self.count = 0

    async def __aiter__(self) -> AsyncIterator[tuple[int, Callable[[int], JobEvent]]]:
        if self._pieces is None:
            return
        async for piece in self._pieces:
            for make in _events_of(piece, self._tally):
                yield self.count, make
                self.count += 1


async def _ending(
    final: Job, tally: Tally, index: int, after: int
) -> AsyncGenerator[JobEvent, None]:
    """What no piece carried (from the result), then `end`, `failed` or `cancelled`."""
    if final.status is JobStatus.COMPLETED:
        for choice in tally.rest(final.result):
            if choice["index"] == 0 and _only_finish(choice):
                continue  # `end` says it (stop_reason)
            if index + FIRST_TOKEN_ID > after:
                yield _piece_event(index, choice)
            index += 1
        _, finish, usage = result_text(final)
        started = final.started_at or final.created_at
        decode_ms = round(((final.finished_at or started) - started) * 1000)
        yield JobEvent(
            index + FIRST_TOKEN_ID,
            "end",
            {
                "job_id": final.id,
                "tokens_out": int(usage.get("completion_tokens") or index),
                "decode_time_ms": decode_ms,
                "stop_reason": STOP_REASONS.get(finish, finish.upper()),
            },
        )
    elif final.status is JobStatus.CANCELLED:
        yield JobEvent(index + FIRST_TOKEN_ID, "cancelled", {"job_id": final.id})
    else:
        error = final.error or {}
        yield JobEvent(
            index + FIRST_TOKEN_ID,
            "failed",
            {
                "job_id": final.id,
                "code": str(error.get("code") or f"job_{final.status.value}"),
                "message": str(error.get("message") or f"the job ended {final.status.value}"),
            },
        )


def _piece_event(index: int, choice: JSON) -> JobEvent:
    """`token` {t, i} for choice 0's text, else `delta` {i, choice} (an OpenAI chunk
    choice: another choice, tool-call fragments, logprobs, refusal, a finish reason)."""
    text = text_of(choice)
    if text is not None:
        return JobEvent(index + FIRST_TOKEN_ID, "token", {"t": text, "i": index})
    return JobEvent(index + FIRST_TOKEN_ID, "delta", {"i": index, "choice": choice})


def _events_of(piece: Piece, tally: Tally) -> list[Callable[[int], JobEvent]]:
    """The events of one piece, each to be numbered."""
    if isinstance(piece, dict):  # the model is fetched or loaded for this job
        return [partial(_progress_event, piece=piece)]
    return [
        partial(_piece_event, choice=choice)
        for choice in tally.take(piece)
        if not (choice["index"] == 0 and _only_finish(choice))  # `end` says it (stop_reason)
    ]


def _progress_event(index: int, piece: JSON) -> JobEvent:
    """rbee's `downloading` {bytes, total, fraction} or `loading` {fraction}."""
    progress = piece.get("progress")
    progress = progress if isinstance(progress, dict) else {}
    kind = "downloading" if progress.get("type") == "downloading" else "loading"
    data: JSON = {"fraction": float(progress.get("fraction") or 0.0)}
    if kind == "downloading" and isinstance(progress.get("bytes"), int):
        data.update(bytes=progress["bytes"], total=progress.get("total"))
    return JobEvent(index + FIRST_TOKEN_ID, kind, data)


def _only_finish(choice: JSON) -> bool:
    return not choice.get("delta") and not choice.get("text") and not choice.get("logprobs")


def _started(job: Job) -> JobEvent:
    return JobEvent(
        STARTED_ID,
        "started",
        {
            "job_id": job.id,
            "model": job.model,
            "node_id": job.node_id,
            "started_at": int(job.started_at or job.created_at),
        },
    )


async def _while_queued(queue: Queue, job: Job) -> Job:
    """The job once it has left the queue (started, or final without starting)."""
    with queue.notifier.listen([job_topic(job.id)]) as event:
        while job.status is JobStatus.QUEUED:
            event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), RECHECK_SECONDS)
            job = await queue.store.get_job(job.id) or job
    return job
