"""LlamaNet's `/generate`: a prompt in, text out, run as an ordinary text-completion job
(queued, leased, fenced and counted like any other). This module holds its rules, apart
from HTTP: which model a request without one means, what a finished job reports
(`Generated`), and a running job's pieces as plain text (`text_pieces`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

from openbeepboop.server.core.choices import Tally
from openbeepboop.server.core.queue import Queue
from openbeepboop.server.errors import InvalidRequest
from openbeepboop.server.models import JSON, Job, JobStatus

ENDPOINT = "/v1/completions"


def pick_model(asked: str | None, served: Iterable[str]) -> str:
    """`asked`, or else the one model live nodes serve; InvalidRequest (param `model`)
    when none or several are served."""
    if asked is not None:
        return asked
    models = sorted(set(served))
    if len(models) == 1:
        return models[0]
    if not models:
        raise InvalidRequest(
            "no live node serves a model yet; name one in 'model'",
            param="model",
            code="model_required",
        )
    raise InvalidRequest(
        f"live nodes serve several models ({', '.join(models)}); name one in 'model'",
        param="model",
        code="model_required",
    )


@dataclass(frozen=True, slots=True)
class Generated:
    """What a finished generation reports: its text, the tokens the node counted, the
    seconds from the job's start on its node to its result, and that node."""

    id: str
    model: str
    text: str
    tokens_generated: int
    generation_time: float
    node_id: str | None
    finish_reason: str | None


def generated(job: Job, result: JSON | None, pieces: int = 0) -> Generated:
    """The report of a completed text-completion `job`. Tokens are the result's
    `usage.completion_tokens`, or else the pieces streamed (one a token, as nodes push
    them)."""
    choice = _first_choice(result)
    text = choice.get("text")
    usage = (result or {}).get("usage")
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        tokens = pieces
    finish = choice.get("finish_reason")
    return Generated(
        id=job.id,
        model=job.model,
        text=text if isinstance(text, str) else "",
        tokens_generated=tokens,
        generation_time=generation_time(job),
        node_id=job.node_id,
        finish_reason=finish if isinstance(finish, str) else None,
    )


def generation_time(job: Job) -> float:
    """Seconds from the job's (last) start on a node to its end; 0 if it never ran."""
    if job.started_at is None or job.finished_at is None:
        return 0.0
    return round(max(0.0, job.finished_at - job.started_at), 4)


def _first_choice(result: JSON | None) -> JSON:
    choices = (result or {}).get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                return choice
    return {}


@dataclass(frozen=True, slots=True)
class TextPiece:
    """A bit of text as it came."""

    text: str


@dataclass(frozen=True, slots=True)
class Ended:
    """The job ended: completed (`report`), or not (`job`, `error`: the job's error or
    None when it was cancelled or is gone)."""

    job: Job | None
    report: Generated | None = None


async def text_pieces(queue: Queue, job: Job) -> AsyncIterator[TextPiece | Ended]:
    """The text of a text-completion job's first choice as its node pushes it, then what
    its stored result adds that no piece carried, then `Ended`."""
    tally = Tally(chat=False, roles=False)
    count = 0
    async for raw in queue.follow(job):
        for choice in tally.take(raw):
            text = choice.get("text")
            if choice["index"] == 0 and isinstance(text, str) and text:
                count += 1
                yield TextPiece(text)
    final = await queue.store.get_job(job.id)
    if final is None or final.result is None or final.status is not JobStatus.COMPLETED:
        yield Ended(final)
        return
    for choice in tally.rest(final.result):
        text = choice.get("text")
        if choice["index"] == 0 and isinstance(text, str) and text:
            yield TextPiece(text)
    yield Ended(final, generated(final, final.result, count))
