"""`/internal/queue/watch` in process: the long-poll a node keeps open over its running
jobs answers the moment one of them is cancelled, and only then: a job that finishes,
a cancel under another lease or the end of `wait` answer nothing."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tests.conftest import Api


async def fetch(api: Api, node_id: str, wait: float = 0) -> list[dict[str, Any]]:
    body = {"node_id": node_id, "models": ["echo"], "max_jobs": 10, "wait": wait}
    r = await api.http.post("/internal/queue/fetch", json=body, headers=api.h(api.node))
    assert r.status_code == 200, r.text
    return list(r.json()["jobs"])


async def watch(api: Api, node_id: str, leased: list[dict[str, Any]], wait: float) -> Any:
    leases = [{"job_id": j["id"], "lease_id": j["lease_id"]} for j in leased]
    body = {"node_id": node_id, "leases": leases, "wait": wait}
    r = await api.http.post("/internal/queue/watch", json=body, headers=api.h(api.node))
    assert r.status_code == 200, r.text
    return r.json()


async def cancel(api: Api, job_id: str) -> None:
    r = await api.http.post(f"/v1/jobs/{job_id}/cancel", headers=api.h(api.client))
    assert r.status_code == 200, r.text


async def test_the_watch_answers_the_moment_a_job_is_cancelled(api: Api) -> None:
    first, second = await api.submit("one"), await api.submit("two")
    node_id = await api.register(["echo"])
    leased = await fetch(api, node_id)
    waiting = asyncio.create_task(watch(api, node_id, leased, wait=30))
    await asyncio.sleep(0.2)
    assert not waiting.done()  # nothing cancelled yet: it waits
    started = time.monotonic()
    await cancel(api, second["id"])
    answer = await asyncio.wait_for(waiting, 5)
    assert time.monotonic() - started < 0.5
    assert answer == {"cancelled": [second["id"]]}
    assert first["id"] != second["id"]


async def test_a_finished_job_or_a_foreign_lease_is_no_answer(api: Api) -> None:
    done, other = await api.submit("done"), await api.submit("other")
    node_id = await api.register(["echo"])
    leased = {j["id"]: j for j in await fetch(api, node_id)}
    result = {"id": "x", "object": "chat.completion", "choices": []}
    submit = {"job_id": done["id"], "lease_id": leased[done["id"]]["lease_id"], "result": result}
    foreign = [{**leased[other["id"]], "lease_id": "lease_of_someone_else"}]
    waiting = asyncio.create_task(watch(api, node_id, [leased[done["id"]], *foreign], wait=0.5))
    await asyncio.sleep(0.1)
    body = {"node_id": node_id, "results": [submit]}
    r = await api.http.post("/internal/queue/submit", json=body, headers=api.h(api.node))
    assert r.json()["results"][0]["accepted"] is True
    await cancel(api, other["id"])  # cancelled, but not under the lease watched
    started = time.monotonic()
    assert await asyncio.wait_for(waiting, 5) == {"cancelled": []}
    assert time.monotonic() - started > 0.2  # it waited on to the end of `wait`


async def test_the_watch_needs_a_registered_node(api: Api) -> None:
    body = {"node_id": "node_unknown", "leases": [], "wait": 0}
    r = await api.http.post("/internal/queue/watch", json=body, headers=api.h(api.node))
    assert r.status_code == 404 and r.json()["error"]["code"] == "node_not_registered"
    r = await api.http.post("/internal/queue/watch", json=body, headers=api.h(api.client))
    assert r.status_code in (401, 403)
