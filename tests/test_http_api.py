"""What users rely on, through the in-process HTTP API: submit, list, idempotency, cancel,
the node protocol, leases, expiry, polling, the sync path, and the operations routes."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from openbeepboop.server.http.bodies import parse_json
from tests.conftest import Api

MSGS = [{"role": "user", "content": "hi"}]
FAST_LEASES = {"lease_seconds": 0.3, "reaper_interval_seconds": 0.05, "rate_limit": ""}


def chat(content: str = "hi", model: str = "echo", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def completion(text: str) -> dict[str, Any]:
    return {
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
    }


async def fetch(api: Api, node_id: str, models: list[str] | None = None, **kw: Any) -> list[Any]:
    body = {"node_id": node_id, "models": models or ["echo"], **kw}
    r = await api.http.post("/internal/queue/fetch", json=body, headers=api.h(api.node))
    assert r.status_code == 200, r.text
    return list(r.json()["jobs"])


async def report(api: Api, *results: dict[str, Any]) -> list[Any]:
    r = await api.http.post(
        "/internal/queue/submit", json={"results": list(results)}, headers=api.h(api.node)
    )
    assert r.status_code == 200, r.text
    return list(r.json()["results"])


async def heartbeat(api: Api, node_id: str, lease_ids: list[str]) -> dict[str, Any]:
    r = await api.http.post(
        "/internal/queue/heartbeat",
        json={"node_id": node_id, "lease_ids": lease_ids},
        headers=api.h(api.node),
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


async def get_job(api: Api, job_id: str) -> dict[str, Any]:
    r = await api.http.get(f"/v1/jobs/{job_id}", headers=api.h(api.client))
    assert r.status_code == 200, r.text
    return dict(r.json())


async def wait_status(api: Api, job_id: str, status: str, within: float = 3) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        job = await get_job(api, job_id)
        if job["status"] == status or time.monotonic() > deadline:
            assert job["status"] == status, job
            return job
        await asyncio.sleep(0.02)


async def post_jobs(api: Api, body: Any, key: str | None = None, **headers: str) -> Any:
    return await api.http.post("/v1/jobs", json=body, headers=api.h(key or api.client, **headers))


async def list_ids(api: Api, query: str = "") -> list[str]:
    r = await api.http.get(f"/v1/jobs?limit=1000&{query}", headers=api.h(api.client))
    assert r.status_code == 200, r.text
    return [j["id"] for j in r.json()["data"]]


# -- submitting --------------------------------------------------------------------


async def test_respond_async_gives_202_with_location_and_job(api: Api) -> None:
    r = await api.http.post(
        "/v1/chat/completions", json=chat(), headers=api.h(api.client, Prefer="respond-async")
    )
    assert r.status_code == 202
    job = r.json()
    assert job["id"].startswith("job_")
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert (job["status"], job["queue_position"], job["model"]) == ("queued", 0, "echo")


async def test_queue_positions_follow_priority_then_age(api: Api) -> None:
    old = await api.submit("old")
    new = await api.submit("new")
    urgent = await api.submit("urgent", priority=5)
    positions = [(await get_job(api, j["id"]))["queue_position"] for j in (urgent, old, new)]
    assert positions == [0, 1, 2]


async def test_post_jobs_single_and_bulk(api: Api) -> None:
    r = await post_jobs(api, {"body": chat("one"), "priority": 2, "metadata": {"k": "v"}})
    assert r.status_code == 202
    assert r.json()["status"] == "queued"
    assert (r.json()["priority"], r.json()["metadata"]) == (2, {"k": "v"})
    r = await post_jobs(api, {"jobs": [{"body": chat(str(i))} for i in range(3)]})
    assert r.status_code == 202
    jobs = r.json()["data"]
    assert [j["status"] for j in jobs] == ["queued"] * 3
    assert len(await list_ids(api)) == 4


async def test_bulk_is_all_or_none(api: Api) -> None:
    bad = {"model": "echo"}  # no messages
    r = await post_jobs(api, {"jobs": [{"body": chat()}, {"body": bad}, {"body": chat()}]})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "jobs[1].body.messages"
    assert await list_ids(api) == []


async def test_openai_batch_line_shape_is_accepted(api: Api) -> None:
    line = {"custom_id": "req-1", "method": "POST", "url": "/v1/completions", "body": {}}
    line["body"] = {"model": "echo", "prompt": "say hi"}
    r = await post_jobs(api, line)
    assert r.status_code == 202, r.text
    job = r.json()
    assert (job["custom_id"], job["endpoint"]) == ("req-1", "/v1/completions")
    r = await post_jobs(api, {"jobs": [{**line, "custom_id": "req-2"}]})
    assert r.status_code == 202
    assert r.json()["data"][0]["custom_id"] == "req-2"


# -- listing -----------------------------------------------------------------------


async def test_list_filters_by_status_and_model(api: Api) -> None:
    a = await api.submit(model="echo")
    b = await api.submit(model="other")
    c = await api.submit(model="echo")
    await api.http.post(f"/v1/jobs/{c['id']}/cancel", headers=api.h(api.client))
    assert await list_ids(api, "status=queued") == [b["id"], a["id"]]
    assert await list_ids(api, "model=echo") == [c["id"], a["id"]]
    assert await list_ids(api, "status=cancelled&model=echo") == [c["id"]]
    assert await list_ids(api, "status=completed") == []


async def test_cursor_paging_is_newest_first_without_gaps(api: Api) -> None:
    ids = [(await api.submit(str(i)))["id"] for i in range(7)]
    seen: list[str] = []
    pages: list[tuple[int, bool]] = []
    after = ""
    while True:
        r = await api.http.get(f"/v1/jobs?limit=3{after}", headers=api.h(api.client))
        page = r.json()
        data = [j["id"] for j in page["data"]]
        assert (page["first_id"], page["last_id"]) == (data[0], data[-1])
        seen += data
        pages.append((len(data), page["has_more"]))
        if not page["has_more"]:
            break
        after = f"&after={page['last_id']}"
    assert seen == ids[::-1]
    assert pages == [(3, True), (3, True), (1, False)]


async def test_list_shows_only_own_jobs(api: Api) -> None:
    await api.submit()
    r = await api.http.get("/v1/jobs", headers=api.h(api.other_client))
    assert r.json()["data"] == []


# -- idempotency -------------------------------------------------------------------


async def test_idempotency_key_replays_same_job(api: Api) -> None:
    headers = api.h(api.client, Prefer="respond-async", **{"Idempotency-Key": "k1"})
    first = await api.http.post("/v1/chat/completions", json=chat("a"), headers=headers)
    again = await api.http.post("/v1/chat/completions", json=chat("a"), headers=headers)
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json()["id"] == first.json()["id"]
    changed = await api.http.post("/v1/chat/completions", json=chat("b"), headers=headers)
    assert changed.status_code == 422
    assert changed.headers["x-should-retry"] == "false"
    assert changed.json()["error"]["code"] == "idempotency_key_reused"
    assert await list_ids(api) == [first.json()["id"]]


async def test_idempotency_keys_are_per_api_key(api: Api) -> None:
    body = {"body": chat(), "idempotency_key": "shared"}
    mine = await post_jobs(api, body)
    theirs = await post_jobs(api, body, key=api.other_client)
    assert (mine.status_code, theirs.status_code) == (202, 202)
    assert mine.json()["id"] != theirs.json()["id"]
    r = await post_jobs(api, {"body": chat()}, **{"Idempotency-Key": "shared"})
    assert r.status_code == 200
    assert r.json()["id"] == mine.json()["id"]


# -- cancel ------------------------------------------------------------------------


async def cancel(api: Api, job_id: str) -> dict[str, Any]:
    r = await api.http.post(f"/v1/jobs/{job_id}/cancel", headers=api.h(api.client))
    assert r.status_code == 200, r.text
    return dict(r.json())


async def test_cancel_queued_job(api: Api) -> None:
    job = await api.submit()
    assert (await cancel(api, job["id"]))["status"] == "cancelled"
    node_id = await api.register(["echo"])
    assert await fetch(api, node_id) == []
    assert (await get_job(api, job["id"]))["status"] == "cancelled"


async def test_cancel_in_progress_tells_node_and_fences_its_result(api: Api) -> None:
    job = await api.submit()
    node_id = await api.register(["echo"])
    [leased] = await fetch(api, node_id)
    assert (await cancel(api, job["id"]))["status"] == "cancelled"
    beat = await heartbeat(api, node_id, [leased["lease_id"]])
    assert beat["cancelled"] == [job["id"]]
    assert beat["extended"] == []
    late = {"job_id": job["id"], "lease_id": leased["lease_id"], "result": completion("x")}
    [ack] = await report(api, late)
    assert ack["accepted"] is False
    assert ack["reason"]
    after = await get_job(api, job["id"])
    assert (after["status"], after["result"]) == ("cancelled", None)


async def test_cancel_final_job_returns_it_unchanged(api: Api) -> None:
    job = await api.submit()
    node_id = await api.register(["echo"])
    [leased] = await fetch(api, node_id)
    await report(
        api, {"job_id": job["id"], "lease_id": leased["lease_id"], "result": completion("x")}
    )
    before = await get_job(api, job["id"])
    after = await cancel(api, job["id"])
    assert after["status"] == "completed"
    assert after["result"] == completion("x")
    assert after["completed_at"] == before["completed_at"]


# -- node protocol -----------------------------------------------------------------


async def test_fetch_leases_several_jobs_by_priority_then_age(api: Api) -> None:
    old = await api.submit("old")
    new = await api.submit("new")
    urgent = await api.submit("urgent", priority=9)
    await api.submit("other model", model="other")
    node_id = await api.register(["echo"])
    assert node_id
    leased = await fetch(api, node_id, max_jobs=2)
    assert [j["id"] for j in leased] == [urgent["id"], old["id"]]
    assert leased[0]["lease_id"] != leased[1]["lease_id"]
    assert [j["id"] for j in await fetch(api, node_id, max_jobs=5)] == [new["id"]]
    first = leased[0]
    assert (first["attempt"], first["model"], first["endpoint"]) == (
        1,
        "echo",
        "/v1/chat/completions",
    )
    assert first["request"]["messages"] == [{"role": "user", "content": "urgent"}]
    assert "priority" not in first["request"]
    assert first["lease_expires_at"] > time.time()


async def test_max_jobs_caps_a_fetch(api: Api) -> None:
    for i in range(3):
        await api.submit(str(i))
    node_id = await api.register(["echo"])
    assert len(await fetch(api, node_id, max_jobs=2)) == 2
    assert len(await fetch(api, node_id, max_jobs=2)) == 1


async def test_heartbeat_keeps_lease_alive_and_reports_unknown_as_lost(make_api: Any) -> None:
    async with make_api(**FAST_LEASES) as api:
        job = await api.submit()
        node_id = await api.register(["echo"])
        [leased] = await fetch(api, node_id)
        lease = leased["lease_id"]
        for _ in range(6):  # 0.6 s: twice the lease
            await asyncio.sleep(0.1)
            beat = await heartbeat(api, node_id, [lease, "no-such-lease"])
            assert (beat["extended"], beat["lost"]) == ([lease], ["no-such-lease"])
        assert beat["lease_expires_at"] > leased["lease_expires_at"]
        after = await get_job(api, job["id"])
        assert (after["status"], after["attempts"]) == ("in_progress", 1)
        [ack] = await report(
            api, {"job_id": job["id"], "lease_id": lease, "result": completion("")}
        )
        assert ack["accepted"] is True


async def test_submit_acknowledges_each_result(api: Api) -> None:
    a = await api.submit("a")
    b = await api.submit("b")
    node_id = await api.register(["echo"])
    la, lb = await fetch(api, node_id, max_jobs=2)
    acks = await report(
        api,
        {"job_id": a["id"], "lease_id": la["lease_id"], "result": completion("A")},
        {"job_id": b["id"], "lease_id": "stale", "result": completion("B")},
        {"job_id": "job_unknown", "lease_id": lb["lease_id"], "result": completion("?")},
    )
    assert [(x["job_id"], x["accepted"]) for x in acks] == [
        (a["id"], True),
        (b["id"], False),
        ("job_unknown", False),
    ]
    assert acks[1]["reason"] == "lease_lost"
    assert acks[2]["reason"] == "not_found"
    assert (await get_job(api, a["id"]))["result"] == completion("A")
    jb = await get_job(api, b["id"])
    assert (jb["status"], jb["result"]) == ("in_progress", None)


async def test_retryable_error_requeues_until_attempts_run_out(api: Api) -> None:
    job = await api.submit(max_attempts=2)
    node_id = await api.register(["echo"])
    error = {"message": "backend hiccup", "code": "backend_error", "retryable": True}
    for attempt in (1, 2):
        [leased] = await fetch(api, node_id)
        assert leased["attempt"] == attempt
        [ack] = await report(
            api, {"job_id": job["id"], "lease_id": leased["lease_id"], "error": error}
        )
        assert ack["accepted"] is True
        status = (await get_job(api, job["id"]))["status"]
        assert status == ("queued" if attempt == 1 else "failed")
    final = await get_job(api, job["id"])
    assert final["error"]["message"] == "backend hiccup"
    assert final["attempts"] == 2


async def test_permanent_error_fails_at_once(api: Api) -> None:
    job = await api.submit(max_attempts=5)
    node_id = await api.register(["echo"])
    [leased] = await fetch(api, node_id)
    error = {"message": "context too long", "code": "bad_request", "retryable": False}
    await report(api, {"job_id": job["id"], "lease_id": leased["lease_id"], "error": error})
    final = await get_job(api, job["id"])
    assert (final["status"], final["attempts"]) == ("failed", 1)
    assert final["error"]["code"] == "bad_request"


async def test_released_job_requeues_without_using_an_attempt(api: Api) -> None:
    job = await api.submit(max_attempts=1)
    node_id = await api.register(["echo"])
    [leased] = await fetch(api, node_id)
    release = {"message": "shutting down", "code": "released"}
    await report(api, {"job_id": job["id"], "lease_id": leased["lease_id"], "error": release})
    after = await get_job(api, job["id"])
    assert (after["status"], after["attempts"]) == ("queued", 0)
    [again] = await fetch(api, node_id)
    assert again["attempt"] == 1


async def test_long_poll_fetch_wakes_on_submit(api: Api) -> None:
    node_id = await api.register(["echo"])
    start = time.monotonic()
    waiting = asyncio.create_task(fetch(api, node_id, wait=5))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    job = await api.submit()
    leased = await waiting
    assert [j["id"] for j in leased] == [job["id"]]
    assert time.monotonic() - start < 1.0


async def test_long_poll_fetch_returns_empty_after_wait(api: Api) -> None:
    node_id = await api.register(["echo"])
    await api.submit(model="other")
    start = time.monotonic()
    assert await fetch(api, node_id, wait=0.3) == []
    assert 0.25 <= time.monotonic() - start < 2


# -- leases and expiry -------------------------------------------------------------


async def test_expired_lease_requeues_and_fences_the_old_holder(make_api: Any) -> None:
    async with make_api(**FAST_LEASES) as api:
        job = await api.submit()
        node_id = await api.register(["echo"])
        [first] = await fetch(api, node_id)
        await wait_status(api, job["id"], "queued")
        [second] = await fetch(api, node_id)
        assert second["id"] == job["id"]
        assert second["lease_id"] != first["lease_id"]
        assert second["attempt"] == 2
        stale = {"job_id": job["id"], "lease_id": first["lease_id"], "result": completion("old")}
        [ack] = await report(api, stale)
        assert (ack["accepted"], ack["reason"]) == (False, "lease_lost")
        after = await get_job(api, job["id"])
        assert (after["status"], after["result"]) == ("in_progress", None)


async def test_lease_expiries_exhaust_attempts(make_api: Any) -> None:
    async with make_api(**FAST_LEASES) as api:
        job = await api.submit(max_attempts=2)
        node_id = await api.register(["echo"])
        await fetch(api, node_id)
        await wait_status(api, job["id"], "queued")
        await fetch(api, node_id)
        final = await wait_status(api, job["id"], "failed")
        assert final["error"]["code"] == "attempts_exhausted"
        assert final["attempts"] == 2
        assert await fetch(api, node_id) == []


async def test_queued_job_past_its_time_expires(make_api: Any) -> None:
    async with make_api(**FAST_LEASES) as api:
        by_ttl = await api.submit(ttl_seconds=0.2)
        by_time = await api.submit(expires_at=time.time() + 0.2)
        keeps = await api.submit()
        await wait_status(api, by_ttl["id"], "expired")
        await wait_status(api, by_time["id"], "expired")
        node_id = await api.register(["echo"])
        assert [j["id"] for j in await fetch(api, node_id, max_jobs=5)] == [keeps["id"]]


# -- results/poll ------------------------------------------------------------------


async def test_poll_many_ids_lists_unknown_as_not_found(api: Api) -> None:
    ids = [(await api.submit(str(i)))["id"] for i in range(3)]
    foreign = (await post_jobs(api, {"body": chat()}, key=api.other_client)).json()["id"]
    r = await api.http.post(
        "/v1/results/poll",
        json={"ids": [*ids, "job_nope", foreign]},
        headers=api.h(api.client),
    )
    assert r.status_code == 200
    assert [j["id"] for j in r.json()["data"]] == ids
    assert r.json()["not_found"] == ["job_nope", foreign]


async def test_poll_long_poll_returns_when_one_job_finishes(api: Api) -> None:
    a = await api.submit("a")
    b = await api.submit("b")
    node_id = await api.register(["echo"])
    body = {"ids": [a["id"], b["id"]], "wait": 5}
    start = time.monotonic()
    polling = asyncio.create_task(
        api.http.post("/v1/results/poll", json=body, headers=api.h(api.client))
    )
    await asyncio.sleep(0.1)
    assert not polling.done()
    [leased] = await fetch(api, node_id)
    await report(api, {"job_id": leased["id"], "lease_id": leased["lease_id"], "result": {}})
    r = await polling
    assert time.monotonic() - start < 1.0
    statuses = {j["id"]: j["status"] for j in r.json()["data"]}
    assert statuses == {a["id"]: "completed", b["id"]: "queued"}


# -- the synchronous path ----------------------------------------------------------


async def test_sync_chat_completion_waits_for_a_node(api: Api) -> None:
    node_id = await api.register(["echo"])

    async def node() -> str:
        [leased] = await fetch(api, node_id, wait=5)
        assert leased["request"]["messages"] == MSGS
        result = {"job_id": leased["id"], "lease_id": leased["lease_id"]}
        await report(api, {**result, "result": completion("hello back")})
        return str(leased["id"])

    serving = asyncio.create_task(node())
    r = await api.http.post("/v1/chat/completions", json=chat(), headers=api.h(api.client))
    job_id = await serving
    assert r.status_code == 200, r.text
    assert r.json() == completion("hello back")
    assert r.headers["x-openbeepboop-job-id"] == job_id
    assert (await get_job(api, job_id))["status"] == "completed"


async def test_sync_without_a_node_is_503(api: Api) -> None:
    r = await api.http.post("/v1/chat/completions", json=chat(), headers=api.h(api.client))
    assert r.status_code == 503
    assert int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["code"] == "model_not_available"
    assert await list_ids(api) == []


async def test_stream_true_answers_server_sent_events(api: Api) -> None:
    node_id = await api.register(["echo"])

    async def node() -> None:
        body = {"node_id": node_id, "models": ["echo"], "wait": 5}
        [job] = (
            await api.http.post("/internal/queue/fetch", json=body, headers=api.h(api.node))
        ).json()["jobs"]
        pieces = [
            {"job_id": job["id"], "lease_id": job["lease_id"], "index": i, "delta": d}
            for i, d in enumerate(["Hel", "lo"])
        ]
        r = await api.http.post(
            "/internal/queue/events", json={"events": pieces}, headers=api.h(api.node)
        )
        assert r.json() == {"accepted": 2}
        result = {
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": "Hello"},
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
        }
        await api.http.post(
            "/internal/queue/submit",
            headers=api.h(api.node),
            json={
                "results": [{"job_id": job["id"], "lease_id": job["lease_id"], "result": result}]
            },
        )

    task = asyncio.create_task(node())
    r = await api.http.post(
        "/v1/chat/completions",
        json=chat(stream=True, stream_options={"include_usage": True}),
        headers=api.h(api.client),
    )
    await task
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    lines = [x.removeprefix("data: ") for x in r.text.split("\n\n") if x]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(x) for x in lines[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "Hello"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] == 2
    assert r.headers["x-openbeepboop-job-id"].startswith("job_")


# -- operations --------------------------------------------------------------------


async def test_models_lists_models_of_live_nodes(api: Api) -> None:
    r = await api.http.get("/v1/models", headers=api.h(api.client))
    assert r.json() == {"object": "list", "data": []}
    await api.register(["echo", "tiny"])
    r = await api.http.get("/v1/models", headers=api.h(api.client))
    data = r.json()["data"]
    assert [(m["id"], m["object"]) for m in data] == [("echo", "model"), ("tiny", "model")]
    assert all(isinstance(m["created"], int) and m["owned_by"] for m in data)


async def test_nodes_and_stats(api: Api) -> None:
    node_id = await api.register(["echo"])
    await api.submit()
    await api.submit(model="other")
    r = await api.http.get("/v1/nodes", headers=api.h(api.client))
    assert [n["id"] for n in r.json()["data"]] == [node_id]
    stats = (await api.http.get("/v1/stats", headers=api.h(api.client))).json()
    assert stats["jobs"]["queued"] == 2
    assert stats["models"] == {"echo": {"queued": 1}, "other": {"queued": 1}}
    assert stats["nodes"] == 1


async def test_health_ready_metrics_openapi(api: Api) -> None:
    await api.submit()
    assert (await api.http.get("/health")).json()["status"] == "ok"
    assert (await api.http.get("/ready")).status_code == 200
    metrics = await api.http.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'openbeepboop_jobs{model="echo",status="queued"} 1.0' in metrics.text
    assert "openbeepboop_http_requests_total" in metrics.text
    paths = (await api.http.get("/openapi.json")).json()["paths"]
    for route in ("/v1/jobs", "/v1/chat/completions", "/v1/results/poll", "/internal/queue/fetch"):
        assert route in paths
    assert {"/internal/queue/submit", "/internal/queue/heartbeat"} <= set(paths)


async def test_metrics_count_every_call_by_route_and_status(api: Api) -> None:
    """The same counts whichever path served the calls (the fast lane counts its own)."""
    for _ in range(3):
        await api.submit()
    bad = await api.http.post(
        "/v1/chat/completions", json={"model": "echo"}, headers=api.h(api.client)
    )
    assert bad.status_code == 400
    node_id = await api.register(["echo"])
    fetched = await api.http.post(
        "/internal/queue/fetch",
        json={"node_id": node_id, "models": ["echo"], "max_jobs": 2},
        headers=api.h(api.node),
    )
    assert len(fetched.json()["jobs"]) == 2
    text = (await api.http.get("/metrics")).text
    lines = [
        line for line in text.splitlines() if line.startswith("openbeepboop_http_requests_total")
    ]
    assert 'method="POST",route="/v1/chat/completions",status="202"} 3.0' in "\n".join(lines)
    assert 'method="POST",route="/v1/chat/completions",status="400"} 1.0' in "\n".join(lines)
    assert 'method="POST",route="/internal/queue/fetch",status="200"} 1.0' in "\n".join(lines)
    assert 'openbeepboop_http_request_seconds_count{route="/v1/chat/completions"} 4.0' in text


async def test_admin_creates_and_revokes_keys(api: Api) -> None:
    r = await api.http.post(
        "/v1/admin/keys", json={"role": "client", "name": "alice"}, headers=api.h(api.admin)
    )
    assert r.status_code == 201
    made = r.json()
    assert made["key"].startswith("obb_client_")
    listed = (await api.http.get("/v1/admin/keys", headers=api.h(api.admin))).json()["data"]
    assert made["id"] in [k["id"] for k in listed]
    assert all("key" not in k for k in listed)
    headers = api.h(made["key"], Prefer="respond-async")
    r = await api.http.post("/v1/chat/completions", json=chat(), headers=headers)
    assert r.status_code == 202
    revoke = await api.http.post(f"/v1/admin/keys/{made['id']}/revoke", headers=api.h(api.admin))
    assert revoke.json()["revoked_at"] is not None
    r = await api.http.get("/v1/jobs", headers=api.h(made["key"]))
    assert r.status_code == 401


async def test_admin_routes_need_an_admin_key(api: Api) -> None:
    body = {"role": "admin"}
    for key in (api.client, api.node):
        r = await api.http.post("/v1/admin/keys", json=body, headers=api.h(key))
        assert r.status_code == 403


async def test_a_model_no_node_ever_served_is_404_at_once_while_nodes_are_live(api: Api) -> None:
    await api.register(["echo"])
    for extra in ({}, {"stream": True}):
        body = {"model": "zzz", "messages": [{"role": "user", "content": "hi"}], **extra}
        r = await api.http.post("/v1/chat/completions", json=body, headers=api.h(api.client))
        assert r.status_code == 404, r.text
        error = r.json()["error"]
        assert (error["code"], error["param"]) == ("model_not_found", "model")
        assert "echo" in error["message"]  # says what is served
    assert await list_ids(api) == []


@pytest.mark.parametrize(
    "body",
    [
        b'{"seed": 123456789012345678901234567890}',
        b'{"seed": -9223372036854775809}',
        b'{"seed": 18446744073709551616}',
        b'{"seed": 9223372036854775807, "x": -9223372036854775808}',
        b'{"t": 1e400, "u": -1e400}',
        b'{"t": NaN, "u": Infinity}',
        b'{"s": "\\ud800"}',
        b'{"a": 1, "a": 2}',
        b'{"f": 1.0000000000000002, "g": -0.0, "h": 1E2, "i": 5e-324}',
        '{"s": "é ☃ 𝄞"}'.encode(),
        '{"s": "utf-16"}'.encode("utf-16"),
        b"[1, 2, 3]",
        b"not json",
        b"\xff",
    ],
)
def test_the_fast_lane_reads_a_body_as_starlette_does(body: bytes) -> None:
    """Same values, same types, same refusals as `json.loads` (what FastAPI uses)."""
    try:
        expected: Any = json.loads(body)
    except ValueError as exc:
        with pytest.raises(type(exc)):
            parse_json(body)
        return
    got = parse_json(body)
    assert repr(got) == repr(expected)
