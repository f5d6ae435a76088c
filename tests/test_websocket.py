"""`WS /ws`, the LLM Worker protocol, with a real WebSocket client (`websockets`) against
a real server and a real echo node; and named assistant templates over HTTP."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from tests.conftest import ServerProcess
from tests.nodes import (
    auth,
    echo_model,
    served,
)

# The LLM Worker README's example, as it is written there.
README_ADD = {
    "type": "add",
    "id": "my-custom-id",
    "query": "How tall is it?",
    "assistant": {
        "streams": [
            {
                "provider": "openai",
                "settings": {"model": "gpt-3.5-turbo"},
                "messages": [
                    {"role": "system", "content": "You are a helpful assistant."},
                    {"insert": "history"},
                    {"role": "user", "content": "{query}"},
                ],
            }
        ]
    },
    "history": [
        {"role": "user", "content": "Where is the eiffel tower?"},
        {"role": "system", "content": "The Eiffel Tower is located in Paris, France."},
    ],
}


@pytest.fixture(scope="module")
def ws_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server and echo node for the module: every test reads only its own jobs, and
    the template tests each have a client key of their own (templates belong to a key)."""
    tmp = tmp_path_factory.mktemp("ws")
    models = [
        echo_model(name="gpt-3.5-turbo", token_delay_ms=60),
        echo_model(token_delay_ms=60),
    ]
    with served(tmp, models) as server:
        yield server


def with_new_client_key(server: ServerProcess) -> ServerProcess:
    """`server` seen through a client key made for this test alone."""
    r = httpx.post(
        server.url + "/v1/admin/keys",
        json={"role": "client"},
        headers=auth(server.keys["admin_key"]),
        timeout=10,
    )
    assert r.status_code == 201, r.text
    keys = {**server.keys, "client_key": r.json()["key"]}
    return ServerProcess(server.data_dir, server.port, keys, server.env)


def ws_url(server: ServerProcess) -> str:
    return server.url.replace("http://", "ws://") + "/ws"


def open_ws(server: ServerProcess) -> Any:
    return connect(ws_url(server), additional_headers=auth(server.keys["client_key"]))


async def recv(ws: ClientConnection, timeout: float = 20) -> dict[str, Any]:
    return dict(json.loads(await asyncio.wait_for(ws.recv(), timeout)))


async def until_end(ws: ClientConnection, job_id: str) -> tuple[str, list[dict[str, Any]]]:
    """Read this job's updates up to done/failed: (text, messages)."""
    seen: list[dict[str, Any]] = []
    while True:
        message = await recv(ws)
        if message.get("job_id") != job_id:
            continue
        seen.append(message)
        if message["type"] in ("done", "failed"):
            text = "".join(m["message"] for m in seen if m["type"] == "running")
            return text, seen


def test_readme_example_and_several_listeners(ws_server: ServerProcess) -> None:
    async def main() -> str:
        async with open_ws(ws_server) as adder, open_ws(ws_server) as listener:
            await adder.send(json.dumps(README_ADD))
            reply = await recv(adder)
            assert reply["type"] == "resp_add" and reply["id"] == "my-custom-id"
            job_id = reply["job_id"]
            await listener.send(json.dumps({"type": "listen", "job_id": job_id}))
            (text, messages), (text2, _) = await asyncio.gather(
                until_end(adder, job_id), until_end(listener, job_id)
            )
            assert text == text2 == "How tall is it?"
            assert messages[0] == {"type": "running", "job_id": job_id, "message": ""}
            assert messages[-1] == {"type": "done", "job_id": job_id}
            assert sum(1 for m in messages if m["type"] == "running" and m["message"]) >= 3
            return str(job_id)

    job_id = asyncio.run(main())
    job = httpx.get(
        f"{ws_server.url}/v1/jobs/{job_id}", headers=auth(ws_server.keys["client_key"])
    ).json()
    assert job["model"] == "gpt-3.5-turbo" and job["status"] == "completed"


def test_history_and_query_are_rendered_into_the_request(ws_server: ServerProcess) -> None:
    async def main() -> str:
        async with open_ws(ws_server) as ws:
            await ws.send(json.dumps(README_ADD))
            job_id = str((await recv(ws))["job_id"])
            await until_end(ws, job_id)
            return job_id

    job_id = asyncio.run(main())
    job = httpx.get(
        f"{ws_server.url}/v1/jobs/{job_id}", headers=auth(ws_server.keys["client_key"])
    ).json()
    assert job["metadata"] == {"ws_id": "my-custom-id"}
    assert job["result"]["choices"][0]["message"]["content"] == "How tall is it?"


