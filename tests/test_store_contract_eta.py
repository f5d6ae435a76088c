"""The store contract of `recent_runs` (a model's measured pace, core/eta.py), on every
store of tests/test_store_contract.py (its fixtures)."""

from __future__ import annotations

from openbeepboop.server.models import NodeResult
from openbeepboop.server.store.base import Store
from tests.test_store_contract import RESULT, T0, fetch, new_job, store, submit

__all__ = ["store"]  # the fixture, run on every store


async def test_recent_runs_sums_the_runs_that_ended_in_the_window_per_model(
    store: Store,
) -> None:
    await submit(store, *[new_job(model="m") for _ in range(4)], new_job(model="x"))
    first = await fetch(store, ["m"], n=2, now=T0)
    second = await fetch(store, ["m", "x"], n=3, now=T0 + 10)
    m_late = next(j for j in second if j.model == "m")
    x_job = next(j for j in second if j.model == "x")
    await store.submit_results([NodeResult(first[0].id, first[0].lease_id, RESULT)], T0 + 2)
    failed = NodeResult(first[1].id, first[1].lease_id, error={"m": "no"}, retryable=False)
    await store.submit_results([failed], T0 + 4)
    await store.submit_results([NodeResult(m_late.id, m_late.lease_id, RESULT)], T0 + 13)
    await store.submit_results([NodeResult(x_job.id, x_job.lease_id, RESULT)], T0 + 11)
    # the fourth job of m still runs; a cancelled run is not counted

    runs = {r.model: r for r in await store.recent_runs(T0 + 1)}
    assert set(runs) == {"m", "x"}
    m = runs["m"]
    assert (m.count, m.busy_seconds, m.first_started, m.last_finished) == (3, 9.0, T0, T0 + 13)
    x = runs["x"]
    assert (x.count, x.busy_seconds, x.first_started, x.last_finished) == (1, 1.0, T0 + 10, T0 + 11)
    assert [r.model for r in await store.recent_runs(T0 + 12)] == ["m"]  # finished_at >= since
    assert await store.recent_runs(T0 + 14) == []


async def test_recent_runs_leave_out_cancelled_and_cached_jobs(store: Store) -> None:
    cached = new_job(model="m", cached_result=RESULT)
    await submit(store, new_job(model="m"), cached, now=T0)
    [running] = await fetch(store, ["m"], now=T0)
    await store.cancel_job(running.id, T0 + 1)
    assert await store.recent_runs(T0 - 10) == []
