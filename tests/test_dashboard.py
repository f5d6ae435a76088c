"""The dashboard's shared sampler (core/dashboard.py): one store read per step for every
watcher, none once they leave, and the counts of finished jobs per model."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

from openbeepboop.server.core.dashboard import Dashboard
from openbeepboop.server.core.queue import Queue, QueueConfig
from openbeepboop.server.models import Job, NewJob, NodeResult
from openbeepboop.server.store.sqlite import SqliteStore


async def test_one_sampler_serves_every_watcher_and_stops_when_they_leave(tmp_path: Path) -> None:
    """Ten watchers cost one store read per step, not ten; no watcher, no reads."""

    store = SqliteStore(tmp_path / "db.sqlite3")
    await store.open()
    reads = {"stats": 0}
    real_stats = store.stats

    async def counted() -> dict[str, dict[str, int]]:
        reads["stats"] += 1
        return await real_stats()

    store.stats = counted  # type: ignore[method-assign]
    dashboard = Dashboard(Queue(store, QueueConfig()), step=0.05, lag=0.0)

    async def watch(n: int) -> list[int]:
        ticks = []
        async for snap in dashboard.watch():
            ticks.append(snap.tick)
            if len(ticks) == n:
                return ticks
        return ticks

    try:
        seen = await asyncio.gather(*(watch(6) for _ in range(10)))
        assert all(len(t) == 6 for t in seen)
        assert reads["stats"] <= 8, reads  # ~6 samples for 10 watchers
        await asyncio.sleep(0.2)  # the last watcher left: the sampler stops
        before = reads["stats"]
        await asyncio.sleep(0.3)
        assert reads["stats"] == before and dashboard.watchers == 0
        assert len(dashboard.history()["depth"][0]) == reads["stats"]
    finally:
        await dashboard.close()
        await store.close()


async def test_a_snapshot_counts_per_model_what_finished_in_the_last_five_minutes(
    tmp_path: Path,
) -> None:
    store = SqliteStore(tmp_path / "db.sqlite3")
    await store.open()
    now = [1_000_000.0]
    queue = Queue(store, QueueConfig())
    dashboard = Dashboard(queue, step=2.0, clock=lambda: now[0])
    try:
        jobs = [new_job(model) for model in ("a", "a", "a", "b", "b")]
        await store.submit_jobs(jobs, now[0] - 400)
        leased = [  # a, a, a and b (one claim of both could take them in another order)
            *await store.fetch_jobs("n1", ["a"], 3, 60, now[0] - 400),
            *await store.fetch_jobs("n1", ["b"], 1, 60, now[0] - 400),
        ]
        old, *recent = leased  # one finished 6 minutes ago: out of the window
        await store.submit_results([done(old)], now[0] - 360)
        await store.submit_results([done(j, ok=j.model == "a") for j in recent], now[0] - 30)
        snap = await dashboard.current()
        lines = {line.model: line for line in snap.lines}
        assert (lines["a"].completed, lines["a"].failed, lines["a"].queued) == (2, 0, 0)
        assert (lines["b"].completed, lines["b"].failed, lines["b"].queued) == (0, 1, 1)
        assert (snap.total.completed, snap.total.failed, snap.total.queued) == (2, 1, 1)
        series = dashboard.history()["throughput"]
        assert sum(series[1]) * dashboard.step == 3  # the hour's chart has all three
        assert sum(series[2]) * dashboard.step == 1
    finally:
        await store.close()


def new_job(model: str) -> NewJob:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return NewJob("k", "/v1/chat/completions", model, body, request_hash=secrets.token_hex(4))


def done(job: Job, ok: bool = True) -> NodeResult:
    if ok:
        return NodeResult(job.id, job.lease_id, {"object": "chat.completion"})
    return NodeResult(job.id, job.lease_id, error={"message": "no"}, retryable=False)
