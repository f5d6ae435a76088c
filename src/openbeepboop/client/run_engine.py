"""The batch runner's engine: one session of a run (`Session.stream`), its workers
(`_Engine`), and its heartbeat. `runs.py` opens runs and holds the public API."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from openbeepboop.client.errors import BadRequestError, JobTimeoutError, NotFoundError
from openbeepboop.client.run_state import RunRecord, RunSummary, RunWriter, event_line
from openbeepboop.client.run_types import (
    RunAbortedError,
    RunClient,
    RunOptions,
    RunOutcome,
    RunResult,
)
from openbeepboop.client.wire import BULK_CHUNK, FINAL, LONG_POLL, POLL_CHUNK, Resubmit

log = logging.getLogger("openbeepboop.client.runs")
EARLIER_S = 5.0  # a job created this long before the session began is an earlier one's
CANCEL_CONCURRENCY = 16
GONE = {"code": "job_not_found", "message": "the server no longer knows the job"}


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

    client: RunClient
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

    async def stream(self) -> AsyncGenerator[RunResult, None]:
        """Every result of the run: earlier ones first, then as they come. The state
        file is closed (fsync'd) however it ends."""
        try:
            for i in sorted(self.record.done):
                result = self._result(i, self.record.done[i], reused=True)
                self.results[i] = result
                yield result
            async with aclosing(self._run()) as results:
                async for result in results:
                    yield result
        finally:
            self.writer.close()

    async def _run(self) -> AsyncGenerator[RunResult, None]:
        record = self.record
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
        trusted = await self._trusted_servers(outs)
        for n, i in enumerate(outs):
            sub = record.submitted[i]
            server = str(sub.get("server") or "")
            if server and server not in trusted:
                raise ValueError(
                    f"{self.label}: its state file says job {sub.get('job')} is on {server}, "
                    f"not on {self.client.base_url} (this run's server); if you trust "
                    f"{server}, resume with --base-url {server} (base_url=)"
                )
            engine.mine[n % len(engine.mine)][sub["job"]] = _Out(i, server, now)
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
                await engine.settle()
                raise self._abort(await engine.withdraw_outstanding())
            self._finish()
        finally:
            await _stop(work, beat)
            await engine.settle()

    async def _trusted_servers(self, outs: list[int]) -> set[str]:
        """The servers a state file may send this run's key to: the client's own, and
        in a swarm the members it lists (a planted state file names no other)."""
        trusted = {self.client.base_url}
        named = {str(self.record.submitted[i].get("server") or "") for i in outs}
        if named - trusted - {""}:
            trusted.update(await self.client.candidates(None))
        return trusted

    def _finish(self) -> None:
        if self.record.status != "finished":
            self._event("finished")
        counts = self.summary
        log.info(
            "%s finished: %d completed, %d failed of %d",
            self.label, counts.done - counts.failed, counts.failed, counts.total,
        )  # fmt: skip

    def _abort(self, withdrawn: int) -> RunAbortedError:
        reason = f"{self.failures} jobs failed (max_failures={self.options.max_failures})"
        self._event("aborted", reason)
        outcome = self.outcome()
        message = (
            f"{self.label} aborted: {reason}; the {withdrawn} jobs still out were cancelled "
            "(a resume runs them again). "
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

    def withdraw(self, outs: list[tuple[_Out, str]]) -> None:
        """Note jobs cancelled because the run gave up: not done, so a resume submits
        their requests again (under a new idempotency key, see `key`)."""
        lines = []
        for out, job_id in outs:
            lines.append({"withdrawn": out.index, "job": job_id})
            self.record.withdraw(lines[-1])
        self.writer.write(lines)

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
        workers = min(options.num_workers, options.max_outstanding)
        share, extra = divmod(options.max_outstanding, workers)  # the window, shared out
        self.windows = [min(POLL_CHUNK, share + (n < extra)) for n in range(workers)]
        self.mine: list[dict[str, _Out]] = [{} for _ in range(workers)]
        self.submits: set[asyncio.Task[None]] = set()
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

    async def settle(self) -> None:
        """Let the submits under way end and be recorded (their jobs exist now)."""
        if self.submits:
            await asyncio.gather(*self.submits, return_exceptions=True)

    async def work(self) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                for mine, window in zip(self.mine, self.windows, strict=True):
                    group.create_task(self._worker(mine, window))
        except ExceptionGroup as failed:  # the first worker's error is the run's
            raise failed.exceptions[0] from None
        finally:
            self.queue.put_nowait(None)

    async def _worker(self, mine: dict[str, _Out], window: int) -> None:
        while not self.aborting:
            room = min(window - len(mine), BULK_CHUNK, len(self.pending))
            if room > 0 and self.limiter is not None:
                if mine and not self.limiter.has_capacity():
                    room = 0  # collect what is out rather than wait for the limiter
                else:  # the tokens first, unshielded: a run stopped meanwhile sent nothing
                    room = min(await self._grant(room), len(self.pending))
            if room > 0:
                # shielded: a run stopped meanwhile still records the jobs it created
                batch = [self.pending.popleft() for _ in range(room)]
                self.submits = {t for t in self.submits if not t.done()}
                self.submits.add(submit := asyncio.create_task(self._submit(batch, mine)))
                await asyncio.shield(submit)
            if mine:
                await self._poll(mine)
            elif not self.pending:
                return

    async def _grant(self, most: int) -> int:
        """Submits the limiter allows: one (waiting for it), then up to `most` if it
        has them now."""
        assert self.limiter is not None
        await self.limiter.acquire()
        granted = 1
        while granted < most and self.limiter.has_capacity():
            await self.limiter.acquire()
            granted += 1
        return granted

    def _spec(self, i: int) -> dict[str, Any]:
        record = self.session.record
        request = record.requests[i]
        return {
            "url": request["url"],
            "body": request["body"],
            "idempotency_key": record.key(i),
            "custom_id": request["custom_id"],
            **request.get("knobs", {}),
        }

    async def _submit(self, indices: list[int], mine: dict[str, _Out]) -> None:
        specs = [self._spec(i) for i in indices]
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
            # a final job was an earlier run's, unless the response cache answered it now
            reused = job.get("status") in FINAL and not job.get("cached")
            mine[job["id"]] = _Out(i, url, now, reused or earlier)
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
            done += [(mine.pop(i), {"id": i, "status": "failed"}, GONE) for i in gone]
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
            try:
                async with gate:
                    job = await client.request("POST", path, base=out.server or None)
            except NotFoundError:
                return out, {"id": job_id, "status": "failed"}, GONE
            return out, job, error if job.get("status") == "cancelled" else None

        return list(await asyncio.gather(*(cancel(i) for i in ids)))

    async def withdraw_outstanding(self) -> int:
        """Cancel the jobs still out as the run gives up. Those cancelled are withdrawn
        (not done: a resume runs them again); one that ended meanwhile is recorded as
        it ended. How many were withdrawn."""
        error = {"code": "run_aborted", "message": "cancelled: the run gave up"}
        withdrawn = []
        for mine in self.mine:
            ended = []
            for out, job, err in await self._cancel(mine, list(mine), error):
                if err is error:
                    withdrawn.append((out, str(job.get("id"))))
                else:
                    ended.append((out, job, err))
            self._record(ended)
        self.session.withdraw(withdrawn)
        return len(withdrawn)

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
