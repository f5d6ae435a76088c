"""The Batch API's rules: a batch turns the lines of an input file into ordinary jobs (at a
lower priority than interactive requests), follows them, and writes OpenAI's output and
error files when they are all final.

A driver loop (`run`) moves batches along: `validating` (lines become jobs, in chunks, with
idempotency keys so a restart resumes without duplicates) → `in_progress` → `finalizing`
(files written) → `completed` / `expired`, or `cancelling` → `cancelled`. Each step claims
the batch with a short lease and saves it with a version check, so several servers on
one database never drive one batch twice.

A batch's lines count against its key's active-job limit (`max_active_jobs_per_key`)
from its creation: a batch whose lines, with the key's queued and running jobs and the
lines of its batches still being queued, would pass the limit is refused at create
(429 `too_many_active_jobs`; 400 `batch_too_large` when the file alone is over it).
Once accepted, its lines are queued whole. Its lines count against its share's jobs
quota at create too (core/quotas.py), all or none.

Lines of a `/v1/responses` batch run as the chat-completion jobs `POST /v1/responses`
makes (core/responses.py maps them), and their output lines hold Response objects; one
with `store: false` is deleted once the batch is final (the output file keeps it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from openbeepboop.server.core import responses
from openbeepboop.server.core.assistants import Assistants
from openbeepboop.server.core.cache import take_mode
from openbeepboop.server.core.files import (
    BATCH_PURPOSE,
    OUTPUT_PURPOSE,
    BatchLine,
    Files,
    PartWriter,
    lines_of,
    new_file_id,
    parse_batch_line,
)
from openbeepboop.server.core.passes import one_pass
from openbeepboop.server.core.pins import take_pin
from openbeepboop.server.core.queue import JobRequest, Queue
from openbeepboop.server.errors import (
    Conflict,
    DomainError,
    InvalidRequest,
    NotFound,
    RateLimited,
)
from openbeepboop.server.models import (
    BATCH_ENDPOINTS,
    JSON,
    ApiKey,
    Batch,
    BatchStatus,
    Job,
    JobStatus,
    Role,
)
from openbeepboop.server.store.base import Store

log = logging.getLogger("openbeepboop.batches")

BATCHES_TOPIC = "batches"
CHUNK = 500  # lines queued per store transaction
PAGE = 1000  # jobs read per query while writing the output
LEASE_SECONDS = 60.0
WINDOW = re.compile(r"^([1-9][0-9]{0,5})([smhd])$")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_ERRORS = 100
RESPONSES = "/v1/responses"  # lines that run as chat-completion jobs (core/responses.py)


@dataclass(frozen=True, slots=True)
class BatchConfig:
    priority: int = -10  # below interactive requests (0 by default)
    max_attempts: int | None = None
    interval_seconds: float = 0.5


def new_batch_id() -> str:
    """A batch id: `batch_` and 96 random bits."""
    return "batch_" + secrets.token_hex(12)


def window_seconds(window: str) -> float:
    """`24h` → 86400. OpenAI accepts only `24h`; any `<n>s|m|h|d` works here."""
    match = WINDOW.match(window)
    if match is None:
        raise InvalidRequest(
            f"completion_window must look like '24h' (a number and s, m, h or d), not {window!r}",
            param="completion_window",
        )
    return int(match.group(1)) * UNITS[match.group(2)]


class Batches:
    """Batches a key may see, and the driver that runs them."""

    def __init__(
        self,
        store: Store,
        queue: Queue,
        files: Files,
        assistants: Assistants,
        config: BatchConfig,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.queue = queue
        self.files = files
        self.assistants = assistants
        self.config = config
        self._clock = clock
        self._owner = secrets.token_hex(4)

    # -- client verbs -----------------------------------------------------------

    async def create(
        self,
        key: ApiKey,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        metadata: dict[str, str] | None,
    ) -> Batch:
        if endpoint not in BATCH_ENDPOINTS:
            raise InvalidRequest(
                f"endpoint must be one of {', '.join(BATCH_ENDPOINTS)}, not {endpoint!r}",
                param="endpoint",
            )
        window = window_seconds(completion_window)
        source = await self.files.get(key, input_file_id)
        if source.purpose != BATCH_PURPOSE:
            raise InvalidRequest(
                f"file {input_file_id} has purpose {source.purpose!r}; a batch needs 'batch'",
                param="input_file_id",
            )
        await self._check_room(key, source.lines)
        # quotas (core/quotas.py): every line counts now, refused whole when over
        reserved = await self.queue.quotas.admit(key, source.lines, param="input_file_id")
        now = self._clock()
        batch = Batch(
            id=new_batch_id(),
            owner=key.id,
            endpoint=endpoint,
            input_file_id=input_file_id,
            completion_window=completion_window,
            status=BatchStatus.VALIDATING,
            created_at=now,
            expires_at=now + window,
            metadata=metadata,
            request_counts={"total": source.lines, "completed": 0, "failed": 0},
        )
        try:
            created = await self.store.create_batch(batch)
        except Exception:
            await self.queue.quotas.refund(reserved, source.lines)
            raise
        self.queue.notifier.publish([BATCHES_TOPIC])
        return created

    async def _check_room(self, key: ApiKey, lines: int) -> None:
        """Refuse a batch of `lines` that would take the key past its active-job limit
        (see the module docstring); admin keys, as for submits, have none."""
        if key.role is not Role.CLIENT:
            return
        limit = self.queue.config.max_active_jobs_per_key
        if lines > limit:
            raise InvalidRequest(
                f"the input file has {lines} requests; this key may have at most {limit} "
                "queued or running jobs: split the file into smaller batches",
                param="input_file_id",
                code="batch_too_large",
            )
        taken = await self._taken(key)
        if taken + lines > limit:  # a second look: see `_taken`
            taken = min(taken, await self._taken(key))
        if taken + lines > limit:
            raise RateLimited(
                f"this key has {taken} queued or running jobs (with the lines of its batches "
                f"not yet queued); this batch's {lines} requests would pass the limit of "
                f"{limit}",
                retry_after=5,
                code="too_many_active_jobs",
            )

    async def _taken(self, key: ApiKey) -> int:
        """The key's queued and running jobs plus its batches' lines not yet queued. Two
        reads: lines the driver queues between them count twice (never zero times), so
        this may overstate; the smaller of two looks is still never below the truth."""
        waiting: int = sum(
            int((b.request_counts or {}).get("total", 0)) - b.lines_queued
            for b in await self.store.open_batches()
            if b.owner == key.id and b.status is BatchStatus.VALIDATING
        )
        active: int = await self.store.count_active(key.id)
        return active + waiting

    async def get(self, key: ApiKey, batch_id: str) -> Batch:
        batch = await self.store.get_batch(batch_id)
        if batch is None or (key.role is not Role.ADMIN and batch.owner != key.id):
            raise NotFound(
                f"no batch with id {batch_id!r}", param="batch_id", code="batch_not_found"
            )
        return await self._with_live_counts(batch)

    async def list_batches(self, key: ApiKey, limit: int, after: str | None) -> list[Batch]:
        owner = None if key.role is Role.ADMIN else key.id
        before = None if after is None else (await self.get(key, after)).seq
        found = await self.store.list_batches(owner, limit, before)
        return [await self._with_live_counts(b) for b in found]

    async def cancel(self, key: ApiKey, batch_id: str) -> Batch:
        """Stop a batch: queued lines are cancelled, running ones finish; then the output
        holds what completed. Cancelling a final batch is a conflict (as OpenAI's is)."""
        while True:
            batch = await self.get(key, batch_id)
            if batch.status in (BatchStatus.CANCELLING, BatchStatus.CANCELLED):
                return batch
            if batch.status.is_final or batch.status is BatchStatus.FINALIZING:
                raise Conflict(
                    f"batch {batch_id} is {batch.status.value} and cannot be cancelled",
                    code="batch_not_cancellable",
                )
            batch.status = BatchStatus.CANCELLING
            batch.cancelling_at = self._clock()
            batch.lease_until = 0.0  # the driver looks at it next pass
            saved = await self.store.save_batch(batch)
            if saved is not None:
                await self.store.cancel_batch_jobs(batch_id, self._clock())
                self.queue.notifier.publish([BATCHES_TOPIC])
                return await self._with_live_counts(saved)

    async def _with_live_counts(self, batch: Batch) -> Batch:
        """While jobs run, request_counts are counted from them."""
        if batch.status not in (BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING):
            return batch
        counts = await self.store.batch_counts(batch.id)
        total = (batch.request_counts or {}).get("total", sum(counts.values()))
        return replace(batch, request_counts=_request_counts(counts, total))

    # -- the driver -------------------------------------------------------------

    async def run(self) -> None:
        """Drive open batches forever (a background task of the server)."""
        with self.queue.notifier.listen([BATCHES_TOPIC]) as event:
            while True:
                event.clear()
                await one_pass("batch driver", self.drive_once, log)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), self.config.interval_seconds)

    async def drive_once(self) -> None:
        """One pass over the open batches."""
        for batch in await self.store.open_batches():
            if batch.status in (BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING):
                counts = await self.store.batch_counts(batch.id)
                queued, running = counts.get("queued", 0), counts.get("in_progress", 0)
                waiting = batch.status is BatchStatus.IN_PROGRESS or not queued
                if running + queued and waiting:
                    continue  # nothing to do until its jobs finish: no write
            claimed = await self._claim(batch)
            if claimed is None:
                continue
            try:
                await self._step(claimed)
            except _LostClaim:
                continue

    async def _claim(self, batch: Batch) -> Batch | None:
        now = self._clock()
        if batch.lease_until > now:
            return None
        return await self.store.save_batch(replace(batch, lease_until=now + LEASE_SECONDS))

    async def _save(self, batch: Batch) -> Batch:
        saved = await self.store.save_batch(batch)
        if saved is None:
            raise _LostClaim(batch.id)
        return saved

    async def _step(self, batch: Batch) -> None:
        if batch.status is BatchStatus.VALIDATING:
            batch = await self._queue_lines(batch)
            if batch.status is not BatchStatus.IN_PROGRESS:
                return
        if batch.status is BatchStatus.CANCELLING:
            await self.store.cancel_batch_jobs(batch.id, self._clock())
        if batch.status in (BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING):
            counts = await self.store.batch_counts(batch.id)
            if counts.get("queued", 0) or counts.get("in_progress", 0):
                await self._save(replace(batch, lease_until=0.0))  # any server may look next
                return
            batch = await self._save(
                replace(batch, status=BatchStatus.FINALIZING, finalizing_at=self._clock())
            )
        if batch.status is BatchStatus.FINALIZING:
            await self._finalize(batch)

    async def _queue_lines(self, batch: Batch) -> Batch:
        """Turn input lines into jobs, resuming after `lines_queued`."""
        source = await self.store.get_file(batch.input_file_id)
        if source is None:
            return await self._fail(batch, "input_file_missing", "the input file was deleted")
        if batch.lines_queued == 0:
            problems = await self._mismatched_lines(batch, source.id)
            if problems:
                return await self._fail_with(batch, problems)
        pending: list[JobRequest] = []
        skip = batch.lines_queued
        async for number, raw in lines_of(self.files.content(source)):
            if skip:
                skip -= 1
                continue
            try:
                pending.append(await self._line_request(batch, parse_batch_line(raw, number)))
            except DomainError as exc:  # a template gone; a file checked by an older server
                return await self._fail(batch, exc.code, f"line {number}: {exc}")
            if len(pending) >= CHUNK:
                batch = await self._queue_chunk(batch, pending)
                pending = []
                if batch.status is BatchStatus.FAILED:
                    return batch
        if pending:
            batch = await self._queue_chunk(batch, pending)
        if batch.status is BatchStatus.FAILED:
            return batch
        return await self._save(
            replace(batch, status=BatchStatus.IN_PROGRESS, in_progress_at=self._clock())
        )

    async def _queue_chunk(self, batch: Batch, requests: list[JobRequest]) -> Batch:
        try:
            await self.queue.enqueue(batch.owner, requests)
        except InvalidRequest as exc:  # e.g. a template that renders an unusable body
            return await self._fail(batch, exc.code, str(exc))
        now = self._clock()
        return await self._save(
            replace(
                batch,
                lines_queued=batch.lines_queued + len(requests),
                lease_until=now + LEASE_SECONDS,
            )
        )

    async def _line_request(self, batch: Batch, line: BatchLine) -> JobRequest:
        """The job a line becomes (an assistant template rendered first); a pin in its
        body (`node`, `node_labels`) is the job's, not the model's."""
        body, node, labels = take_pin(line.body)
        body, cache = take_mode(body)
        if "template" in body:
            body = await self.assistants.body_for_line(batch.owner, body)
        request = self._request(batch, replace(line, body=body))
        if node is None and labels is None and cache is None:
            return request
        return replace(request, node=node, node_labels=labels, cache=cache)

    def _request(self, batch: Batch, line: BatchLine) -> JobRequest:
        endpoint, body, metadata = line.url, line.body, None
        if line.url == RESPONSES:  # the chat-completion job POST /v1/responses makes
            endpoint = responses.ENDPOINT
            body, metadata = responses.batch_request(line.body)
        return JobRequest(
            endpoint=endpoint,
            body=body,
            metadata=metadata,
            priority=self.config.priority,
            max_attempts=self.config.max_attempts,
            custom_id=line.custom_id,
            idempotency_key=f"{batch.id}:{line.number}",
            # past the window, a line still becomes a job, which the reaper then
            # expires: every line ends up in the output or the error file
            expires_at=max(batch.expires_at, self._clock() + 1.0),
            batch_id=batch.id,
        )

    async def _mismatched_lines(self, batch: Batch, file_id: str) -> list[JSON]:
        source = await self.store.get_file(file_id)
        problems: list[JSON] = []
        if source is None:
            return problems
        async for number, raw in lines_of(self.files.content(source)):
            line = parse_batch_line(raw, number)
            if line.url != batch.endpoint:
                problems.append(
                    {
                        "code": "mismatched_endpoint",
                        "message": f"line {number}: url {line.url} does not match the "
                        f"batch's endpoint {batch.endpoint}",
                        "param": "url",
                        "line": number,
                    }
                )
                if len(problems) >= MAX_ERRORS:
                    break
        return problems

    async def _fail(self, batch: Batch, code: str, message: str) -> Batch:
        return await self._fail_with(batch, [{"code": code, "message": message}])

    async def _fail_with(self, batch: Batch, problems: list[JSON]) -> Batch:
        await self.store.cancel_batch_jobs(batch.id, self._clock())  # lines queued so far
        errors = [{"param": None, "line": None, **p} for p in problems]
        return await self._save(
            replace(batch, status=BatchStatus.FAILED, failed_at=self._clock(), errors=errors)
        )

    async def _finalize(self, batch: Batch) -> None:
        """Write the output and error files from the jobs, then the final status."""
        output_id = batch.output_file_id or new_file_id()
        error_id = batch.error_file_id or new_file_id()
        if batch.output_file_id is None:  # remember the ids first: a retry reuses them
            batch = await self._save(
                replace(batch, output_file_id=output_id, error_file_id=error_id)
            )
        for file_id in (output_id, error_id):
            await self.store.delete_file(file_id)  # a half-written earlier attempt
        output = PartWriter(self.store, output_id)
        errors = PartWriter(self.store, error_id)
        counts = {status.value: 0 for status in JobStatus}
        usage = {"input_tokens": 0, "output_tokens": 0}
        unstored: list[str] = []  # Responses lines with store: false, deleted once final
        after = 0
        while jobs := await self.store.batch_jobs(batch.id, after, PAGE):
            for job in jobs:
                counts[job.status.value] += 1
                if responses.is_response(job) and not responses.is_stored(job):
                    unstored.append(job.id)
                if job.status is JobStatus.COMPLETED:
                    await output.write_line(_output_line(job))
                    _add_usage(usage, job.result)
                else:
                    await errors.write_line(_error_line(job))
            after = jobs[-1].seq
        now = self._clock()
        if output.lines:
            await output.finish(batch.owner, OUTPUT_PURPOSE, f"{batch.id}_output.jsonl", now)
        if errors.lines:
            await errors.finish(batch.owner, OUTPUT_PURPOSE, f"{batch.id}_error.jsonl", now)
        total = (batch.request_counts or {}).get("total", sum(counts.values()))
        if batch.cancelling_at is not None:
            final = replace(batch, status=BatchStatus.CANCELLED, cancelled_at=now)
        elif counts[JobStatus.EXPIRED.value]:
            final = replace(batch, status=BatchStatus.EXPIRED, expired_at=now)
        else:
            final = replace(batch, status=BatchStatus.COMPLETED, completed_at=now)
        await self._save(
            replace(
                final,
                output_file_id=output_id if output.lines else None,
                error_file_id=error_id if errors.lines else None,
                request_counts=_request_counts(counts, total),
                usage={
                    **usage,
                    "total_tokens": usage["input_tokens"] + usage["output_tokens"],
                    "input_tokens_details": {"cached_tokens": 0},
                    "output_tokens_details": {"reasoning_tokens": 0},
                },
            )
        )
        for job_id in unstored:  # in the output file now; a retried finalize never gets here
            await self.store.delete_job(job_id)