def test_disconnect_then_listen_again_gets_the_whole_text(ws_server: ServerProcess) -> None:
    long_query = " ".join(f"word{i}" for i in range(25))

    async def main() -> None:
        add = {**README_ADD, "id": "again", "query": long_query}
        async with open_ws(ws_server) as ws:
            await ws.send(json.dumps(add))
            job_id = (await recv(ws))["job_id"]
            first = await recv(ws)
            assert first["type"] == "running"
        # gone mid-stream; the job goes on
        await asyncio.sleep(0.3)
        async with open_ws(ws_server) as ws:
            await ws.send(json.dumps({"type": "listen", "job_id": job_id}))
            text, _ = await until_end(ws, job_id)
            assert text == long_query

    asyncio.run(main())


def test_malformed_messages_are_answered_and_the_connection_stays(
    ws_server: ServerProcess,
) -> None:
    async def main() -> None:
        async with open_ws(ws_server) as ws:
            await ws.send("this is not json")
            assert (await recv(ws))["type"] == "error"
            await ws.send(json.dumps([1, 2]))
            assert (await recv(ws))["type"] == "error"
            await ws.send(json.dumps({"type": "dance"}))
            reply = await recv(ws)
            assert reply["type"] == "error" and "dance" in reply["message"]
            await ws.send(json.dumps({"type": "add", "query": "no id"}))
            assert "id" in (await recv(ws))["message"]
            await ws.send(json.dumps({"type": "add", "id": "x", "assistant": {"streams": []}}))
            reply = await recv(ws)
            assert reply["type"] == "error" and reply["id"] == "x"
            await ws.send(json.dumps({"type": "add", "id": "y", "assistant": "no-such-template"}))
            assert (await recv(ws))["code"] == "template_not_found"
            await ws.send(json.dumps({"type": "listen", "job_id": "job_nope"}))
            reply = await recv(ws)
            assert reply["type"] == "error" and reply["job_id"] == "job_nope"
            await ws.send(b"\xff\xfe binary")
            assert (await recv(ws))["type"] == "error"
            # still open and working
            await ws.send(json.dumps({**README_ADD, "id": "after"}))
            reply = await recv(ws)
            assert reply["type"] == "resp_add" and reply["id"] == "after"
            text, _ = await until_end(ws, reply["job_id"])
            assert text == "How tall is it?"

    asyncio.run(main())


def test_cancel_over_the_socket(ws_server: ServerProcess) -> None:
    async def main() -> None:
        async with open_ws(ws_server) as ws:
            add = {**README_ADD, "id": "c", "query": " ".join(["slow"] * 60)}
            await ws.send(json.dumps(add))
            job_id = (await recv(ws))["job_id"]
            await ws.send(json.dumps({"type": "cancel", "job_id": job_id}))
            replies = []
            while not any(r["type"] == "failed" for r in replies):
                replies.append(await recv(ws))
            assert {"type": "resp_cancel", "job_id": job_id, "status": "cancelled"} in replies
            assert replies[-1]["code"] == "cancelled"

    asyncio.run(main())


def test_without_a_key_the_socket_is_refused(ws_server: ServerProcess) -> None:
    def refusal(exc: pytest.ExceptionInfo[InvalidStatus]) -> tuple[int, str | None]:
        # the handshake is answered as HTTP would answer: status and OpenAI's error body
        response = exc.value.response
        return response.status_code, json.loads(response.body or b"{}")["error"]["code"]

    async def main() -> None:
        with pytest.raises(InvalidStatus) as none:
            async with connect(ws_url(ws_server)):
                pass
        assert refusal(none) == (401, "missing_api_key")
        with pytest.raises(InvalidStatus) as bad:
            async with connect(ws_url(ws_server) + "?api_key=obb_client_nope"):
                pass
        assert refusal(bad)[0] == 401
        node_key = auth(ws_server.keys["node_key"])
        with pytest.raises(InvalidStatus) as wrong_role:
            async with connect(ws_url(ws_server), additional_headers=node_key):
                pass
        assert refusal(wrong_role)[0] == 403
        # browsers cannot set headers: ?api_key= works too
        url = ws_url(ws_server) + "?api_key=" + ws_server.keys["client_key"]
        async with connect(url) as ws:
            await ws.send(json.dumps({"type": "dance"}))
            assert (await recv(ws))["type"] == "error"

    asyncio.run(main())


