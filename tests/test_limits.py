"""Limits without holes: every way in counts against the same per-key limits (the Batch
API against `max_active_jobs_per_key`, WebSocket frames against the rate limit), a
revoked key's open WebSockets and event streams are closed, and with PostgreSQL
replicas a key's rate limit holds for the whole deployment."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import Api, ServerProcess, cli
from tests.nodes import auth, echo_model, with_node
from tests.test_postgres_replicas import replicas

ASSISTANT = {
    "streams": [
        {
            "provider": "openai",
            "settings": {"model": "echo"},
            "messages": [{"role": "user", "content": "{query}"}],
        }
    ]
}


def batch_file(n: int) -> bytes:
    lines = [
        json.dumps(
            {
                "custom_id": f"req-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "echo", "messages": [{"role": "user", "content": f"n{i}"}]},
            }
        )
        for i in range(n)
    ]
    return ("\n".join(lines) + "\n").encode()


async def create_batch(api: Api, lines: int) -> httpx.Response:
    up = await api.http.post(
        "/v1/files",
        files={"file": ("in.jsonl", batch_file(lines))},
        data={"purpose": "batch"},
        headers=api.h(api.client),
    )
    assert up.status_code == 200, up.text
    return await api.http.post(
        "/v1/batches",
        json={"input_file_id": up.json()["id"], "endpoint": "/v1/chat/completions"},
        headers=api.h(api.client),
    )


async def active_jobs(api: Api) -> int:
    r = await api.http.get("/v1/jobs?limit=1000", headers=api.h(api.client))
    return sum(j["status"] in ("queued", "in_progress") for j in r.json()["data"])


# -- the Batch API ------------------------------------------------------------------------


async def test_batches_count_against_the_active_job_limit(make_api: Any) -> None:
    async with make_api(rate_limit="", max_active_jobs_per_key=250) as api:
        too_big = await create_batch(api, 1000)
        assert too_big.status_code == 400, too_big.text
        error = too_big.json()["error"]
        assert (error["code"], error["param"]) == ("batch_too_large", "input_file_id")
        assert "250" in error["message"] and "1000" in error["message"]

        first = await create_batch(api, 200)
        assert first.status_code == 200, first.text
        # at once, before the driver queued its lines: they are counted already
        over = await create_batch(api, 100)
        assert over.status_code == 429, over.text
        assert over.json()["error"]["code"] == "too_many_active_jobs"
        assert float(over.headers["retry-after"]) > 0
        fits = await create_batch(api, 50)
        assert fits.status_code == 200, fits.text

        for _ in range(100):  # the driver queues both batches' lines
            if await active_jobs(api) == 250:
                break
            await asyncio.sleep(0.05)
        assert await active_jobs(api) == 250
        one_more = await api.http.post(
            "/v1/jobs",
            json={"body": {"model": "echo", "messages": [{"role": "user", "content": "x"}]}},
            headers=api.h(api.client),
        )
        assert one_more.status_code == 429, one_more.text
        assert (await create_batch(api, 1)).status_code == 429
        # the other client's room is its own
        other = await api.http.post(
            "/v1/jobs",
            json={"body": {"model": "echo", "messages": [{"role": "user", "content": "x"}]}},
            headers=api.h(api.other_client),
        )
        assert other.status_code == 202, other.text


# -- the WebSocket ------------------------------------------------------------------------


def ws_url(server: ServerProcess, key: str) -> Any:
    return connect(server.url.replace("http://", "ws://") + "/ws", additional_headers=auth(key))


async def recv(ws: ClientConnection, timeout: float = 10) -> dict[str, Any]:
    return dict(json.loads(await asyncio.wait_for(ws.recv(), timeout)))


async def replies(ws: ClientConnection, count: int) -> list[dict[str, Any]]:
    """The next `count` answers to adds (resp_add or error), other frames skipped."""
    out: list[dict[str, Any]] = []
    while len(out) < count:
        message = await recv(ws)
        if message["type"] in ("resp_add", "error"):
            out.append(message)
    return out


@pytest.mark.slow
def test_websocket_adds_count_against_the_keys_limits(
    server_process: Callable[..., ServerProcess],
) -> None:
    # a minute's window: the burst falls inside it however busy the machine is
    server = server_process(
        OPENBEEPBOOP_RATE_LIMIT="20/minute", OPENBEEPBOOP_MAX_ACTIVE_JOBS_PER_KEY="10"
    )
    key = server.keys["client_key"]

    def add(i: int) -> str:
        return json.dumps({"type": "add", "id": f"a{i}", "query": "hi", "assistant": ASSISTANT})

    async def main() -> None:
        async with ws_url(server, key) as ws:  # the handshake is the key's first request
            for i in range(200):
                await ws.send(add(i))
            got = await replies(ws, 200)
            assert [m["id"] for m in got] == [f"a{i}" for i in range(200)]
            codes = [m.get("code", m["type"]) for m in got]
            # 10 jobs (the active-job limit), then refusals up to the 19 frames the rate
            # limit lets through, then the rate limit
            assert codes[:10] == ["resp_add"] * 10
            allowed = 10 + codes.count("too_many_active_jobs")
            assert 15 <= allowed <= 21, codes  # 21: a burst across a window boundary
            assert codes[10:allowed] == ["too_many_active_jobs"] * (allowed - 10)
            assert codes[allowed:] == ["rate_limit_exceeded"] * (200 - allowed)
            assert all(m["retry_after"] > 0 for m in got[allowed:])
            # the same limiter as HTTP: the key is out of requests there too
            async with httpx.AsyncClient() as http:
                r = await http.get(server.url + "/v1/jobs", headers=auth(key))
            assert r.status_code == 429
            # the connection stays open
            await ws.send("{not json")
            assert (await recv(ws))["message"].startswith("not valid JSON")

    asyncio.run(main())


# -- revocation -----------------------------------------------------------------------------


async def new_client_key(server: ServerProcess) -> tuple[str, str]:
    async with httpx.AsyncClient() as http:
        r = await http.post(
            server.url + "/v1/admin/keys",
            json={"role": "client"},
            headers=auth(server.keys["admin_key"]),
        )
        assert r.status_code == 201, r.text
        return r.json()["id"], r.json()["key"]


async def open_sse(http: httpx.AsyncClient, method: str, url: str, key: str, **kw: Any) -> Any:
    """An SSE response, open (its body not read yet)."""
    request = http.build_request(method, url, headers=auth(key), **kw)
    response = await http.send(request, stream=True)
    assert response.status_code == 200, await response.aread()
    return response


async def until_closed(ws: ClientConnection) -> int:
    """Read the socket until the server closes it; the close code."""
    try:
        while True:
            await asyncio.wait_for(ws.recv(), 15)
    except ConnectionClosed as closed:
        assert closed.rcvd is not None
        return closed.rcvd.code


async def until_revoked_event(response: httpx.Response) -> list[str]:
    """The stream's data lines up to its end: the last must say the key was revoked."""
    lines = []
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            lines.append(line.removeprefix("data: "))
    return lines


