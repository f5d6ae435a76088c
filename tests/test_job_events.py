"""`GET /v1/jobs/{id}/events`: the rbee event vocabulary over SSE, live from a real server
and a real echo node that streams word by word; many subscribers, a late one, and
resuming with `Last-Event-ID`."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from openbeepboop.server.http.state import app_state
from tests.conftest import Api, ServerProcess
from tests.nodes import (
    auth,
    echo_model,
    served,
)

WORDS = [f"w{i}" for i in range(30)]
PROMPT = " ".join(WORDS)


def parse_sse(text: str) -> list[tuple[int | None, Any]]:
    """(id, data) of each SSE message; data is parsed JSON, or the string `[DONE]`."""
    out: list[tuple[int | None, Any]] = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        event_id, data = None, None
        for line in block.split("\n"):
            if line.startswith("id: "):
                event_id = int(line[4:])
            elif line.startswith("data: "):
                raw = line[6:]
                data = raw if raw == "[DONE]" else json.loads(raw)
        out.append((event_id, data))
    return out


# -- in process: the vocabulary -----------------------------------------------------


async def test_events_of_a_job_from_queued_to_end(api: Api) -> None:
    node_id = await api.register(["echo"])
    job = await api.submit("hello there")

    async def read() -> str:
        r = await api.http.get(f"/v1/jobs/{job['id']}/events", headers=api.h(api.client))
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return r.text

    reader = asyncio.create_task(read())
    await asyncio.sleep(0.2)
    body = {"node_id": node_id, "models": ["echo"], "wait": 5}
    fetched = await api.http.post("/internal/queue/fetch", json=body, headers=api.h(api.node))
    [leased] = fetched.json()["jobs"]
    lease = {"job_id": leased["id"], "lease_id": leased["lease_id"]}
    pieces = [{**lease, "index": i, "delta": d} for i, d in enumerate(["hello", " there"])]
    await api.http.post("/internal/queue/events", json={"events": pieces}, headers=api.h(api.node))
    result = {
        "object": "chat.completion",
        "choices": [{"index": 0, "finish_reason": "length", "message": {"content": "hello there"}}],
        "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4},
    }
    r = await api.http.post(
        "/internal/queue/submit",
        json={"results": [{**lease, "result": result}]},
        headers=api.h(api.node),
    )
    assert r.status_code == 200
    events = parse_sse(await asyncio.wait_for(reader, 10))
    types = [d["type"] if isinstance(d, dict) else d for _, d in events]
    assert types == ["queued", "started", "token", "token", "end", "[DONE]"]
    assert [i for i, _ in events] == [0, 1, 2, 3, 4, None]
    assert events[0][1] == {"type": "queued", "job_id": job["id"], "position": 0}
    started = events[1][1]
    assert (started["job_id"], started["model"], started["node_id"]) == (job["id"], "echo", node_id)
    assert isinstance(started["started_at"], int)
    assert [(d["t"], d["i"]) for _, d in events[2:4]] == [("hello", 0), (" there", 1)]
    end = events[4][1]
    assert (end["tokens_out"], end["stop_reason"]) == (2, "MAX_TOKENS")
    assert end["decode_time_ms"] >= 0

    # After the end: the whole story again, and resuming after the second token.
    again = await api.http.get(f"/v1/jobs/{job['id']}/events", headers=api.h(api.client))
    assert [d["type"] for _, d in parse_sse(again.text)[:-1]] == [
        "started",
        "token",
        "token",
        "end",
    ]
    resumed = await api.http.get(
        f"/v1/jobs/{job['id']}/events", headers=api.h(api.client, **{"Last-Event-ID": "3"})
    )
    assert [i for i, _ in parse_sse(resumed.text)] == [4, None]


async def test_events_of_cancelled_and_failed_jobs(api: Api) -> None:
    node_id = await api.register(["echo"])
    job = await api.submit("never runs")
    await api.http.post(f"/v1/jobs/{job['id']}/cancel", headers=api.h(api.client))
    r = await api.http.get(f"/v1/jobs/{job['id']}/events", headers=api.h(api.client))
    assert [d for _, d in parse_sse(r.text)] == [
        {"type": "cancelled", "job_id": job["id"]},
        "[DONE]",
    ]

    failing = await api.submit("fails", max_attempts=1)
    body = {"node_id": node_id, "models": ["echo"], "wait": 5}
    [leased] = (
        await api.http.post("/internal/queue/fetch", json=body, headers=api.h(api.node))
    ).json()["jobs"]
    error = {"message": "model crashed", "code": "backend_error"}
    await api.http.post(
        "/internal/queue/submit",
        json={
            "results": [{"job_id": leased["id"], "lease_id": leased["lease_id"], "error": error}]
        },
        headers=api.h(api.node),
    )
    r = await api.http.get(f"/v1/jobs/{failing['id']}/events", headers=api.h(api.client))
    events = [d for _, d in parse_sse(r.text)]
    assert events[0]["type"] == "started"
    assert events[-2] == {
        "type": "failed",
        "job_id": failing["id"],
        "code": "backend_error",
        "message": "model crashed",
    }


async def test_events_bad_requests(api: Api) -> None:
    r = await api.http.get("/v1/jobs/job_nope/events", headers=api.h(api.client))
    assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found"
    job = await api.submit()
    r = await api.http.get(
        f"/v1/jobs/{job['id']}/events", headers=api.h(api.client, **{"Last-Event-ID": "abc"})
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "Last-Event-ID"
    r = await api.http.get(f"/v1/jobs/{job['id']}/events", headers=api.h(api.other_client))
    assert r.status_code == 404
    r = await api.http.get(f"/v1/jobs/{job['id']}/events")
    assert r.status_code == 401


# -- real processes: many subscribers, a late one, resume --------------------------


@pytest.fixture(scope="module")
def slow_echo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server and echo node for the module's tests: each follows only its own jobs."""
    models = [echo_model(token_delay_ms=100)]
    with served(tmp_path_factory.mktemp("job-events"), models) as server:
        yield server


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def submit(server: ServerProcess) -> str:
    r = httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": "echo", "messages": [{"role": "user", "content": PROMPT}]},
        headers=auth(server.keys["client_key"], Prefer="respond-async"),
    )
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