class _LostClaim(Exception):
    """Another server saved the batch first; this pass leaves it alone."""


def _request_counts(counts: dict[str, int], total: int) -> JSON:
    failed = sum(counts.get(s, 0) for s in ("failed", "expired", "cancelled"))
    return {"total": total, "completed": counts.get("completed", 0), "failed": failed}


def _add_usage(usage: dict[str, int], result: JSON | None) -> None:
    found = (result or {}).get("usage") or {}
    usage["input_tokens"] += int(found.get("prompt_tokens") or 0)
    usage["output_tokens"] += int(found.get("completion_tokens") or 0)


def _output_line(job: Job) -> JSON:
    body = responses.response_object(job) if responses.is_response(job) else job.result
    return {
        "id": "batch_req_" + job.id.removeprefix("job_"),
        "custom_id": job.custom_id,
        "response": {"status_code": 200, "request_id": job.id, "body": body},
        "error": None,
    }


NOT_RUN = {
    JobStatus.CANCELLED: ("batch_cancelled", "the batch was cancelled before this request ran"),
    JobStatus.EXPIRED: (
        "batch_expired",
        "this request could not be run before the batch's completion window ended",
    ),
}


def _error_line(job: Job) -> JSON:
    line: JSON = {
        "id": "batch_req_" + job.id.removeprefix("job_"),
        "custom_id": job.custom_id,
        "response": None,
        "error": None,
    }
    if job.status in NOT_RUN:
        code, message = NOT_RUN[job.status]
        line["error"] = {"code": code, "message": message}
        return line
    error = job.error or {}
    status = error.get("status_code")
    line["response"] = {
        "status_code": status if isinstance(status, int) else 500,
        "request_id": job.id,
        "body": {
            "error": {
                "message": str(error.get("message") or "the request failed"),
                "type": "server_error",
                "param": None,
                "code": str(error.get("code") or "job_failed"),
            }
        },
    }
    return line