@pytest.mark.slow
def test_revocation_closes_the_keys_websockets_and_event_streams(
    server_process: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    slow = echo_model(token_delay_ms=200)
    long_text = " ".join(f"w{i}" for i in range(100))  # 20 s of tokens
    with with_node(server_process(), tmp_path, [slow]) as server:

        async def streams(key: str, http: httpx.AsyncClient) -> tuple[Any, ...]:
            ws = await ws_url(server, key)
            add = {"type": "add", "id": "x", "query": long_text, "assistant": ASSISTANT}
            await ws.send(json.dumps(add))
            job_id = (await recv(ws))["job_id"]
            events = await open_sse(http, "GET", f"{server.url}/v1/jobs/{job_id}/events", key)
            chat = await open_sse(
                http,
                "POST",
                f"{server.url}/v1/chat/completions",
                key,
                json={
                    "model": "echo",
                    "stream": True,
                    "messages": [{"role": "user", "content": long_text}],
                },
            )
            return ws, events, chat

        async def closed_within(ws: Any, events: Any, chat: Any) -> float:
            started = time.monotonic()
            code, event_lines, chat_lines = await asyncio.gather(
                until_closed(ws), until_revoked_event(events), until_revoked_event(chat)
            )
            took = time.monotonic() - started
            assert code == 1008
            for lines in (event_lines, chat_lines):
                assert json.loads(lines[-1])["error"]["code"] == "api_key_revoked"
                assert "[DONE]" not in lines
            return took

        async def main() -> None:
            async with httpx.AsyncClient(timeout=30) as http:
                # revoked by another process (the CLI): seen at the next recheck (2 s)
                key_id, key = await new_client_key(server)
                opened = await streams(key, http)
                out = await asyncio.to_thread(
                    cli, "keys", "revoke", "--data-dir", str(server.data_dir), key_id, "--json"
                )
                assert out["id"] == key_id
                assert await closed_within(*opened) < 5.0
                # revoked through this server: at once
                key_id, key = await new_client_key(server)
                opened = await streams(key, http)
                r = await http.post(
                    f"{server.url}/v1/admin/keys/{key_id}/revoke",
                    headers=auth(server.keys["admin_key"]),
                )
                assert r.status_code == 200
                assert await closed_within(*opened) < 1.5
                # the revoked key opens nothing new
                r = await http.get(f"{server.url}/v1/jobs", headers=auth(key))
                assert r.status_code == 401

        asyncio.run(main())


# -- PostgreSQL replicas ----------------------------------------------------------------


@pytest.mark.slow
def test_replicas_share_one_rate_limit_and_revocation(postgres: str, tmp_path: Path) -> None:
    with replicas(tmp_path, postgres, count=2, OPENBEEPBOOP_RATE_LIMIT="50/second") as group:
        key = group.keys["client_key"]

        def hammer(seconds: float, clients: int = 4) -> list[tuple[float, float, int]]:
            """GET /v1/jobs through both replicas, as fast as a few clients go (in
            threads: cheaper here than many coroutines): each call's (sent, answered,
            status), by the wall clock the servers' windows follow."""
            stop = time.time() + seconds

            def client(i: int) -> list[tuple[float, float, int]]:
                calls = []
                url = group.client(i).url + "/v1/jobs?limit=1"
                with httpx.Client(timeout=10) as http:
                    while time.time() < stop:
                        sent = time.time()
                        r = http.get(url, headers=auth(key))
                        calls.append((sent, time.time(), r.status_code))
                        if r.status_code == 429:
                            assert float(r.headers["retry-after"]) > 0
                return calls

            with ThreadPoolExecutor(clients) as pool:
                return [c for calls in pool.map(client, range(clients)) for c in calls]

        seconds = 4
        calls = hammer(seconds)
        assert {status for *_, status in calls} == {200, 429}
        # a call sent and answered within one second was counted in that second's window
        answered: dict[int, int] = {}
        for sent, done, status in calls:
            if status == 200 and int(sent) == int(done):
                answered[int(sent)] = answered.get(int(sent), 0) + 1
        # well over the limit offered: per replica, 50 a second each would be answered
        assert len(calls) > 70 * seconds, len(calls)
        # 50 a second for the deployment, not 50 per replica
        assert max(answered.values()) <= 50, answered
        assert sum(answered.values()) >= 30 * seconds, answered

        async def revoke_elsewhere() -> float:
            key_id, secret = await new_client_key(group.servers[0])
            async with ws_url(group.servers[1], secret) as ws:
                await ws.send(json.dumps({"type": "listen", "job_id": "job_none"}))
                assert (await recv(ws))["type"] == "error"
                async with httpx.AsyncClient() as http:
                    r = await http.post(
                        f"{group.servers[0].url}/v1/admin/keys/{key_id}/revoke",
                        headers=auth(group.keys["admin_key"]),
                    )
                    assert r.status_code == 200
                started = time.monotonic()
                assert await until_closed(ws) == 1008
                return time.monotonic() - started

        assert asyncio.run(revoke_elsewhere()) < 5.0