def test_templates_by_name_from_ws_and_jobs_api_with_fallback(ws_server: ServerProcess) -> None:
    ws_server = with_new_client_key(ws_server)
    key = auth(ws_server.keys["client_key"])
    template = {
        "name": "eiffel",
        "description": "answers about a tower",
        "streams": [
            {
                "provider": "nobody",
                "settings": {"model": "not-served"},
                "messages": [{"role": "user", "content": "{query}"}],
            },
            {
                "provider": "local",
                "settings": {"model": "echo", "max_tokens": 50},
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"insert": "history"},
                    {"role": "user", "content": "Q: {query}"},
                ],
            },
        ],
    }
    r = httpx.post(f"{ws_server.url}/v1/templates", json=template, headers=key)
    assert r.status_code == 200, r.text
    assert r.json()["name"] == "eiffel" and len(r.json()["streams"]) == 2
    assert [
        t["name"] for t in httpx.get(f"{ws_server.url}/v1/templates", headers=key).json()["data"]
    ] == ["eiffel"]
    bad = httpx.post(
        f"{ws_server.url}/v1/templates", json={"name": "x", "streams": [{}]}, headers=key
    )
    assert bad.status_code == 400 and "settings.model" in bad.json()["error"]["message"]

    # /v1/jobs with a template: the served stream (echo) is preferred
    r = httpx.post(
        f"{ws_server.url}/v1/jobs",
        json={
            "template": "eiffel",
            "query": "how tall?",
            "history": [{"role": "user", "content": "hi"}],
        },
        headers=key,
    )
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["model"] == "echo"
    done = httpx.post(
        f"{ws_server.url}/v1/results/poll", json={"ids": [job["id"]], "wait": 20}, headers=key
    ).json()["data"][0]
    assert done["result"]["choices"][0]["message"]["content"] == "Q: how tall?"

    async def main() -> None:
        async with open_ws(ws_server) as ws:
            await ws.send(
                json.dumps({"type": "add", "id": "t", "query": "and wide?", "assistant": "eiffel"})
            )
            reply = await recv(ws)
            assert reply["type"] == "resp_add"
            text, _ = await until_end(ws, reply["job_id"])
            assert text == "Q: and wide?"

    asyncio.run(main())
    r = httpx.delete(f"{ws_server.url}/v1/templates/eiffel", headers=key)
    assert r.json()["deleted"] is True
    assert httpx.get(f"{ws_server.url}/v1/templates/eiffel", headers=key).status_code == 404


def test_templates_from_the_client_library_in_bulk_and_in_a_batch(
    ws_server: ServerProcess,
) -> None:
    ws_server = with_new_client_key(ws_server)
    import openai

    from openbeepboop.client import Client, NotFoundError

    streams = [
        {
            "provider": "local",
            "settings": {"model": "echo"},
            "messages": [{"insert": "history"}, {"role": "user", "content": "say {query}"}],
        }
    ]
    with Client(ws_server.url, ws_server.keys["client_key"]) as client:
        assert client.templates.create("sayer", streams)["name"] == "sayer"
        assert [t["name"] for t in client.templates.list()] == ["sayer"]
        one = client.jobs.create(template="sayer", query="one", history=[])
        many = client.jobs.create_many(
            [{"template": "sayer", "query": q, "priority": 2} for q in ("two", "three")]
        )
        done = client.jobs.wait_all([one, *many], timeout=30)
        answers = [j.result.choices[0].message.content for j in done]
        assert answers == ["say one", "say two", "say three"]
        assert many[0].data["priority"] == 2
        with pytest.raises(NotFoundError):
            client.jobs.create(template="missing", query="x")

    sdk = openai.OpenAI(
        base_url=ws_server.url + "/v1", api_key=ws_server.keys["client_key"], max_retries=0
    )
    lines = [
        {
            "custom_id": "a",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"template": "sayer", "query": "alpha"},
        },
        {
            "custom_id": "b",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"template": "sayer", "query": "beta", "max_tokens": 10},
        },
    ]
    data = "\n".join(json.dumps(line) for line in lines).encode()
    upload = sdk.files.create(file=("t.jsonl", data), purpose="batch")
    batch = sdk.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    for _ in range(200):
        batch = sdk.batches.retrieve(batch.id)
        if batch.status in ("completed", "failed"):
            break
        import time

        time.sleep(0.1)
    assert batch.status == "completed", batch
    rows = {
        json.loads(x)["custom_id"]: json.loads(x)
        for x in sdk.files.content(batch.output_file_id).text.splitlines()  # type: ignore[arg-type]
    }
    assert rows["a"]["response"]["body"]["choices"][0]["message"]["content"] == "say alpha"
    assert rows["b"]["response"]["body"]["choices"][0]["message"]["content"] == "say beta"
