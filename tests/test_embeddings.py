"""`POST /v1/embeddings` with the real `openai` SDK against a real server and real node
processes: the echo backend (sync, float and base64, list and token-array input,
`dimensions`, async with `Prefer: respond-async`, Batch API lines, our client library,
bad input), the `openai` backend in front of the OpenAI mock, and the bundled Gemma
through llama.cpp (shape, determinism, a text's cosine with itself)."""

from __future__ import annotations

import base64
import contextlib
import json
import math
import signal
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from openbeepboop.client import Client
from tests.conftest import ServerProcess
from tests.nodes import (
    SERVER_LOG_WARNING,
    MockOpenAI,
    Procs,
    echo_model,
    new_server,
    wait_jobs,
    with_node,
)

pytestmark = pytest.mark.filterwarnings(SERVER_LOG_WARNING)

TEXTS = ["the sea is calm tonight", "a haiku about the sea", "the sea is calm tonight"]


@contextlib.contextmanager
def sdk_for(server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=server.url + "/v1", api_key=server.keys["client_key"], max_retries=0
    ) as client:
        yield client


@pytest.fixture
def echo_sdk(echo_server: ServerProcess) -> Iterator[openai.OpenAI]:
    with sdk_for(echo_server) as client:
        yield client


def floats(b64: str) -> list[float]:
    raw = base64.b64decode(b64)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


@pytest.fixture(scope="module")
def echo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("embeddings")
    server = new_server(tmp / "server")
    try:
        with with_node(server, tmp, [echo_model()]):
            yield server
    finally:
        server.kill(signal.SIGTERM)


def test_sdk_embeddings_on_echo(echo_server: ServerProcess, echo_sdk: openai.OpenAI) -> None:
    client = echo_sdk
    # float, one string
    one = client.embeddings.create(model="echo", input=TEXTS[0], encoding_format="float")
    assert one.object == "list" and one.model == "echo" and len(one.data) == 1
    vector = one.data[0].embedding
    assert one.data[0].object == "embedding" and one.data[0].index == 0
    assert len(vector) == 256 and math.isclose(math.sqrt(sum(v * v for v in vector)), 1.0)
    assert one.usage.prompt_tokens == one.usage.total_tokens == 5

    # a list: indexes in order, the same text the same vector, another text another one
    many = client.embeddings.create(model="echo", input=TEXTS, encoding_format="float")
    assert [d.index for d in many.data] == [0, 1, 2]
    assert many.data[0].embedding == many.data[2].embedding == vector
    assert cosine(many.data[0].embedding, many.data[1].embedding) < 0.5

    # the SDK's default asks for base64 and decodes it: float32 of the same vector
    default = client.embeddings.create(model="echo", input=TEXTS[:2])
    for got, want in zip(default.data, many.data[:2], strict=True):
        assert got.embedding == pytest.approx(want.embedding, abs=1e-6)

    # raw base64 on the wire: little-endian float32
    raw = httpx.post(
        echo_server.url + "/v1/embeddings",
        json={"model": "echo", "input": TEXTS[0], "encoding_format": "base64"},
        headers={"Authorization": f"Bearer {echo_server.keys['client_key']}"},
        timeout=30,
    )
    assert raw.status_code == 200, raw.text
    encoded = raw.json()["data"][0]["embedding"]
    assert isinstance(encoded, str) and floats(encoded) == pytest.approx(vector, abs=1e-6)
    assert raw.headers["x-openbeepboop-job-id"].startswith("job_")

    # token arrays and `dimensions`
    tokens = client.embeddings.create(
        model="echo", input=[[1, 2, 3], [4, 5]], dimensions=8, encoding_format="float"
    )
    assert [len(d.embedding) for d in tokens.data] == [8, 8]
    assert tokens.usage.prompt_tokens == 5


