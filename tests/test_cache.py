"""The response cache over HTTP (docs/cache.md), in-process: a node is played by the test
through the node protocol, so it is known exactly which requests reached a node."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from openbeepboop.server.http.state import app_state
from tests.conftest import Api, serve_in_process

CACHE = "x-openbeepboop-cache"


def chat(content: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": "echo", "messages": [{"role": "user", "content": content}], **extra}


def answer_to(request: dict[str, Any], n: int) -> dict[str, Any]:
    asked = request["messages"][-1]["content"] if "messages" in request else request["prompt"]
    text = f"answer {n} to {asked}"
    return {
        "id": f"chatcmpl-{n}",
        "object": "chat.completion",
        "created": 1_700_000_000 + n,
        "model": "echo",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4},
    }


class Node:
    """A node played over HTTP: answers every job it fetches, counting them."""

    def __init__(self, api: Api, node_id: str) -> None:
        self.api, self.node_id, self.served = api, node_id, 0
        self.stopping = False
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while not self.stopping:
            body = {"node_id": self.node_id, "models": ["echo"], "max_jobs": 10, "wait": 0.2}
            r = await self.api.http.post(
                "/internal/queue/fetch", json=body, headers=self.api.h(self.api.node)
            )
            results = []
            for job in r.json()["jobs"]:
                self.served += 1
                result = answer_to(job["request"], self.served)
                results.append({"job_id": job["id"], "lease_id": job["lease_id"], "result": result})
            if results:
                await self.api.http.post(
                    "/internal/queue/submit",
                    json={"results": results},
                    headers=self.api.h(self.api.node),
                )

    async def stop(self) -> None:
        """Stop after the current fetch (its jobs answered)."""
        self.stopping = True
        await asyncio.gather(self.task, return_exceptions=True)


@pytest.fixture
def served(tmp_path: Path) -> Any:
    """`async with served(**settings) as (api, node)`."""

    def make(**settings: Any) -> Any:
        return _served(tmp_path / f"s{time.monotonic_ns()}", **settings)

    return make


class _served:
    def __init__(self, path: Path, **settings: Any) -> None:
        self.ctx = serve_in_process(path, rate_limit="", model_wait_seconds=0.5, **settings)

    async def __aenter__(self) -> tuple[Api, Node]:
        self.api = await self.ctx.__aenter__()
        self.node = Node(self.api, await self.api.register(["echo"]))
        return self.api, self.node

    async def __aexit__(self, *exc: Any) -> None:
        try:
            await self.node.stop()
        finally:
            await self.ctx.__aexit__(*exc)


async def post(api: Api, body: dict[str, Any], key: str | None = None, **headers: str) -> Any:
    return await api.http.post(
        "/v1/chat/completions", json=body, headers=api.h(key or api.client, **headers)
    )


async def job_of(api: Api, response: Any, key: str | None = None) -> dict[str, Any]:
    job_id = response.headers["x-openbeepboop-job-id"]
    r = await api.http.get(f"/v1/jobs/{job_id}", headers=api.h(key or api.client))
    return dict(r.json())


@pytest.mark.parametrize("fast_lane", [True, False], ids=["lane", "no-lane"])
async def test_a_repeated_temperature_0_request_is_answered_from_the_cache(
    served: Any, fast_lane: bool
) -> None:
    async with served(fast_lane=fast_lane) as (api, node):
        first = await post(api, chat(temperature=0))
        assert first.status_code == 200, first.text
        assert first.headers[CACHE] == "miss" and node.served == 1
        await node.stop()  # no node from here on: the cache alone answers
        # another key, the same request (stream: false and `user` are not part of it)
        again = await post(api, chat(temperature=0, stream=False, user="u2"), api.other_client)
        assert again.status_code == 200, again.text
        assert again.headers[CACHE] == "hit"
        assert again.content == first.content  # byte-identical
        job = await job_of(api, again, api.other_client)
        assert job["cached"] is True and job["status"] == "completed"
        assert job["node_id"] is None and job["attempts"] == 0
        assert (await job_of(api, first))["cached"] is False
        # a streamed request is answered from the same answer
        r = await post(api, chat(temperature=0, stream=True))
        assert r.status_code == 200 and r.headers[CACHE] == "hit"
        text = "".join(
            json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
            for line in r.text.splitlines()
            if line.startswith("data: {")
        )
        assert text == "answer 1 to hi"
        # and an async submit is a job completed at once
        r = await post(api, chat(temperature=0), Prefer="respond-async")
        assert r.status_code == 202 and r.headers[CACHE] == "hit"
        assert r.json()["status"] == "completed" and r.json()["cached"] is True
        assert r.json()["result"] == first.json()
        stats = (await api.http.get("/v1/stats", headers=api.h(api.client))).json()["cache"]
        assert stats["hits"] == 3 and stats["misses"] == 1 and stats["entries"] == 1
        metrics = (await api.http.get("/metrics")).text
        assert "openbeepboop_cache_hits_total 3.0" in metrics
        assert "openbeepboop_cache_misses_total 1.0" in metrics


async def test_which_requests_are_cached_and_skip_refresh(served: Any) -> None:
    async with served() as (api, node):
        for body in (chat(), chat(temperature=0.7), chat(temperature=0.7)):
            r = await post(api, body)
            assert r.headers[CACHE] == "bypass"
        assert node.served == 3
        # a seed makes a request deterministic; `cache: use` opts any request in
        assert (await post(api, chat("s", seed=7, temperature=1))).headers[CACHE] == "miss"
        assert (await post(api, chat("s", seed=7, temperature=1))).headers[CACHE] == "hit"
        assert (await post(api, chat("u", temperature=1, cache="use"))).headers[CACHE] == "miss"
        hit = await post(api, chat("u", temperature=1, cache="use"))
        assert hit.headers[CACHE] == "hit"
        served_before = node.served
        # skip: neither looked up nor kept (the header says so as well as the body)
        r = await post(api, chat("u", temperature=1), **{CACHE: "skip"})
        assert r.headers[CACHE] == "bypass" and node.served == served_before + 1
        # refresh: runs again and replaces the answer; later hits get the new one
        fresh = await post(api, chat("u", temperature=1, cache="refresh"))
        assert fresh.headers[CACHE] == "refresh" and node.served == served_before + 2
        assert fresh.json() != hit.json()
        again = await post(api, chat("u", temperature=1, cache="use"))
        assert again.headers[CACHE] == "hit" and again.content == fresh.content
        # a bulk submit: each job looked up on its own
        jobs = {"jobs": [{"body": chat("u", temperature=1, cache="use")}, {"body": chat("new")}]}
        r = await api.http.post("/v1/jobs", json=jobs, headers=api.h(api.client))
        assert [j["cached"] for j in r.json()["data"]] == [True, False]


async def test_mistakes_are_400s(served: Any) -> None:
    async with served() as (api, _):
        r = await post(api, chat(temperature=0), **{CACHE: "sometimes"})
        assert r.status_code == 400
        assert r.json()["error"]["param"] == CACHE and "use, skip, refresh" in r.text
        r = await post(api, chat(temperature=0, cache="always"))
        assert r.status_code == 400 and "cache" in r.text


async def test_ttl_size_bound_and_model_policy(served: Any) -> None:
    async with served(cache_ttl_seconds=1.0, cache_models={"echo": "off"}) as (api, _node):
        r = await post(api, chat(temperature=0, cache="use"))
        assert r.headers[CACHE] == "bypass"  # the model's policy: never, even when asked
    async with served(cache_ttl_seconds=0.5) as (api, _node):
        assert (await post(api, chat(temperature=0))).headers[CACHE] == "miss"
        assert (await post(api, chat(temperature=0))).headers[CACHE] == "hit"
        await asyncio.sleep(0.6)
        assert (await post(api, chat(temperature=0))).headers[CACHE] == "miss"  # expired
    async with served(cache_max_bytes=400) as (api, _node):
        for text in ("a", "b", "c"):  # ~280 bytes each: room for one
            await post(api, chat(text, temperature=0))
        cache = app_state(api.app).queue.cache
        assert await cache.trim() == 2
        headers = [(await post(api, chat(t, temperature=0))).headers[CACHE] for t in "abc"]
        assert headers == ["miss", "miss", "hit"]  # c was used last: it stayed


async def test_scopes_private_and_off(served: Any) -> None:
    async with served(cache_scope="private") as (api, node):
        assert (await post(api, chat(temperature=0))).headers[CACHE] == "miss"
        assert (await post(api, chat(temperature=0))).headers[CACHE] == "hit"
        # another key never gets the first key's answer
        r = await post(api, chat(temperature=0), api.other_client)
        assert r.headers[CACHE] == "miss"
    async with served(cache_scope="off") as (api, node):
        assert (await post(api, chat(temperature=0))).headers[CACHE] == "bypass"
        assert (await post(api, chat(temperature=0))).headers[CACHE] == "bypass"
        assert node.served == 2


async def test_rerun_runs_on_a_node_and_replaces_the_cached_answer(served: Any) -> None:
    async with served() as (api, node):
        first = await post(api, chat(temperature=0))
        hit = await post(api, chat(temperature=0))
        assert hit.headers[CACHE] == "hit"
        state = app_state(api.app)
        key = await state.keyring.authenticate(api.client)
        again = await state.queue.rerun(key, hit.headers["x-openbeepboop-job-id"])
        assert not again.cached and again.cache_key is not None  # queued for a node
        done = await state.queue.wait_for(again.id, 5)
        assert done.result != first.json() and node.served == 2
        latest = await post(api, chat(temperature=0))
        assert latest.headers[CACHE] == "hit" and latest.json() == done.result


async def test_responses_and_generate_take_the_cache_controls(served: Any) -> None:
    async with served() as (api, _node):
        h = api.h(api.client)
        ask = {"model": "echo", "input": "secret", "temperature": 0}
        # an answer not to be stored is neither kept nor looked up
        r = await api.http.post("/v1/responses", json={**ask, "store": False}, headers=h)
        assert r.status_code == 200 and r.headers[CACHE] == "bypass"
        r = await api.http.post("/v1/responses", json=ask, headers=api.h(api.other_client))
        assert r.headers[CACHE] == "miss"
        stored = r.json()["id"]
        assert (await api.http.post("/v1/responses", json=ask, headers=h)).headers[CACHE] == "hit"
        r = await api.http.post("/v1/responses", json={**ask, "cache": "skip"}, headers=h)
        assert r.headers[CACHE] == "bypass"
        # its owner deletes the stored response: its answer leaves the cache too
        gone = await api.http.delete(f"/v1/responses/{stored}", headers=api.h(api.other_client))
        assert gone.status_code == 200, gone.text
        assert (await api.http.post("/v1/responses", json=ask, headers=h)).headers[CACHE] == "miss"
        # LlamaNet's /generate: the same controls, body field or header
        gen = {"prompt": "go", "temperature": 0, "model": "echo"}
        assert (await api.http.post("/generate", json=gen, headers=h)).headers[CACHE] == "miss"
        assert (await api.http.post("/generate", json=gen, headers=h)).headers[CACHE] == "hit"
        r = await api.http.post("/generate", json=gen, headers=api.h(api.client, **{CACHE: "skip"}))
        assert r.headers[CACHE] == "bypass"
        r = await api.http.post("/generate", json={**gen, "cache": "refresh"}, headers=h)
        assert r.headers[CACHE] == "refresh"


async def test_replays_are_not_counted_as_hits(served: Any) -> None:
    async with served() as (api, _node):
        for _ in range(3):  # the same idempotency key: one job, one miss
            r = await post(api, chat(temperature=0), **{"Idempotency-Key": "k1"})
            assert r.status_code == 200
        await post(api, chat(temperature=0))
        stats = (await api.http.get("/v1/stats", headers=api.h(api.client))).json()["cache"]
        assert (stats["hits"], stats["misses"]) == (1, 1)
