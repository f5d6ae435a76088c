"""Pinning a job to a node (`node`, `node_labels`), through the in-process HTTP API with
the test acting as nodes: every submit path takes a pin and keeps it out of the model's
request, claims honour it, a pin nobody registered with is a 400 naming the field, a
job pinned to a node that is not live waits (its events say so) until it expires, and a
synchronous call pinned to a dead node gets the 503."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from tests.conftest import Api

LAB = {"gpu": "a100", "site": "lab2"}


def chat(content: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": "echo", "messages": [{"role": "user", "content": content}], **extra}


async def register(api: Api, name: str, labels: dict[str, str] | None = None) -> str:
    body = {"name": name, "models": [{"name": "echo"}], "labels": labels or {}}
    r = await api.http.post("/internal/nodes/register", json=body, headers=api.h(api.node))
    assert r.status_code == 200, r.text
    return str(r.json()["node_id"])


async def fetch(api: Api, node_id: str, max_jobs: int = 10) -> list[dict[str, Any]]:
    body = {"node_id": node_id, "models": ["echo"], "max_jobs": max_jobs}
    r = await api.http.post("/internal/queue/fetch", json=body, headers=api.h(api.node))
    assert r.status_code == 200, r.text
    return list(r.json()["jobs"])


async def submit_async(api: Api, path: str, body: dict[str, Any]) -> Any:
    return await api.http.post(path, json=body, headers=api.h(api.client, Prefer="respond-async"))


async def post_jobs(api: Api, body: dict[str, Any]) -> Any:
    return await api.http.post("/v1/jobs", json=body, headers=api.h(api.client))


def error_of(r: Any, status: int = 400) -> dict[str, Any]:
    assert r.status_code == status, r.text
    return dict(r.json()["error"])


async def test_nodes_register_labels_and_list_them(api: Api) -> None:
    await register(api, "mac", LAB)
    await register(api, "pc")
    r = await api.http.get("/v1/nodes", headers=api.h(api.admin))
    assert {n["name"]: n["labels"] for n in r.json()["data"]} == {"mac": LAB, "pc": {}}


async def test_openai_routes_pin_by_name_or_id_and_strip_the_pin(api: Api) -> None:
    mac, pc = await register(api, "mac", LAB), await register(api, "pc")
    by_name = (await submit_async(api, "/v1/chat/completions", chat(node="mac"))).json()
    assert (by_name["node"], by_name["node_labels"]) == ("mac", None)
    r = await submit_async(api, "/v1/completions", {"model": "echo", "prompt": "x", "node": pc})
    by_id = r.json()
    r = await submit_async(api, "/v1/embeddings", {"model": "echo", "input": "x", "node": "mac"})
    embedding = r.json()
    free = (await submit_async(api, "/v1/chat/completions", chat(priority=-1))).json()

    got = await fetch(api, pc)
    assert [j["id"] for j in got] == [by_id["id"], free["id"]]
    got = await fetch(api, mac)
    assert {j["id"] for j in got} == {by_name["id"], embedding["id"]}
    for leased in got:  # routing, not a parameter for the model
        assert "node" not in leased["request"] and "node_labels" not in leased["request"]
    assert "priority" not in got[0]["request"]
    job = (await api.http.get(f"/v1/jobs/{by_name['id']}", headers=api.h(api.client))).json()
    assert (job["node"], job["node_id"], job["status"]) == ("mac", mac, "in_progress")


async def test_jobs_api_pins_by_labels_single_and_bulk(api: Api) -> None:
    lab = await register(api, "mac", LAB)
    plain = await register(api, "pc", {"gpu": "a100"})
    beside = await post_jobs(api, {"body": chat("beside"), "node_labels": LAB})
    inside = await post_jobs(api, {"body": chat("inside", node_labels={"site": "lab2"})})
    bulk = await post_jobs(
        api, {"jobs": [{"body": chat("b0"), "node_labels": {"gpu": "a100"}}, {"body": chat()}]}
    )
    assert beside.status_code == inside.status_code == bulk.status_code == 202
    assert beside.json()["node_labels"] == LAB
    assert inside.json()["node_labels"] == {"site": "lab2"}
    gpu_job, free_job = bulk.json()["data"]

    got = await fetch(api, plain)
    assert [j["id"] for j in got] == [gpu_job["id"], free_job["id"]]
    got = await fetch(api, lab)
    assert {j["id"] for j in got} == {beside.json()["id"], inside.json()["id"]}
    assert all("node_labels" not in j["request"] for j in got)


async def test_responses_route_takes_a_pin(api: Api) -> None:
    mac, pc = await register(api, "mac"), await register(api, "pc")
    body = {"model": "echo", "input": "hi", "background": True, "node": "mac"}
    r = await api.http.post("/v1/responses", json=body, headers=api.h(api.client))
    assert r.status_code == 200, r.text
    assert await fetch(api, pc) == []
    [leased] = await fetch(api, mac)
    assert "node" not in leased["request"]


async def test_a_pin_no_registered_node_matches_is_a_400_naming_the_field(api: Api) -> None:
    await register(api, "mac", LAB)
    err = error_of(await submit_async(api, "/v1/chat/completions", chat(node="nas")))
    assert (err["param"], err["code"]) == ("node", "unknown_node")
    assert "no node named 'nas' has registered" in err["message"]
    assert "mac" in err["message"]
    err = error_of(await post_jobs(api, {"body": chat(), "node_labels": {"gpu": "h100"}}))
    assert (err["param"], err["code"]) == ("node_labels", "unknown_node_labels")
    assert "gpu=h100" in err["message"] and "gpu=a100" in err["message"]
    # a node and labels it does not carry, though another node might
    await register(api, "pc", {"gpu": "h100"})
    err = error_of(
        await post_jobs(api, {"body": chat(), "node": "mac", "node_labels": {"gpu": "h100"}})
    )
    assert err["param"] == "node_labels"
    # a bulk submit is all or none
    jobs = [{"body": chat()}, {"body": chat(), "node": "nas"}]
    assert error_of(await post_jobs(api, {"jobs": jobs}))["param"] == "node"
    r = await api.http.get("/v1/jobs", headers=api.h(api.client))
    assert r.json()["data"] == []
    # the sync path answers the same 400 before any wait
    r = await api.http.post(
        "/v1/chat/completions", json=chat(node="nas"), headers=api.h(api.client)
    )
    assert error_of(r)["param"] == "node"
    # wrong types are validation errors
    r = await post_jobs(api, {"body": chat(), "node_labels": {"gpu": 100}})
    assert error_of(r)["param"].startswith("node_labels")
    r = await submit_async(api, "/v1/chat/completions", chat(node=""))
    assert error_of(r)["param"] == "node"


async def test_an_idempotent_replay_must_carry_the_same_pin(api: Api) -> None:
    await register(api, "mac")
    await register(api, "pc")
    headers = api.h(api.client, Prefer="respond-async", **{"Idempotency-Key": "k1"})
    first = await api.http.post("/v1/chat/completions", json=chat(node="mac"), headers=headers)
    again = await api.http.post("/v1/chat/completions", json=chat(node="mac"), headers=headers)
    assert (first.status_code, again.status_code) == (202, 200)
    assert first.json()["id"] == again.json()["id"]
    other = await api.http.post("/v1/chat/completions", json=chat(node="pc"), headers=headers)
    assert other.status_code == 422


async def events_of(api: Api, job_id: str) -> list[dict[str, Any]]:
    headers = api.h(api.client)
    async with api.http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as r:
        lines = [line async for line in r.aiter_lines()]
    return [json.loads(x[6:]) for x in lines if x.startswith("data: ") and x != "data: [DONE]"]


async def test_pinned_to_a_node_that_is_not_live_waits_then_expires(
    make_api: Callable[..., Any],
) -> None:
    settings = {"rate_limit": "", "node_ttl_seconds": 0.3, "reaper_interval_seconds": 0.05}
    async with make_api(**settings) as api:
        mac = await register(api, "mac", LAB)
        await asyncio.sleep(0.4)  # mac is no longer live; its row remains
        r = await post_jobs(api, {"body": chat(), "node": "mac", "ttl_seconds": 0.8})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        r = await post_jobs(api, {"body": chat(), "node_labels": {"site": "lab2"}})
        by_labels = r.json()["id"]
        pc = await register(api, "pc")
        assert await fetch(api, pc) == []
        events = await events_of(api, job_id)
        assert [e["type"] for e in events] == ["queued", "failed"]
        assert events[0]["waiting_for"] == {"node": "mac"}
        assert events[1]["code"] == "job_expired"
        job = (await api.http.get(f"/v1/jobs/{job_id}", headers=api.h(api.client))).json()
        assert job["status"] == "expired"
        # the node comes back (a fresh registration, same name): its pinned work runs
        again = await register(api, "mac", LAB)
        assert again != mac
        [leased] = await fetch(api, again)
        assert leased["id"] == by_labels


async def test_sync_call_pinned_to_a_dead_node_is_a_503(make_api: Callable[..., Any]) -> None:
    settings = {"rate_limit": "", "node_ttl_seconds": 0.3, "model_wait_seconds": 0.3}
    async with make_api(**settings) as api:
        await register(api, "mac")
        await asyncio.sleep(0.4)
        pc = await register(api, "pc")  # live, serves echo, but not mac
        start = time.monotonic()
        r = await api.http.post(
            "/v1/chat/completions", json=chat(node="mac"), headers=api.h(api.client)
        )
        err = error_of(r, 503)
        assert err["code"] == "model_not_available" and "node 'mac'" in err["message"]
        assert time.monotonic() - start < 3
        assert await fetch(api, pc) == []  # nothing was queued for it


async def test_sync_call_pinned_to_a_node_that_dies_gets_the_503(
    make_api: Callable[..., Any],
) -> None:
    settings = {"rate_limit": "", "node_ttl_seconds": 0.5, "model_wait_seconds": 0.3}
    async with make_api(**settings) as api:
        await register(api, "mac")
        pc = await register(api, "pc")

        async def keep_pc_alive() -> None:  # heartbeats keep a node live (fetches
            while True:  # touch it only every few seconds)
                body = {"node_id": pc, "lease_ids": []}
                headers = api.h(api.node)
                await api.http.post("/internal/queue/heartbeat", json=body, headers=headers)
                await asyncio.sleep(0.1)

        alive = asyncio.ensure_future(keep_pc_alive())
        try:
            r = await api.http.post(
                "/v1/chat/completions", json=chat(node="mac"), headers=api.h(api.client)
            )
        finally:
            alive.cancel()
        err = error_of(r, 503)
        assert err["code"] == "model_not_available"
        assert "it was cancelled" in err["message"] and "node 'mac'" in err["message"]
