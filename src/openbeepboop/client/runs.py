"""The batch runner: many requests as one run that survives interruption.

    outcome = client.run_batched(["What is 2+2?", ...], name="eval-v3", model="llama3")
    print(outcome.completed, outcome[0].text)

A run submits its requests as jobs in bulk, at most `max_outstanding` unfinished at once
(split among `num_workers` loops that each submit and long-poll their share), records
every step in its state file (`run_state.py`), logs a heartbeat line every `heartbeat_s`
seconds (logger `openbeepboop.client.runs`), and gives up after `max_failures` failed
jobs in one session (the jobs still out are cancelled, `RunAbortedError` carries what
was done). Started again with the same name (or run id) and the same requests, a run
continues from its state file: what is done is not asked again, submitted jobs are
followed, and a request whose submit was sent but not recorded is sent with the same
idempotency key (`<run id>-<index>`), so the server returns the job it already has.
Every request is answered exactly once. `openbeepboop-client submit --file` is a run too.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openbeepboop.client import run_state
from openbeepboop.client._async import BULK_CHUNK, FINAL, LONG_POLL, POLL_CHUNK, Resubmit
from openbeepboop.client.batch_requests import fingerprint, prepare
from openbeepboop.client.config import env_number
from openbeepboop.client.errors import BadRequestError, JobTimeoutError, OpenBeepBoopError
from openbeepboop.client.run_state import (
    RunRecord,
    RunSummary,
    RunWriter,
    event_line,
    find_run,
    list_runs,
    load,
    mark_run,
    output_line,
    outstanding_jobs,
    read_header,
    run_results,
    state_dir,
)
from openbeepboop.client.types import typed_result

if TYPE_CHECKING:
    from openbeepboop.client._async import AsyncClient

__all__ = [
    "RunAbortedError",
    "RunOptions",
    "RunOutcome",
    "RunResult",
    "RunSummary",
    "find_run",
    "iter_batched",
    "list_runs",
    "mark_run",
    "outstanding_jobs",
    "resume_run",
    "run_batched",
    "run_results",
    "state_dir",
]

log = logging.getLogger("openbeepboop.client.runs")
EARLIER_S = 5.0  # a job created this long before the session began is an earlier one's
CANCEL_CONCURRENCY = 16


@dataclass(frozen=True)
class RunOptions:
    """How a run goes. Unset ones come from the environment (`from_env`)."""

    max_outstanding: int = 1000  # MAX_OUTSTANDING: jobs submitted and not final
    num_workers: int = 4  # BATCH_NUM_WORKERS: loops that submit and poll a share each
    heartbeat_s: float = 10.0  # seconds between progress lines
    max_failures: int = 25  # failed jobs in a session before it gives up; 0: never
    rpm: int = 0  # RPM: submits per minute; 0: no limit
    timeout_s: float = 0  # TIMEOUT_S: a job not final this long after its submit is
    #  cancelled and counts as failed; 0: no limit
    max_attempts: int | None = None  # MAX_ATTEMPTS: the job's attempts on the server
    wait_s: float | None = None  # give up waiting after this long (the run stays resumable)

    @classmethod
    def from_env(cls, **given: Any) -> RunOptions:
        """The options given (None: unset), else the environment's, else the defaults;
        a ValueError names a bad variable or argument."""
        env = {
            "max_outstanding": env_number("MAX_OUTSTANDING", cls.max_outstanding, minimum=1),
            "num_workers": env_number("BATCH_NUM_WORKERS", cls.num_workers, minimum=1),
            "rpm": env_number("RPM", cls.rpm),
            "timeout_s": env_number("TIMEOUT_S", cls.timeout_s, integer=False),
            "max_attempts": env_number("MAX_ATTEMPTS", 0, minimum=1) or None,
        }
        values = {**env, **{k: v for k, v in given.items() if v is not None}}
        options = cls(**values)
        options.check()
        return options

    def check(self) -> None:
        least = {"max_outstanding": 1, "num_workers": 1, "heartbeat_s": 0.01}
        least |= {"max_failures": 0, "rpm": 0, "timeout_s": 0, "max_attempts": 1}
        for name, minimum in least.items():
            value = getattr(self, name)
            if value is not None and value < minimum:
                raise ValueError(f"{name} must be at least {minimum:g}, not {value!r}")


@dataclass(frozen=True)
class RunResult:
    """One request's outcome. `body` is the raw OpenAI result, `result` the same as an
    `openai` type; `reused`: answered before this session (its state file, or a job
    the server already had for the request's idempotency key)."""

    index: int
    custom_id: str
    url: str
    job_id: str | None
    status: str  # completed | failed | cancelled | expired
    body: dict[str, Any] | None
    error: dict[str, Any] | None
    reused: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "completed"

    @property
    def result(self) -> Any:
        return None if self.body is None else typed_result(self.url, self.body)

    @property
    def text(self) -> str | None:
        """The first choice's text (chat or completion), if any."""
        choices = (self.body or {}).get("choices") or [{}]
        choice = choices[0] if isinstance(choices[0], dict) else {}
        message = choice.get("message")
        text = message.get("content") if isinstance(message, dict) else choice.get("text")
        return text if isinstance(text, str) else None

    def output_line(self) -> dict[str, Any]:
        """This result in OpenAI's batch output format."""
        done = {"job": self.job_id, "status": self.status, "result": self.body}
        return output_line({**done, "error": self.error}, self.custom_id)


@dataclass
class RunOutcome:
    """A run's results (input order unless asked otherwise) and its summary."""

    run: RunSummary
    results: list[RunResult]

    @property
    def completed(self) -> int:
        return sum(r.ok for r in self.results)

    @property
    def failed(self) -> int:
        return len(self.results) - self.completed

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, index: int) -> RunResult:
        return self.results[index]

    def __iter__(self) -> Iterator[RunResult]:
        return iter(self.results)