def test_embeddings_bad_input_is_a_400(echo_sdk: openai.OpenAI) -> None:
    client = echo_sdk
    cases: list[tuple[dict[str, Any], str]] = [
        ({"input": []}, "input"),
        ({"input": [[]]}, "input"),
        ({"input": ""}, "input"),
        ({"input": ["a", ""]}, "input"),
        ({"input": ["x"] * 2049}, "input"),
        ({"input": [1.5]}, "input"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "x", "dimensions": 0}, "dimensions"),
        ({}, "input"),
    ]
    for body, param in cases:
        with pytest.raises(openai.BadRequestError) as info:
            client.post("/embeddings", body={"model": "echo", **body}, cast_to=object)
        error = info.value.body
        assert isinstance(error, dict) and param in str(error.get("param")), (body, error)
    # the node refuses what only it can judge: a 400 naming the parameter
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model="echo", input="x", dimensions=100_000)
    assert isinstance(refused.value.body, dict) and refused.value.body["param"] == "dimensions"


def test_embeddings_ignore_stream(echo_server: ServerProcess, echo_sdk: openai.OpenAI) -> None:
    """OpenAI's embeddings endpoint ignores `stream` (and `stream_options`): so does ours,
    sync and async. The answer is the plain JSON one, promptly, never a stream."""
    want = echo_sdk.embeddings.create(model="echo", input=TEXTS[0], encoding_format="float")
    vector = want.data[0].embedding
    streamy = {"stream": True, "stream_options": {"include_usage": True}}
    body = {"model": "echo", "input": TEXTS[0], "encoding_format": "float", **streamy}
    key = echo_server.keys["client_key"]
    with httpx.Client(
        base_url=echo_server.url, headers={"Authorization": f"Bearer {key}"}, timeout=10
    ) as http:
        sync = http.post("/v1/embeddings", json=body)
        assert sync.status_code == 200, sync.text
        assert sync.headers["content-type"].startswith("application/json")
        assert sync.json()["data"][0]["embedding"] == vector
        assert sync.json()["usage"] == want.usage.model_dump()

        later = http.post("/v1/embeddings", json=body, headers={"Prefer": "respond-async"})
        assert later.status_code == 202, later.text
        [done] = wait_jobs(echo_server, [later.json()["id"]], "completed", 10)
        assert done["result"]["data"][0]["embedding"] == vector

    # the SDK's way of sending it
    got = echo_sdk.embeddings.create(
        model="echo", input=TEXTS[0], encoding_format="float", extra_body=streamy
    )
    assert got.data[0].embedding == vector


def test_embeddings_async_batch_and_client(
    echo_server: ServerProcess, echo_sdk: openai.OpenAI
) -> None:
    key = echo_server.keys["client_key"]
    http = httpx.Client(
        base_url=echo_server.url, headers={"Authorization": f"Bearer {key}"}, timeout=30
    )
    client = echo_sdk
    sync = client.embeddings.create(model="echo", input=TEXTS, encoding_format="float")
    want = [d.embedding for d in sync.data]

    # async: a job like any other
    with http:
        r = http.post(
            "/v1/embeddings",
            json={"model": "echo", "input": TEXTS, "encoding_format": "float"},
            headers={"Prefer": "respond-async"},
        )
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["endpoint"] == "/v1/embeddings"
    [done] = wait_jobs(echo_server, [job["id"]], "completed", 20)
    assert done["status"] == "completed", done
    assert [d["embedding"] for d in done["result"]["data"]] == want

    # the Batch API with /v1/embeddings lines
    lines = [
        {
            "custom_id": f"e-{i}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "echo", "input": text, "encoding_format": "base64"},
        }
        for i, text in enumerate(TEXTS)
    ]
    data = ("\n".join(json.dumps(line) for line in lines) + "\n").encode()
    upload = client.files.create(file=("emb.jsonl", data), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h"
    )
    deadline = time.monotonic() + 30
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == 3, batch
    assert batch.output_file_id is not None
    out = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    by_id = {line["custom_id"]: line["response"] for line in out}
    for i in range(3):
        response = by_id[f"e-{i}"]
        assert response["status_code"] == 200
        assert floats(response["body"]["data"][0]["embedding"]) == pytest.approx(want[i], abs=1e-6)

    # our client library: a job, its result the SDK's type
    with Client(echo_server.url, key) as ours:
        queued = ours.embeddings.create(model="echo", input=TEXTS[0], encoding_format="float")
        [finished] = ours.jobs.wait_all([queued], timeout=30)
        assert finished.status == "completed"
        assert finished.result.data[0].embedding == want[0]


