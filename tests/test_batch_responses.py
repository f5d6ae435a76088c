"""The Batch API with `/v1/responses` lines, through the real `openai` SDK against a real
server and echo node: each line runs as the job `POST /v1/responses` makes and its output
line holds the Response object (as `GET /v1/responses/{id}` returns it); a line with
`store: false` is not kept after the batch; bad lines are refused at upload naming the
line and the parameter; lines that never ran go to the error file."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from openai.types.responses import Response

from tests.conftest import ServerProcess
from tests.nodes import SERVER_LOG_WARNING, echo_model, new_server, with_node

pytestmark = pytest.mark.filterwarnings(SERVER_LOG_WARNING)

URL = "/v1/responses"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("batch-responses")
    started = new_server(tmp / "server")
    try:
        with with_node(started, tmp, [echo_model()]):
            yield started
    finally:
        started.kill(signal.SIGTERM)


@pytest.fixture
def client(server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=server.url + "/v1", api_key=server.keys["client_key"], max_retries=0
    ) as sdk:
        yield sdk


def jsonl(bodies: dict[str, dict[str, Any]], url: str = URL) -> bytes:
    lines = [
        json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body})
        for cid, body in bodies.items()
    ]
    return ("\n".join(lines) + "\n").encode()


def run_batch(client: openai.OpenAI, data: bytes, window: str = "24h") -> Any:
    upload = client.files.create(file=("responses.jsonl", data), purpose="batch")
    return run_batch_on(client, upload.id, URL, window)


def run_batch_on(client: openai.OpenAI, file_id: str, endpoint: str, window: str = "24h") -> Any:
    batch = client.batches.create(
        input_file_id=file_id,
        endpoint=endpoint,  # type: ignore[arg-type]
        completion_window=window,  # type: ignore[arg-type]
    )
    assert batch.endpoint == endpoint and batch.status == "validating"
    deadline = time.monotonic() + 30
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.1)
        batch = client.batches.retrieve(batch.id)
    return batch


def rows(client: openai.OpenAI, file_id: str | None) -> dict[str, Any]:
    assert file_id is not None
    found = [json.loads(x) for x in client.files.content(file_id).text.splitlines()]
    return {row["custom_id"]: row for row in found}


def test_responses_lines_give_response_objects(client: openai.OpenAI) -> None:
    lines: dict[str, dict[str, Any]] = {
        "plain": {"model": "echo", "input": "hello there"},
        "parts": {
            "model": "echo",
            "instructions": "be brief",
            "input": [
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "part one"},
                        {"type": "input_text", "text": " and two"},
                    ],
                }
            ],
            "metadata": {"run": "nightly"},
            "tools": [{"type": "function", "name": "lookup", "parameters": {"type": "object"}}],
        },
        "short": {"model": "echo", "input": "one two three four", "max_output_tokens": 2},
        "unkept": {"model": "echo", "input": "forget me", "store": False},
    }
    done = run_batch(client, jsonl(lines))
    assert done.status == "completed", done
    assert (done.request_counts.total, done.request_counts.completed) == (4, 4)
    assert done.error_file_id is None
    assert done.usage is not None and done.usage.output_tokens == 2 + 4 + 2 + 2

    out = rows(client, done.output_file_id)
    assert set(out) == set(lines)
    texts = {"plain": "hello there", "parts": "part one and two", "short": "one two"}
    texts["unkept"] = "forget me"
    for cid, row in out.items():
        assert row["error"] is None and row["response"]["status_code"] == 200
        body = row["response"]["body"]
        assert body["object"] == "response"
        assert body["id"] == "resp_" + row["response"]["request_id"].removeprefix("job_")
        parsed = Response.model_validate(body)  # the SDK's own type takes it whole
        assert parsed.output_text == texts[cid], (cid, body)
        assert parsed.model == "echo" and parsed.usage is not None
    parts = Response.model_validate(out["parts"]["response"]["body"])
    assert parts.status == "completed" and parts.instructions == "be brief"
    assert parts.metadata == {"run": "nightly"}
    assert [t.name for t in parts.tools] == ["lookup"]  # type: ignore[union-attr]
    short = Response.model_validate(out["short"]["response"]["body"])
    assert short.status == "incomplete" and short.incomplete_details is not None
    assert short.incomplete_details.reason == "max_output_tokens"

    # each line is a stored response like any other, but `store: false` is not kept
    kept = client.responses.retrieve(out["plain"]["response"]["body"]["id"])
    assert kept.model_dump(mode="json") == Response.model_validate(
        out["plain"]["response"]["body"]
    ).model_dump(mode="json")
    items = client.responses.input_items.list(parts.id, order="asc")
    assert [i.type for i in items.data] == ["message"]
    assert out["unkept"]["response"]["body"]["store"] is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(out["unkept"]["response"]["body"]["id"])


def test_bad_responses_lines_are_refused_at_upload(client: openai.OpenAI) -> None:
    ok = {"model": "echo", "input": "fine"}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"model": "echo"}, "body.input"),
        ({"model": "echo", "input": "x", "temperature": 5}, "body.temperature"),
        ({"model": "echo", "input": "x", "stream": True}, "'stream' is not allowed"),
        (
            {"model": "echo", "input": "x", "previous_response_id": "resp_abc"},
            "body.previous_response_id: previous_response_id is not supported in a batch",
        ),
        ({"model": "echo", "input": [{"role": "robot", "content": "x"}]}, "body.input[0].role"),
        ({"model": "echo", "input": []}, "body.input: input must hold at least one item"),
        ({"model": "echo", "input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"template": "helper", "query": "x"}, "a 'template' body needs url"),
    ]
    for body, expected in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.files.create(file=("bad.jsonl", jsonl({"ok": ok, "bad": body})), purpose="batch")
        assert "line 2" in caught.value.message and expected in caught.value.message, (
            body,
            caught.value.message,
        )

    # Responses lines in a chat batch (or chat lines in a Responses batch): the batch fails
    chat = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
    mixed = client.files.create(
        file=("mixed.jsonl", jsonl({"r": ok}) + jsonl({"c": chat}, "/v1/chat/completions")),
        purpose="batch",
    )
    failed = run_batch_on(client, mixed.id, URL)
    assert failed.status == "failed" and failed.errors is not None
    assert [(e.code, e.line) for e in failed.errors.data] == [("mismatched_endpoint", 2)]


def test_a_line_that_never_ran_goes_to_the_error_file(client: openai.OpenAI) -> None:
    lines = {
        "ran": {"model": "echo", "input": "in time"},
        "late": {"model": "nobody-serves-this", "input": "too late"},
    }
    done = run_batch(client, jsonl(lines), window="2s")
    assert done.status == "expired", done
    assert (done.request_counts.completed, done.request_counts.failed) == (1, 1)
    ran = rows(client, done.output_file_id)["ran"]["response"]["body"]
    assert Response.model_validate(ran).output_text == "in time"
    late = rows(client, done.error_file_id)["late"]
    assert late["response"] is None and late["error"]["code"] == "batch_expired"
    got = client.responses.retrieve("resp_" + late["id"].removeprefix("batch_req_"))
    assert got.status == "failed" and got.output == []