class RunAbortedError(OpenBeepBoopError):
    """The run gave up after `max_failures` failed jobs; `outcome` holds what was done
    (input order). Its state file says "aborted"; a new session resumes it."""

    def __init__(self, message: str, *, outcome: RunOutcome) -> None:
        super().__init__(message, code="run_aborted")
        self.outcome = outcome


@dataclass
class _Out:
    """A job submitted and not final yet."""

    index: int
    server: str
    since: float
    reused: bool = False


@dataclass
class Session:
    """One session of a run: submits what is left, follows what is out, records it."""

    client: AsyncClient
    record: RunRecord
    options: RunOptions
    writer: RunWriter
    began: float = field(default_factory=time.time)
    failures: int = 0  # this session's
    finished_now: int = 0
    results: dict[int, RunResult] = field(default_factory=dict)

    @property
    def label(self) -> str:
        name = self.record.header.get("name")
        return f"run {self.record.header['id']}" + (f" ({name})" if name else "")

    @property
    def summary(self) -> RunSummary:
        return self.record.summary()

    def outcome(self, ordered: bool = True) -> RunOutcome:
        results = list(self.results.values())
        return RunOutcome(self.summary, sorted(results, key=_index) if ordered else results)

    async def stream(self) -> AsyncIterator[RunResult]:
        """Every result of the run: earlier ones first, then as they come."""
        record = self.record
        for i in sorted(record.done):
            result = self._result(i, record.done[i], reused=True)
            self.results[i] = result
            yield result
        pending = deque(i for i in sorted(record.requests) if i not in record.done)
        outs = [i for i in pending if i in record.submitted]
        pending = deque(i for i in pending if i not in record.submitted)
        if not pending and not outs:
            self._finish()
            return
        log.info(
            "%s: %d of %d done, %d submitted earlier, %d to submit",
            self.label, len(record.done), len(record.requests), len(outs), len(pending),
        )  # fmt: skip
        queue: asyncio.Queue[RunResult | None] = asyncio.Queue()
        engine = _Engine(self, pending, queue)
        now = time.monotonic()
        for n, i in enumerate(outs):
            sub = record.submitted[i]
            engine.mine[n % len(engine.mine)][sub["job"]] = _Out(i, sub.get("server", ""), now)
        work = asyncio.create_task(engine.work())
        beat = asyncio.create_task(self._heartbeat(engine))
        deadline = None if self.options.wait_s is None else now + self.options.wait_s
        try:
            while True:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    item = await asyncio.wait_for(queue.get(), left)
                except TimeoutError:
                    raise JobTimeoutError(
                        f"{self.label}: {engine.outstanding()} jobs still out after "
                        f"{self.options.wait_s:g} s; run it again to resume"
                    ) from None
                if item is None:
                    break
                yield item
                if engine.aborting:
                    break
            if work.done() and work.exception() is not None:
                raise work.exception()  # type: ignore[misc]
            if engine.aborting:
                await _stop(work)
                await engine.cancel_outstanding()
                raise self._abort()
            self._finish()
        finally:
            await _stop(work, beat)
            self.writer.close()

    def _finish(self) -> None:
        if self.record.status != "finished":
            self._event("finished")
        counts = self.summary
        log.info(
            "%s finished: %d completed, %d failed of %d",
            self.label, counts.done - counts.failed, counts.failed, counts.total,
        )  # fmt: skip

    def _abort(self) -> RunAbortedError:
        reason = f"{self.failures} jobs failed (max_failures={self.options.max_failures})"
        self._event("aborted", reason)
        outcome = self.outcome()
        message = (
            f"{self.label} aborted: {reason}; the jobs still out were cancelled. "
            f"{outcome.completed} completed, {outcome.failed} failed of "
            f"{self.summary.total}; see error.outcome"
        )
        log.error("%s", message)
        return RunAbortedError(message, outcome=outcome)

    def _event(self, event: str, reason: str | None = None) -> None:
        line = event_line(event, reason)
        self.record.events.append(line)
        self.writer.write([line])

    async def _heartbeat(self, engine: _Engine) -> None:
        start = time.monotonic()
        beats = 0
        while True:
            beats += 1
            await asyncio.sleep(
                max(0.0, start + beats * self.options.heartbeat_s - time.monotonic())
            )
            self.writer.sync()
            elapsed = time.monotonic() - start
            rate = self.finished_now / elapsed if elapsed > 0 else 0.0
            record = self.record
            left = len(record.requests) - len(record.done)
            eta = f"{left / rate:.0f} s" if rate > 0 else "?"
            failed = sum(d.get("status") != "completed" for d in record.done.values())
            log.info(
                "%s: %d/%d done, %d failed, %d in flight, %.1f/s, ETA %s",
                self.label, len(record.done), len(record.requests), failed,
                engine.outstanding(), rate, eta,
            )  # fmt: skip

    def record_done(
        self, out: _Out, job: dict[str, Any], error: dict[str, Any] | None
    ) -> RunResult:
        """Note a job's final state (written by the caller, in bulk)."""
        line = {
            "done": out.index,
            "job": job.get("id"),
            "status": job.get("status", "failed"),
            "result": job.get("result"),
            "error": error if error is not None else job.get("error"),
        }
        self.record.done[out.index] = line
        result = self._result(out.index, line, out.reused)
        self.results[out.index] = result
        self.finished_now += 1
        if not result.ok:
            self.failures += 1
        return result

    def _result(self, i: int, done: dict[str, Any], reused: bool) -> RunResult:
        request = self.record.requests[i]
        return RunResult(
            index=i,
            custom_id=str(request["custom_id"]),
            url=str(request["url"]),
            job_id=done.get("job"),
            status=str(done.get("status")),
            body=done.get("result"),
            error=done.get("error"),
            reused=reused,
        )


