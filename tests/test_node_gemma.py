"""The real model: a server and a node on the bundled Gemma 3 270M (llama-cpp-python)
finish a chat job and a completion job with real text."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import tomli_w

from tests.conftest import ServerProcess
from tests.nodes import new_server


@pytest.fixture(scope="module")
def gemma_node(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ServerProcess, httpx.Client]]:
    """One server and Gemma node for the module's tests: each reads only its own answers."""
    tmp_path = tmp_path_factory.mktemp("gemma")
    server = new_server(tmp_path / "server")
    config = {
        "server": {"url": server.url, "api_key": server.keys["node_key"]},
        "node": {"name": "gemma-test", "state_dir": str(tmp_path / "node")},
        "models": [{"name": "gemma-3-270m", "backend": "llama_cpp", "n_ctx": 1024}],
    }
    path = tmp_path / "node.toml"
    path.write_text(tomli_w.dumps(config))
    with (tmp_path / "node.log").open("wb") as log:
        node = subprocess.Popen(
            [sys.executable, "-m", "openbeepboop.cli.node", "run", "--config", str(path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ),
        )
    http = httpx.Client(
        base_url=server.url,
        headers={"Authorization": f"Bearer {server.keys['client_key']}"},
        timeout=120,
    )
    try:
        deadline = time.monotonic() + 120
        while not any(m["id"] == "gemma-3-270m" for m in http.get("/v1/models").json()["data"]):
            assert node.poll() is None, (tmp_path / "node.log").read_text()
            assert time.monotonic() < deadline, "the Gemma node did not come up"
            time.sleep(0.2)
        yield server, http
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(timeout=60)
        http.close()
        server.kill(signal.SIGTERM)


def _ask(http: httpx.Client, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    body = {"model": "gemma-3-270m", "max_tokens": 24, "temperature": 0, **body}
    r = http.post(endpoint, json=body)
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_gemma_answers_chat_and_completion(gemma_node: tuple[ServerProcess, httpx.Client]) -> None:
    _, http = gemma_node
    chat = _ask(
        http,
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Name three colours."}]},
    )
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"]["content"].strip()
    assert chat["usage"]["completion_tokens"] > 0
    assert chat["usage"]["prompt_tokens"] > 0

    text = _ask(http, "/v1/completions", {"prompt": "The capital of France is"})
    assert text["object"] == "text_completion"
    assert text["choices"][0]["text"].strip()
    assert 0 < text["usage"]["completion_tokens"] <= 24


def test_gemma_job_through_the_async_path(gemma_node: tuple[ServerProcess, httpx.Client]) -> None:
    _, http = gemma_node
    body = {
        "model": "gemma-3-270m",
        "max_tokens": 16,
        "temperature": 0,
        "messages": [{"role": "user", "content": "Say hello."}],
    }
    r = http.post("/v1/chat/completions", json=body, headers={"Prefer": "respond-async"})
    assert r.status_code == 202
    job_id = r.json()["id"]
    r = http.post("/v1/results/poll", json={"ids": [job_id], "wait": 60})
    job = r.json()["data"][0]
    deadline = time.monotonic() + 60
    while job["status"] != "completed" and time.monotonic() < deadline:
        job = http.post("/v1/results/poll", json={"ids": [job_id], "wait": 10}).json()["data"][0]
    assert job["status"] == "completed", job
    assert job["result"]["usage"]["completion_tokens"] > 0
    assert job["result"]["choices"][0]["message"]["content"].strip()


def test_openai_sdk_responses_on_gemma(gemma_node: tuple[ServerProcess, httpx.Client]) -> None:
    """`responses.create` on the real model: plain, streamed, chained."""
    import openai

    server, _ = gemma_node
    client = openai.OpenAI(
        base_url=server.url + "/v1", api_key=server.keys["client_key"], max_retries=0
    )
    first = client.responses.create(
        model="gemma-3-270m", input="Name three colours.", max_output_tokens=16, temperature=0
    )
    assert first.status in ("completed", "incomplete") and first.usage is not None
    assert first.usage.output_tokens > 0
    with client.responses.stream(
        model="gemma-3-270m", input="Write about the sea.", max_output_tokens=16
    ) as stream:
        events = list(stream)
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    # the last event: response.completed, or response.incomplete when the 16 tokens run out
    # (the SDK's get_final_response() knows only the first; sampling decides which comes)
    last = events[-1]
    assert last.type in ("response.completed", "response.incomplete"), last.type
    final = last.response  # type: ignore[union-attr]
    assert final.status == last.type.removeprefix("response.")
    assert "".join(deltas) == final.output_text
    chained = client.responses.create(
        model="gemma-3-270m",
        input="And one more?",
        previous_response_id=first.id,
        max_output_tokens=16,
    )
    assert chained.previous_response_id == first.id and chained.usage is not None
    assert chained.usage.input_tokens > first.usage.input_tokens  # the earlier turns went in


def test_openai_sdk_on_gemma_plain_streamed_and_batched(
    gemma_node: tuple[ServerProcess, httpx.Client],
) -> None:
    import json

    import openai

    server, _ = gemma_node
    client = openai.OpenAI(
        base_url=server.url + "/v1", api_key=server.keys["client_key"], max_retries=0
    )
    messages = [{"role": "user", "content": "Write one sentence about the sea."}]
    plain = client.chat.completions.create(
        model="gemma-3-270m",
        messages=messages,
        max_tokens=24,
        temperature=0,  # type: ignore[arg-type]
    )
    assert plain.usage is not None and plain.usage.completion_tokens > 0
    assert plain.choices[0].message.content

    longer = [{"role": "user", "content": "Write three sentences about the sea."}]
    stream = client.chat.completions.create(
        model="gemma-3-270m",
        messages=longer,  # type: ignore[arg-type]
        max_tokens=48,  # a few tokens can arrive as one piece when the node is busy
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        # the model itself, token by token: not the response cache's answer to `plain`
        extra_body={"cache": "skip"},
    )
    pieces, usage, finish = [], None, None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert len(pieces) >= 3, pieces  # token by token, not one block
    assert usage is not None and usage.completion_tokens > 0
    assert finish in ("stop", "length")

    text = client.completions.create(
        model="gemma-3-270m", prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert text.usage is not None and text.usage.completion_tokens > 0

    lines = [
        json.dumps(
            {
                "custom_id": f"q{i}",
                "method": "POST",
                "url": "/v1/completions",
                "body": {"model": "gemma-3-270m", "prompt": p, "max_tokens": 8},
            }
        )
        for i, p in enumerate(["Once upon a time", "The history of the bicycle begins"])
    ]
    upload = client.files.create(file=("g.jsonl", "\n".join(lines).encode()), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 120
    while (batch := client.batches.retrieve(batch.id)).status != "completed":
        assert batch.status in ("validating", "in_progress", "finalizing"), batch.status
        assert time.monotonic() < deadline
        time.sleep(0.3)
    rows = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]  # type: ignore[arg-type]
    assert sorted(r["custom_id"] for r in rows) == ["q0", "q1"]
    assert all(r["response"]["body"]["usage"]["completion_tokens"] > 0 for r in rows)