async def subscribe(
    http: httpx.AsyncClient, server: ServerProcess, job_id: str, **headers: str
) -> list[tuple[int | None, Any]]:
    url = f"{server.url}/v1/jobs/{job_id}/events"
    async with http.stream("GET", url, headers=auth(server.keys["client_key"], **headers)) as r:
        assert r.status_code == 200
        return parse_sse((await r.aread()).decode())


def tokens(events: list[tuple[int | None, Any]]) -> str:
    return "".join(d["t"] for _, d in events if isinstance(d, dict) and d["type"] == "token")


def test_hundred_subscribers_and_a_late_one_see_the_whole_text(slow_echo: ServerProcess) -> None:
    server = slow_echo
    job_id = submit(server)
    pid = server.proc.pid  # type: ignore[union-attr]

    async def main() -> tuple[list[Any], list[Any], int, int]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            before = rss_kib(pid)
            early = [asyncio.create_task(subscribe(http, server, job_id)) for _ in range(100)]
            await asyncio.sleep(1.5)  # about half of the words are out
            during = rss_kib(pid)
            late = await subscribe(http, server, job_id)
            return await asyncio.gather(*early), late, before, during

    early, late, before, during = asyncio.run(main())
    expected = PROMPT
    for events in early:
        assert tokens(events) == expected
        ids = [i for i, _ in events if i is not None]
        assert ids == sorted(set(ids)), "ids must increase without repeats"
        assert events[-2][1]["type"] == "end" and events[-1][1] == "[DONE]"
    assert tokens(late) == expected
    # 100 open streams cost the server a bounded amount (no per-subscriber text copies)
    assert during - before < 40 * 1024, f"RSS grew by {during - before} KiB"


def test_last_event_id_resumes_without_gaps_or_repeats(slow_echo: ServerProcess) -> None:
    server = slow_echo
    job_id = submit(server)
    url = f"{server.url}/v1/jobs/{job_id}/events"
    seen: list[tuple[int | None, Any]] = []
    with httpx.stream("GET", url, headers=auth(server.keys["client_key"]), timeout=30) as r:
        buffer = ""
        for text in r.iter_text():
            buffer += text
            *blocks, buffer = buffer.split("\n\n")
            seen += parse_sse("\n\n".join(blocks) + "\n\n") if blocks else []
            if sum(1 for _, d in seen if isinstance(d, dict) and d["type"] == "token") >= 5:
                break
    last = seen[-1][0]
    assert last is not None
    time.sleep(0.5)  # tokens keep coming while we are away
    with httpx.stream(
        "GET", url, headers=auth(server.keys["client_key"], **{"Last-Event-ID": str(last)})
    ) as r:
        rest = parse_sse(r.read().decode())
    ids = [i for i, _ in seen + rest if i is not None]
    assert ids == list(range(ids[0], ids[0] + len(ids))), "no gap, no repeat"
    assert tokens(seen) + tokens(rest) == PROMPT


async def test_a_long_wait_in_the_queue_sends_keep_alive_comments(api: Api) -> None:
    from openbeepboop.server.http.streaming import stream_events

    job = await api.submit("waits")
    queue = app_state(api.app).queue
    stream = stream_events(queue, await queue.store.get_job(job["id"]), -1, keepalive=0.05)
    first = await anext(stream)
    assert b'"type":"queued"' in first
    assert await anext(stream) == b": keep-alive\n\n"
    assert await anext(stream) == b": keep-alive\n\n"
    await stream.aclose()  # the client went away: nothing is left running


async def test_finished_text_is_kept_only_for_jobs_someone_followed() -> None:
    from openbeepboop.server.core.deltas import DeltaHub

    hub = DeltaHub()
    assert hub.push("job_a", 0, "x" * 1000) and hub.push("job_b", 0, "y")

    async def never_final() -> bool:
        return False

    follower = hub.follow("job_b", never_final)
    assert await anext(follower) == "y"
    hub.finish("job_a")  # nobody followed it: its text goes, its end stays known
    hub.finish("job_b")
    assert not hub.has_parts("job_a") and hub.has_parts("job_b")
    assert hub.push("job_a", 1, "late") is False
    assert [p async for p in follower] == []


async def test_text_pushed_before_a_followers_first_read_is_kept() -> None:
    """A follower counts from the moment it starts following, not from its first read:
    a job that streams and ends while the follower is still busy (say, sending
    `started`) still gives it every piece, one by one."""
    from openbeepboop.server.core.deltas import DeltaHub

    hub = DeltaHub()

    async def final() -> bool:
        return True

    follower = hub.follow("job_c", final)
    assert hub.push("job_c", 0, "hello") and hub.push("job_c", 1, " there")
    hub.finish("job_c")
    assert [p async for p in follower] == ["hello", " there"]
    # A job that ended unfollowed gives nothing, at once (its result has the text).
    hub.finish("job_d")
    started = time.monotonic()
    assert [p async for p in hub.follow("job_d", final)] == []
    assert time.monotonic() - started < 0.5