_Done = tuple[_Out, dict[str, Any], dict[str, Any] | None]  # a job, its last data, our error


class _Engine:
    """The workers of a session: each keeps up to its share of the window out."""

    def __init__(
        self, session: Session, pending: deque[int], queue: asyncio.Queue[RunResult | None]
    ) -> None:
        self.session = session
        self.pending = pending
        self.queue = queue
        options = session.options
        self.window = max(1, options.max_outstanding // options.num_workers)
        self.mine: list[dict[str, _Out]] = [{} for _ in range(options.num_workers)]
        self.limiter = None
        if options.rpm:
            from aiolimiter import AsyncLimiter

            self.limiter = AsyncLimiter(options.rpm, 60)

    @property
    def aborting(self) -> bool:
        limit = self.session.options.max_failures
        return bool(limit) and self.session.failures >= limit

    def outstanding(self) -> int:
        return sum(len(m) for m in self.mine)

    async def work(self) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                for mine in self.mine:
                    group.create_task(self._worker(mine))
        finally:
            self.queue.put_nowait(None)

    async def _worker(self, mine: dict[str, _Out]) -> None:
        while not self.aborting:
            room = min(self.window - len(mine), BULK_CHUNK, len(self.pending))
            if room > 0:
                await self._submit([self.pending.popleft() for _ in range(room)], mine)
            if mine:
                await self._poll(mine)
            elif not self.pending:
                return

    def _spec(self, i: int) -> dict[str, Any]:
        request = self.session.record.requests[i]
        return {
            "url": request["url"],
            "body": request["body"],
            "idempotency_key": request["key"],
            "custom_id": request["custom_id"],
            **request.get("knobs", {}),
        }

    async def _submit(self, indices: list[int], mine: dict[str, _Out]) -> None:
        specs = [self._spec(i) for i in indices]
        if self.limiter is not None:
            for _ in specs:
                await self.limiter.acquire()
        models = {s["body"].get("model") for s in specs}
        model = models.pop() if len(models) == 1 else None
        client = self.session.client
        try:
            url, answer = await client.submit(Resubmit(model, "/v1/jobs", {"jobs": specs}, None))
        except BadRequestError as exc:
            if len(indices) > 1:  # all or none: find the bad ones, one by one
                for i in indices:
                    await self._submit([i], mine)
                return
            error = {"code": exc.code or "invalid_request", "message": exc.message}
            out = _Out(indices[0], "", time.monotonic())
            self._record([(out, {"status": "failed"}, error)])
            return
        now, began = time.monotonic(), self.session.began
        lines = []
        for i, job in zip(indices, answer["data"], strict=True):
            lines.append({"submitted": i, "job": job["id"], "server": url})
            created = job.get("created_at")
            earlier = isinstance(created, int | float) and created < began - EARLIER_S
            mine[job["id"]] = _Out(i, url, now, job.get("status") in FINAL or earlier)
            self.session.record.submitted[i] = lines[-1]
        self.session.writer.write(lines)

    async def _poll(self, mine: dict[str, _Out]) -> None:
        timeout = self.session.options.timeout_s
        hold = LONG_POLL
        if timeout:
            first = min(o.since for o in mine.values())
            hold = min(hold, max(0.05, first + timeout - time.monotonic()))
        servers: dict[str, list[str]] = {}
        for job_id, out in mine.items():
            servers.setdefault(out.server, []).append(job_id)
        if len(servers) > 1:
            hold = min(hold, 1.0)
        client = self.session.client
        for server, ids in servers.items():
            answer = await client.poll(ids[:POLL_CHUNK], hold, True, base=server or None)
            done: list[_Done] = [
                (mine.pop(d["id"]), d, None) for d in answer["data"] if d["id"] in mine
            ]
            gone = [i for i in answer.get("not_found", []) if i in mine]
            error = {"code": "job_not_found", "message": "the server no longer knows the job"}
            done += [(mine.pop(i), {"id": i, "status": "failed"}, error) for i in gone]
            self._record(done)
        if timeout:
            await self._time_out(mine, timeout)

    async def _time_out(self, mine: dict[str, _Out], timeout: float) -> None:
        now = time.monotonic()
        late = [job_id for job_id, out in mine.items() if now - out.since >= timeout]
        if late:
            error = {"code": "timeout", "message": f"no result within {timeout:g} s (TIMEOUT_S)"}
            self._record(await self._cancel(mine, late, error))

    async def _cancel(
        self, mine: dict[str, _Out], ids: list[str], error: dict[str, Any]
    ) -> list[_Done]:
        """Cancel jobs; each one's final state (one that finished meanwhile keeps its
        result and no error)."""
        gate = asyncio.Semaphore(CANCEL_CONCURRENCY)
        client = self.session.client

        async def cancel(job_id: str) -> _Done:
            out = mine.pop(job_id)
            path = f"/v1/jobs/{job_id}/cancel"
            async with gate:
                job = await client.request("POST", path, base=out.server or None)
            return out, job, None if job.get("status") == "completed" else error

        return list(await asyncio.gather(*(cancel(i) for i in ids)))

    async def cancel_outstanding(self) -> None:
        error = {"code": "run_aborted", "message": "cancelled: the run gave up"}
        for mine in self.mine:
            self._record(await self._cancel(mine, list(mine), error))

    def _record(self, done: list[_Done]) -> None:
        if not done:
            return
        results = [self.session.record_done(out, job, error) for out, job, error in done]
        self.session.writer.write([self.session.record.done[r.index] for r in results])
        for result in results:
            self.queue.put_nowait(result)


async def _stop(*tasks: asyncio.Task[Any]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _index(result: RunResult) -> int:
    return result.index


# -- opening a run ---------------------------------------------------------------------


def open_session(
    client: AsyncClient,
    requests: Iterable[Any],
    *,
    name: str | None = None,
    metadata: dict[str, Any] | None = None,
    model: str | None = None,
    run_id: str | None = None,
    resume: bool = True,
    state_dir: Path | None = None,
    input: str | None = None,
    output: str | None = None,
    options: RunOptions,
) -> Session:
    """The run these requests make: the same one continued when its state file is
    found (by `run_id`, or by name, server and requests with `resume`), else a new one."""
    items = prepare(requests, model or client.model)
    digest = fingerprint(items, client.base_url, output)
    directory = state_dir or run_state.state_dir()
    path = directory / f"{run_id}.jsonl" if run_id else None
    if path is None and resume:
        path = _matching(directory, name, digest)
    if path is not None and path.exists():
        record = load(path)
        if record.header.get("fingerprint") != digest:
            raise ValueError(f"run {record.header['id']} was made from other requests")
        return Session(client, record, options, RunWriter(path))
    run_id = run_id or "run_" + uuid.uuid4().hex[:12]
    header = {
        "object": "run",
        "version": 1,
        "id": run_id,
        "name": name,
        "created_at": time.time(),
        "base_url": client.base_url,
        "total": len(items),
        "input": input,
        "output": output,
        "metadata": metadata or {},
        "options": asdict(options),
        "fingerprint": digest,
    }
    record = RunRecord(directory / f"{run_id}.jsonl", header)
    for i, item in enumerate(items):
        knobs = dict(item["knobs"])
        if options.max_attempts is not None:
            knobs.setdefault("max_attempts", options.max_attempts)
        key = item.get("key") or f"{run_id}-{i}"
        record.requests[i] = {"request": i, **item, "knobs": knobs, "key": key}
    writer = RunWriter(record.path)
    writer.write([header, *record.requests.values()])
    return Session(client, record, options, writer)


def _matching(directory: Path, name: str | None, digest: str) -> Path | None:
    """The newest state file of a run with this name and fingerprint."""
    best: tuple[float, Path] | None = None
    for path in directory.glob("run_*.jsonl") if directory.is_dir() else ():
        header = read_header(path)
        if header and header.get("name") == name and header.get("fingerprint") == digest:
            created = float(header.get("created_at") or 0)
            if best is None or created > best[0]:
                best = (created, path)
    return best[1] if best else None


# -- the public entry points -----------------------------------------------------------

RUN_ARGS = ("name", "metadata", "model", "run_id", "resume", "state_dir", "input", "output")


def _split(options: dict[str, Any]) -> tuple[dict[str, Any], RunOptions]:
    run = {k: options.pop(k) for k in RUN_ARGS if k in options}
    return run, RunOptions.from_env(**options)


async def iter_batched(
    client: AsyncClient, requests: Iterable[Any], *, ordered: bool = False, **options: Any
) -> AsyncIterator[RunResult]:
    """The results of a run as they come (`ordered`: in input order); the arguments as
    for `run_batched`."""
    run, settings = _split(options)
    session = open_session(client, requests, options=settings, **run)
    if not ordered:
        async for result in session.stream():
            yield result
        return
    held: dict[int, RunResult] = {}
    upto = 0
    async for result in session.stream():
        held[result.index] = result
        while upto in held:
            yield held.pop(upto)
            upto += 1


async def run_batched(
    client: AsyncClient, requests: Iterable[Any], *, ordered: bool = True, **options: Any
) -> RunOutcome:
    """Run `requests` (chat bodies, batch lines, prompt objects or strings) as one
    resumable run and return every result. Arguments: `name`, `metadata` (kept in the
    state file), `model` (for requests without one), `run_id` (continue this run),
    `resume` (continue a run with the same name and requests; default on), `state_dir`,
    and the `RunOptions` (`max_outstanding`, `num_workers`, `heartbeat_s`,
    `max_failures`, `rpm`, `timeout_s`, `max_attempts`, `wait_s`)."""
    run, settings = _split(options)
    session = open_session(client, requests, options=settings, **run)
    async for _ in session.stream():
        pass
    return session.outcome(ordered)


async def resume_run(client: AsyncClient, run: RunSummary, **options: Any) -> RunOutcome:
    """Continue a run from its state file alone (the requests are in it); the options
    it was started with, unless given."""
    record = load(run.path)
    saved = {
        k: v
        for k, v in (record.header.get("options") or {}).items()
        if k in RunOptions.__dataclass_fields__ and k != "wait_s"  # wait_s: this session's
    }
    settings = RunOptions(**{**saved, **{k: v for k, v in options.items() if v is not None}})
    settings.check()
    if client.base_url != record.header.get("base_url"):
        log.warning(
            "run %s was made on %s; resuming it on %s",
            run.id,
            record.header.get("base_url"),
            client.base_url,
        )
    session = Session(client, record, settings, RunWriter(run.path))
    async for _ in session.stream():
        pass
    return session.outcome()