def test_openai_backend_passes_embeddings_through(
    server_process: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    procs = Procs()
    try:
        mock = MockOpenAI(procs, tmp_path)
        model = {
            "name": "oa-embed",
            "backend": "openai",
            "api_base": mock.url + "/v1",
            "model": "mock-embedder",
        }
        with with_node(server_process(), tmp_path, [model]) as server, sdk_for(server) as client:
            plain = client.embeddings.create(
                model="oa-embed", input=["one two", "three"], encoding_format="float"
            )
            assert plain.model == "oa-embed"
            assert [d.embedding for d in plain.data] == [[7, 2, 0.5, -0.25], [5, 1, 0.5, -0.25]]
            assert plain.usage.prompt_tokens == 3
            packed = client.embeddings.create(model="oa-embed", input="one two")
            assert packed.data[0].embedding == [7, 2, 0.5, -0.25]
            sent = [r["body"] for r in mock.requests() if r["path"] == "/v1/embeddings"]
            assert sent[0] == {
                "model": "mock-embedder",
                "input": ["one two", "three"],
                "encoding_format": "float",
            }
            assert sent[1]["encoding_format"] == "base64" and "stream" not in sent[1]

            # `stream` is ignored, sync and async: the provider never gets it
            streamy = {"stream": True, "stream_options": {"include_usage": True}}
            got = client.embeddings.create(
                model="oa-embed", input="one two", encoding_format="float", extra_body=streamy
            )
            assert got.data[0].embedding == [7, 2, 0.5, -0.25]
            later = httpx.post(
                server.url + "/v1/embeddings",
                json={"model": "oa-embed", "input": "three", **streamy},
                headers={
                    "Authorization": f"Bearer {server.keys['client_key']}",
                    "Prefer": "respond-async",
                },
                timeout=10,
            )
            assert later.status_code == 202, later.text
            [done] = wait_jobs(server, [later.json()["id"]], "completed", 10)
            assert done["result"]["data"][0]["embedding"] == [5, 1, 0.5, -0.25]
            sent = [r["body"] for r in mock.requests() if r["path"] == "/v1/embeddings"]
            assert [b["input"] for b in sent[2:]] == ["one two", "three"]
            for body in sent[2:]:
                assert "stream" not in body and "stream_options" not in body, body
    finally:
        procs.close()


def test_gemma_embeddings(server_process: Callable[..., ServerProcess], tmp_path: Path) -> None:
    model = {"name": "gemma-3-270m", "backend": "llama_cpp", "n_ctx": 512}
    with with_node(server_process(), tmp_path, [model]) as server, sdk_for(server) as client:
        first = client.embeddings.create(model="gemma-3-270m", input=TEXTS[:2])
        again = client.embeddings.create(
            model="gemma-3-270m", input=TEXTS[0], encoding_format="float"
        )
        a, b = (d.embedding for d in first.data)
        assert len(a) == len(b) == len(again.data[0].embedding) == 640
        assert again.data[0].embedding == pytest.approx(a, abs=1e-5)  # deterministic
        assert cosine(a, again.data[0].embedding) == pytest.approx(1.0, abs=1e-6)
        assert cosine(a, b) < 0.999
        assert first.usage.prompt_tokens > 0
        with pytest.raises(openai.BadRequestError) as refused:
            client.embeddings.create(model="gemma-3-270m", input="x", dimensions=64)
        assert isinstance(refused.value.body, dict)
        assert refused.value.body["param"] == "dimensions"
