"""A Hypothesis state machine drives the SQLite store through random lifecycles and
checks it against a small model: each job in exactly one state, at most one live lease,
attempts never above max_attempts, nothing leaves a final state, stale leases never win,
the writer's counters of queued jobs stay exact.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from openbeepboop.server.models import FINAL_STATUSES, JobStatus, NewJob, NodeResult
from openbeepboop.server.store.sqlite import SqliteStore

LEASE = 10.0
RESULT = {"object": "chat.completion", "choices": []}


@dataclass
class Expected:
    """The model's view of one job."""

    id: str
    seq: int
    priority: int
    max_attempts: int
    expires_at: float | None
    status: JobStatus = JobStatus.QUEUED
    attempts: int = 0
    lease: str | None = None
    lease_expires_at: float | None = None


class Lifecycle(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp())
        self.loop = asyncio.new_event_loop()
        self.store = SqliteStore(self.dir / "q.db")
        self.run(self.store.open())
        self.now = 1000.0
        self.jobs: dict[str, Expected] = {}
        self.old_leases: list[tuple[str, str]] = []
        self.finals: dict[str, JobStatus] = {}

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        self.run(self.store.close())
        self.loop.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _pick(self, data: st.DataObject, status: JobStatus | None = None) -> Expected | None:
        pool = [j for j in self.jobs.values() if status is None or j.status is status]
        return data.draw(st.sampled_from(pool)) if pool else None

    def _retire_lease(self, job: Expected) -> None:
        if job.lease is not None:
            self.old_leases.append((job.id, job.lease))
        job.lease = None
        job.lease_expires_at = None

    # -- rules ---------------------------------------------------------------------

    @rule(
        priorities=st.lists(st.integers(-2, 2), min_size=1, max_size=4),
        max_attempts=st.integers(1, 3),
        ttl=st.none() | st.floats(1, 40),
        positions=st.booleans(),
    )
    def submit(
        self, priorities: list[int], max_attempts: int, ttl: float | None, positions: bool
    ) -> None:
        expires = None if ttl is None else self.now + ttl
        new = [
            NewJob(
                "owner",
                "/v1/chat/completions",
                "m",
                {"model": "m"},
                "h",
                p,
                max_attempts,
                expires_at=expires,
            )
            for p in priorities
        ]
        for outcome in self.run(self.store.submit_jobs(new, self.now, positions=positions)):
            j = outcome.job
            self.jobs[j.id] = Expected(j.id, j.seq, j.priority, j.max_attempts, expires)
            if positions and len(new) == 1:  # where it stands: what queue_position says
                assert outcome.position == self.run(self.store.queue_position(j))

    @rule(n=st.integers(1, 4))
    def fetch(self, n: int) -> None:
        ready = [
            j
            for j in self.jobs.values()
            if j.status is JobStatus.QUEUED and (j.expires_at is None or j.expires_at > self.now)
        ]
        ready.sort(key=lambda j: (-j.priority, j.seq))
        got = self.run(self.store.fetch_jobs("node", ["m"], n, LEASE, self.now))
        assert [j.id for j in got] == [j.id for j in ready[:n]]
        for leased in got:
            job = self.jobs[leased.id]
            job.status = JobStatus.IN_PROGRESS
            job.attempts += 1
            job.lease = leased.lease_id
            job.lease_expires_at = self.now + LEASE

    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        job = self._pick(data, JobStatus.IN_PROGRESS)
        if job is None:
            return
        r = NodeResult(job.id, job.lease or "", RESULT)
        [out] = self.run(self.store.submit_results([r], self.now))
        assert out.accepted
        job.status = JobStatus.COMPLETED

    @rule(data=st.data(), retryable=st.booleans(), released=st.booleans())
    def report_error(self, data: st.DataObject, retryable: bool, released: bool) -> None:
        job = self._pick(data, JobStatus.IN_PROGRESS)
        if job is None:
            return
        error = {"code": "released" if released else "boom", "message": "x"}
        r = NodeResult(job.id, job.lease or "", error=error, retryable=retryable, released=released)
        [out] = self.run(self.store.submit_results([r], self.now))
        assert out.accepted
        if released:
            job.status, job.attempts = JobStatus.QUEUED, job.attempts - 1
            self._retire_lease(job)
        elif retryable and job.attempts < job.max_attempts:
            job.status = JobStatus.QUEUED
            self._retire_lease(job)
        else:
            job.status = JobStatus.FAILED

    @precondition(lambda self: bool(self.old_leases))
    @rule(data=st.data())
    def stale_result_is_refused(self, data: st.DataObject) -> None:
        job_id, lease = data.draw(st.sampled_from(self.old_leases))
        if self.jobs[job_id].lease == lease:
            return
        [out] = self.run(self.store.submit_results([NodeResult(job_id, lease, RESULT)], self.now))
        assert not out.accepted

    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        job = self._pick(data)
        if job is None:
            return
        after = self.run(self.store.cancel_job(job.id, self.now))
        if job.status not in FINAL_STATUSES:
            job.status = JobStatus.CANCELLED
        assert after.status is job.status

    @rule(data=st.data())
    def heartbeat(self, data: st.DataObject) -> None:
        job = self._pick(data, JobStatus.IN_PROGRESS)
        if job is None:
            return
        out = self.run(self.store.heartbeat("node", [job.lease or ""], LEASE, self.now))
        assert out.extended == [job.lease]
        job.lease_expires_at = self.now + LEASE

    @rule(seconds=st.floats(0, 25))
    def time_passes_and_reaper_runs(self, seconds: float) -> None:
        self.now += seconds
        self.run(self.store.reap(self.now))
        for job in self.jobs.values():
            expired = job.expires_at is not None and job.expires_at <= self.now
            if job.status is JobStatus.IN_PROGRESS and (job.lease_expires_at or 0) <= self.now:
                if expired:
                    job.status = JobStatus.EXPIRED
                elif job.attempts >= job.max_attempts:
                    job.status = JobStatus.FAILED
                else:
                    job.status = JobStatus.QUEUED
                self._retire_lease(job)
            elif job.status is JobStatus.QUEUED and expired:
                job.status = JobStatus.EXPIRED

    @rule()
    def restart(self) -> None:
        """The server restarts: nothing is lost, the writer's counters are rebuilt."""
        self.run(self.store.close())
        self.store = SqliteStore(self.dir / "q.db")
        self.run(self.store.open())

    # -- invariants ----------------------------------------------------------------

    @invariant()
    def store_matches_model(self) -> None:
        stored = {j.id: j for j in self.run(self.store.get_jobs(list(self.jobs)))}
        assert stored.keys() == self.jobs.keys()
        for job_id, want in self.jobs.items():
            got = stored[job_id]
            assert got.status is want.status, (job_id, got.status, want.status)
            assert got.attempts == want.attempts
            assert got.attempts <= got.max_attempts
            if got.status is JobStatus.IN_PROGRESS:
                assert got.lease_id == want.lease
                assert got.lease_expires_at == want.lease_expires_at

    @invariant()
    def final_states_are_final(self) -> None:
        for job in self.run(self.store.get_jobs(list(self.jobs))):
            if job.id in self.finals:
                assert job.status is self.finals[job.id]
                assert job.finished_at is not None
            elif job.status in FINAL_STATUSES:
                self.finals[job.id] = job.status

    @invariant()
    def at_most_one_live_lease_per_job(self) -> None:
        live = [
            j
            for j in self.run(self.store.get_jobs(list(self.jobs)))
            if j.status is JobStatus.IN_PROGRESS
        ]
        assert len({j.lease_id for j in live}) == len(live)
        assert all(j.lease_id for j in live)

    @invariant()
    def queued_counters_are_exact(self) -> None:
        """The writer's counters of queued jobs (new jobs' positions come from them)
        agree with the jobs, through every transition."""
        counted: dict[int, int] = {}
        for job in self.jobs.values():
            if job.status is JobStatus.QUEUED:
                counted[job.priority] = counted.get(job.priority, 0) + 1

        async def kept() -> list[tuple[int, int]]:
            sql = "SELECT priority, queued FROM temp.queued_counts WHERE queued != 0"
            rows: list[tuple[int, int]] = await self.store._writer.run(
                lambda c: c.execute(sql).fetchall()
            )
            return rows

        assert dict(self.run(kept())) == counted

    @invariant()
    def job_counters_are_exact(self) -> None:
        """The counters /v1/stats and /metrics read (kept by triggers) agree with the
        jobs, through every transition."""
        counted: dict[str, int] = {}
        for job in self.jobs.values():
            counted[job.status.value] = counted.get(job.status.value, 0) + 1
        assert self.run(self.store.stats()) == ({"m": counted} if counted else {})


TestLifecycle = Lifecycle.TestCase
TestLifecycle.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
